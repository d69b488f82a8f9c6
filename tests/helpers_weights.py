"""A tiny run folder (untrained weights + config.toml + preprocessing.json) for tests."""

from __future__ import annotations

from pathlib import Path


def make_run(root: Path, variant: str = "paper") -> Path:
    from allcnn.config import make_config
    from allcnn.model import build_model
    from allcnn.preprocessing import Preprocessing

    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(make_config(variant=variant, val_size=20).to_toml())
    Preprocessing("standardize", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).save(run / "preprocessing.json")
    build_model(variant, seed=0).save_weights(run / "best.weights.h5")
    return run / "best.weights.h5"
