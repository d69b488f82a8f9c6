"""Shared fixtures: tiny CIFAR-10 copies in the real pickle layout."""

from __future__ import annotations

import importlib.util
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from allcnn.data import CLASS_NAMES, FOLDER, META_FILE, TEST_FILE, TRAIN_FILES  # noqa: E402
from tests.helpers_weights import make_run  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                               reason="the JAX backend is the optional extra allcnn[jax]")


def load_script(name: str):
    """scripts/NAME.py as a module, so that a test can call its functions."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(n: int, rng: np.random.Generator) -> dict:
    labels = np.arange(n) % len(CLASS_NAMES)
    # Class-dependent colour so a tiny model can learn something.
    base = (labels[:, None] * 25).astype(np.int64)
    data = np.clip(base + rng.integers(0, 40, size=(n, 3072)), 0, 255).astype(np.uint8)
    return {b"batch_label": b"synthetic", b"labels": labels.tolist(), b"data": data}


def write_cifar_folder(root: Path, per_batch: int = 40, seed: int = 0) -> Path:
    """Writes data_batch_1..5, test_batch and batches.meta as CIFAR pickles."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in (*TRAIN_FILES, TEST_FILE):
        with open(folder / name, "wb") as f:
            pickle.dump(_batch(per_batch, rng), f, protocol=4)
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASS_NAMES], b"num_vis": 3072}, f, protocol=4)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny run folder's best.weights.h5 (untrained All-CNN-C, config and preprocessing beside)."""
    return make_run(tmp_path_factory.mktemp("w"))


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """The parent of a tiny cifar-10-batches-py (40 images per batch)."""
    write_cifar_folder(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def cifar_archive(tmp_path: Path) -> Path:
    """A tiny cifar-10-python.tar.gz with the official member names."""
    folder = write_cifar_folder(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=FOLDER)
    return archive
