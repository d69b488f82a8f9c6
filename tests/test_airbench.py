"""The distillation teacher of another family (allcnn.airbench) and scripts/train_teacher.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from allcnn.airbench import WHITENING_FILTERS, build_teacher, whitening_kernel

ROOT = Path(__file__).resolve().parents[1]


def _correlated_images(count: int = 300, seed: int = 0) -> np.ndarray:
    """Smooth images (neighbouring pixels and channels correlated), far from white."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 9, 9, 3)).cumsum(axis=1).cumsum(axis=2)
    return (x @ np.array([[1.0, 0.8, 0.6], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])).astype(np.float32)


def test_the_whitening_kernel_whitens_the_images_patches():
    images = _correlated_images()
    kernel = whitening_kernel(images)
    assert kernel.shape == (2, 2, 3, WHITENING_FILTERS)
    patches = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2))
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)
    raw = np.cov(patches, rowvar=False)
    assert np.abs(raw - np.diag(np.diag(raw))).max() > 1  # far from white before
    outputs = patches @ kernel.reshape(12, WHITENING_FILTERS)
    np.testing.assert_allclose(np.cov(outputs[:, :12], rowvar=False), np.eye(12), atol=0.02)
    np.testing.assert_array_equal(outputs[:, 12:], -outputs[:, :12])


def test_the_teacher_s_first_conv_is_the_frozen_whitening():
    kernel = whitening_kernel(_correlated_images(count=50))
    model = build_teacher(kernel, classes=7, input_shape=(32, 32, 3))
    whiten = model.get_layer("whiten")
    assert not whiten.trainable and id(whiten.kernel) not in map(id, model.trainable_weights)
    np.testing.assert_array_equal(whiten.get_weights()[0], kernel)
    assert model.output_shape == (None, 7)
    probabilities = model.predict(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)


def test_train_teacher_writes_a_teacher_folder_that_teaches(cifar_dir, tmp_path):
    """The script holds out the images `allcnn train` would, and its folder loads as a teacher."""
    from allcnn.config import make_config
    from allcnn.data import load_splits
    from allcnn.teacher import load_teacher

    out = tmp_path / "teacher"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_teacher.py"), str(out), "--data-dir",
                             str(cifar_dir), "--epochs", "2", "--val-size", "40", "--seed", "3"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val_accuracy" in result.stdout
    record = json.loads((out / "teacher.json").read_text())
    assert record["held_out"] == {"val_size": 40, "seed": 3} and record["epochs"] == 2
    assert record["augmentation"] == {"flip": True, "translate": 2, "cutout": 0}
    assert len(record["class_names"]) == 10 and 0 <= record["val_accuracy"] <= 1
    teacher = load_teacher(str(out / "teacher.keras"))
    val = load_splits(make_config(val_size=40, seed=3), cifar_dir)[2]
    probabilities = teacher.probabilities(val[0])
    assert probabilities.shape == (40, 10)
    # The recorded accuracy is the saved model's, on the images held out.
    assert np.mean(probabilities.argmax(axis=1) == val[1]) == record["val_accuracy"]


def test_train_teacher_without_data_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_teacher.py"), str(tmp_path / "t"),
                             "--data-dir", str(tmp_path / "none")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cifar-10-batches-py" in errors[0]
    assert not (tmp_path / "t").exists()
