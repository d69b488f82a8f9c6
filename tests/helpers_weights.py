"""A tiny run folder (untrained weights + config.toml + preprocessing.json) for tests."""

from __future__ import annotations

from pathlib import Path


def make_run(root: Path, variant: str = "paper", batch_norm: bool = False, reparam: bool = False) -> Path:
    """With `batch_norm`, every batch norm gets statistics far from 0 and 1, so that folding it matters;
    with `reparam` too, the network has RepVGG's branches (`allcnn.model.RepConv`)."""
    import numpy as np
    from allcnn.config import make_config
    from allcnn.model import batch_norms, build_model
    from allcnn.preprocessing import Preprocessing

    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(make_config(variant=variant, val_size=20, batch_norm=batch_norm,
                                                 reparam=reparam).to_toml())
    Preprocessing("standardize", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).save(run / "preprocessing.json")
    model = build_model(variant, batch_norm=batch_norm, reparam=reparam, seed=0)
    rng = np.random.default_rng(0)
    for layer in batch_norms(model):
        channels = layer.gamma.shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.uniform(-0.5, 0.5, channels),
                           rng.uniform(-0.5, 0.5, channels), rng.uniform(0.5, 3.0, channels)])
    model.save_weights(run / "best.weights.h5")
    return run / "best.weights.h5"
