"""The distillation teacher of another family (allcnn.airbench) and scripts/train_teacher.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers

from allcnn.airbench import (WHITENING_FILTERS, BiasScaledSGD, Lookahead, Triangle, build_teacher, dirac_init,
                             tta_probabilities, whitening_kernel)

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
    # Negated filters give negated outputs, to rounding: the matmul may sum each column in its own order.
    np.testing.assert_allclose(outputs[:, 12:], -outputs[:, :12], atol=1e-5)


def test_the_teacher_s_first_conv_is_the_frozen_whitening():
    kernel = whitening_kernel(_correlated_images(count=50))
    model = build_teacher(kernel, classes=7, input_shape=(32, 32, 3))
    whiten = model.get_layer("whiten")
    assert not whiten.trainable and id(whiten.kernel) not in map(id, model.trainable_weights)
    np.testing.assert_array_equal(whiten.get_weights()[0], kernel)
    assert model.output_shape == (None, 7)
    probabilities = model.predict(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)


def test_dirac_init_makes_each_3x3_conv_pass_its_input_channels_through():
    inputs = keras.Input((8, 8, 4))
    narrow_to_wide = layers.Conv2D(6, 3, padding="same", use_bias=False)
    wide_to_narrow = layers.Conv2D(3, 3, padding="same", use_bias=False)
    model = keras.Model(inputs, wide_to_narrow(narrow_to_wide(inputs)))
    random_filters = narrow_to_wide.kernel.numpy()[..., 4:]
    dirac_init(model)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    wide = np.asarray(narrow_to_wide(x))
    np.testing.assert_allclose(wide[..., :4], x, atol=1e-6)  # the first 4 filters: identities
    np.testing.assert_array_equal(narrow_to_wide.kernel.numpy()[..., 4:], random_filters)  # the rest: untouched
    np.testing.assert_allclose(np.asarray(wide_to_narrow(wide)), wide[..., :3], atol=1e-6)


def test_the_triangle_rises_from_a_fifth_to_the_peak_then_falls_to_seven_hundredths():
    schedule = Triangle(2.0, 100)
    lrs = [float(schedule(step)) for step in (0, 23, 100)]
    np.testing.assert_allclose(lrs, [0.4, 2.0, 0.14], rtol=1e-6)
    assert float(schedule(10)) == pytest.approx(0.4 + 1.6 * 10 / 23)
    assert float(schedule(60)) == pytest.approx(2.0 - 1.86 * 37 / 77)


def _bn_model():
    inputs = keras.Input((4,))
    x = layers.Dense(3, use_bias=False)(inputs)
    return keras.Model(inputs, layers.BatchNormalization(scale=False)(x))


def test_bias_scaled_sgd_moves_the_batch_norm_offsets_64_times_further():
    """Against Keras' SGD from the same weights, on the same batch: the kernel's step is SGD's,
    the offsets' (beta) 64 times it; weight decay shrinks both as SGD's does."""
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")
    steps = {}
    for name, optimizer in (("sgd", keras.optimizers.SGD(0.01, weight_decay=0.1)),
                            ("scaled", BiasScaledSGD(0.01, weight_decay=0.1))):
        keras.utils.set_random_seed(0)
        model = _bn_model()
        model.layers[-1].beta.assign([0.5, -0.5, 1.0])
        before = [w.numpy() for w in model.trainable_weights]
        model.compile(optimizer, "mse")
        model.train_on_batch(x, y)
        steps[name] = [w.numpy() - b for w, b in zip(model.trainable_weights, before)]
        decay = [-0.01 * 0.1 * b for b in before]
    kernel, beta = 0, 1
    np.testing.assert_allclose(steps["scaled"][kernel], steps["sgd"][kernel], rtol=1e-6)
    np.testing.assert_allclose(steps["scaled"][beta] - decay[beta], 64 * (steps["sgd"][beta] - decay[beta]),
                               rtol=1e-4)
    assert np.abs(steps["sgd"][beta] - decay[beta]).min() > 1e-4


def test_lookahead_averages_weights_and_statistics_and_sets_the_network_to_the_average():
    model = _bn_model()
    lookahead = Lookahead(total_steps=10, steps_per_epoch=2, start_epoch=1, every=2, decay=0.5)
    lookahead.set_model(model)
    variables = model.variables  # the kernel, beta, and the moving mean and variance
    assert len(variables) == 4

    def set_all(value):
        for v in variables:
            v.assign(np.full(v.shape, value, "float32"))

    set_all(1.0)
    for _ in range(2):  # steps 1 and 2: the average starts at step 2 (epoch 1, every 2nd)
        lookahead.on_train_batch_end(0)
    set_all(3.0)
    lookahead.on_train_batch_end(0)  # step 3: not an averaging step
    for v in variables:
        np.testing.assert_array_equal(v.numpy(), 3.0)
    lookahead.on_train_batch_end(0)  # step 4: rho = 0.5 ** 2 * (4 / 10) ** 3 = 0.016
    rho = 0.25 * 0.4**3
    for v in variables:
        np.testing.assert_allclose(v.numpy(), rho * 1 + (1 - rho) * 3, rtol=1e-6)
    set_all(5.0)
    lookahead.on_epoch_end(1)  # the network is set back to the average
    for v in variables:
        np.testing.assert_allclose(v.numpy(), rho * 1 + (1 - rho) * 3, rtol=1e-6)


def test_tta_averages_the_image_its_mirror_and_one_pixel_moves():
    """With a 'network' that reports its input's top-left pixel, each view's contribution shows."""
    from allcnn.inference import Classifier
    from allcnn.preprocessing import Preprocessing

    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, layers.Lambda(lambda x: x[:, 0, 0, :])(inputs))
    image = np.arange(16, dtype="uint8").reshape(1, 4, 4, 1)
    # Top-left pixel of: the image 0, its mirror 3; moved down-right (reflected) 5, mirrored 6;
    # moved up-left 5, mirrored 6.
    expected = ((0 + 3) / 2 + ((5 + 6) / 2 + (5 + 6) / 2) / 2) / 2
    tta = tta_probabilities(Classifier(model, Preprocessing("scale")), image)
    np.testing.assert_allclose(tta, [[expected / 255]], rtol=1e-6)


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
