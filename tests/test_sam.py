"""Sharpness-aware steps (`sam_rho`): one step checked against ASAM's formula computed by hand,
and the JAX backend's step against TensorFlow's."""

import os
import subprocess
import sys

import numpy as np
import pytest

from allcnn.config import ConfigError, TrainConfig
from conftest import needs_jax

# A climb of 5% (ASAM's radius, relative to the weights), from seeded weights: at our recipes' 0.5,
# from some random inits, float32 rounding alone moved this small network's step by up to ~1e-3
# between backends (a plain step agrees to 1e-7), so the comparisons failed by chance.
RHO, LR = 0.05, 0.1
# Far below what a wrong climb changes (the climbed gradient differs from the plain one by > 1e-3, a step by > 1e-4).
ATOL = 1e-5


def _config(**overrides) -> TrainConfig:
    """One plain SGD step (no momentum, no weight decay) on a small batch-norm All-CNN-C."""
    return TrainConfig(image_size=16, batch_norm=True, input_dropout=0.0, dropout=0.0, weight_decay=0.0,
                       momentum=0.0, lr=LR, schedule="constant", epochs=1, precision="float32",
                       **overrides).validate()


def _batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, 8)]
    return x, y


def sam_step(start: str, out: str) -> None:
    """Loads the weights in `start` (.npz) into a SAM model, takes one step, saves them to `out`;
    a subprocess runs it under another backend."""
    from allcnn.optim import compile_model

    model = compile_model(_config(sam_rho=RHO), steps_per_epoch=1)
    model.set_weights(list(np.load(start).values()))
    model.train_on_batch(*_batch())
    np.savez(out, *model.get_weights())


def _gradients(model, weights, x, y):
    """The loss's gradients at `weights` (batch norm in training mode), the model's weights left as they were."""
    import keras
    import tensorflow as tf

    before = model.get_weights()
    model.set_weights(weights)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, model(x, training=True)))
    gradients = [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
    model.set_weights(before)
    return gradients


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A SAM step under TensorFlow: the weights before and after, and the files that hold them."""
    from allcnn.optim import compile_model
    from allcnn.sam import SharpnessAware

    import keras

    folder = tmp_path_factory.mktemp("sam")
    keras.utils.set_random_seed(0)
    model = compile_model(_config(), steps_per_epoch=1)
    assert not isinstance(model, SharpnessAware)
    np.savez(folder / "start.npz", *model.get_weights())
    sam_step(folder / "start.npz", folder / "tensorflow.npz")
    return model, folder


def test_a_sam_step_applies_the_gradient_taken_at_the_adaptive_climb(one_step):
    from allcnn.sam import ETA

    model, folder = one_step  # a plain model with the starting weights: the gradients by hand
    x, y = _batch()
    start = model.get_weights()
    index = {w.path: i for i, w in enumerate(model.weights)}
    trainable = [index[w.path] for w in model.trainable_weights]
    g = _gradients(model, start, x, y)
    scales = [np.abs(start[i]) + ETA for i in trainable]
    norm = np.sqrt(sum(np.sum((t * gi) ** 2) for t, gi in zip(scales, g)))
    climbed = list(start)
    for i, t, gi in zip(trainable, scales, g):
        climbed[i] = start[i] + RHO * t * t * gi / norm
    g_climbed = _gradients(model, climbed, x, y)
    assert max(np.abs(gc - gi).max() for gi, gc in zip(g, g_climbed)) > 1e-3  # not a plain step's gradient
    model(x, training=True)  # one forward pass: batch norm's moving statistics, updated once
    expected = model.get_weights()
    for i, gc in zip(trainable, g_climbed):
        expected[i] = start[i] - LR * gc

    after = list(np.load(folder / "tensorflow.npz").values())
    for w, got, want in zip(model.weights, after, expected):
        np.testing.assert_allclose(got, want, atol=ATOL, err_msg=w.path)


@needs_jax
def test_a_sam_step_under_jax_is_tensorflow_s(one_step):
    _, folder = one_step
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); from test_sam import sam_step; "
              f"sam_step({str(folder / 'start.npz')!r}, {str(folder / 'jax.npz')!r})")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    start, tensorflow, jax = (list(np.load(folder / f"{name}.npz").values()) for name in ("start", "tensorflow", "jax"))
    for got, want in zip(jax, tensorflow):
        np.testing.assert_allclose(got, want, atol=ATOL)
    assert max(np.abs(a - b).max() for a, b in zip(jax, start)) > 1e-3  # it stepped


def test_sam_rho_must_not_be_negative_nor_split_over_tensorflow_replicas():
    from allcnn.sam import check_sharpness_aware

    with pytest.raises(ConfigError, match="sam_rho: must not be negative"):
        _config(sam_rho=-0.1)
    check_sharpness_aware(1)
    with pytest.raises(ConfigError, match="under TensorFlow run on one replica, not 2"):
        check_sharpness_aware(2)


def test_a_sam_run_with_batch_norm_and_averaging_trains_and_folds(cifar_dir, tmp_path):
    from allcnn.config import load_config
    from allcnn.evaluation import evaluate
    from allcnn.model import batch_norms, load_classifier
    from allcnn.training import train

    config = load_config(epochs=2, batch_size=16, val_size=40, precision="float32", batch_norm=True,
                         input_dropout=0.0, dropout=0.0, use_ema=True, sam_rho=RHO)
    summary = train(config, tmp_path / "run", data_dir=cifar_dir)
    assert summary["epochs"] == 2 and 0 <= summary["best_val_accuracy"] <= 1
    classifier = load_classifier(tmp_path / "run" / "best.weights.h5", precision="float32")
    assert not batch_norms(classifier.model)  # folded: the plain network
    assert 0 <= evaluate(classifier, data_dir=cifar_dir)["top1"] <= 1
