import warnings

import keras
import numpy as np
import pytest

from allcnn.config import ConfigError
from allcnn.model import (BatchNormalization, RepConv, batch_norms, build_model, fold_batch_norm,
                          refresh_batch_norm, unfold_batch_norm)

# Each derivation of Table 2 and each base model of Table 1 (5x5, 1x1 and 3x3 convs) at least once:
# folding goes conv by conv, whatever comes between.
FOLD_VARIANTS = ["paper", "tutorial", "model-a", "strided-cnn-b", "convpool-cnn-c", "all-cnn-b"]
PAPER_SHAPES = [
    ("input_dropout", (32, 32, 3)),
    ("conv1", (32, 32, 96)), ("relu1", (32, 32, 96)),
    ("conv2", (32, 32, 96)), ("relu2", (32, 32, 96)),
    ("conv3", (16, 16, 96)), ("relu3", (16, 16, 96)), ("dropout3", (16, 16, 96)),
    ("conv4", (16, 16, 192)), ("relu4", (16, 16, 192)),
    ("conv5", (16, 16, 192)), ("relu5", (16, 16, 192)),
    ("conv6", (8, 8, 192)), ("relu6", (8, 8, 192)), ("dropout6", (8, 8, 192)),
    ("conv7", (6, 6, 192)), ("relu7", (6, 6, 192)),
    ("conv8", (6, 6, 192)), ("relu8", (6, 6, 192)),
    ("conv9", (6, 6, 10)), ("relu9", (6, 6, 10)),
    ("global_average_pooling", (10,)), ("predictions", (10,)),
]
TUTORIAL_SHAPES = [
    ("conv1", (32, 32, 96)), ("relu1", (32, 32, 96)),
    ("conv2", (32, 32, 96)), ("relu2", (32, 32, 96)),
    ("conv3", (16, 16, 96)), ("dropout3", (16, 16, 96)),
    ("conv4", (16, 16, 192)), ("relu4", (16, 16, 192)),
    ("conv5", (16, 16, 192)), ("relu5", (16, 16, 192)),
    ("conv6", (8, 8, 192)), ("dropout6", (8, 8, 192)),
    ("conv7", (8, 8, 192)), ("relu7", (8, 8, 192)),
    ("conv8", (8, 8, 192)), ("relu8", (8, 8, 192)),
    ("conv9", (8, 8, 10)),
    ("global_average_pooling", (10,)), ("predictions", (10,)),
]


@pytest.mark.parametrize("variant, shapes", [("paper", PAPER_SHAPES), ("tutorial", TUTORIAL_SHAPES)])
def test_layers_shapes_and_parameter_count(variant, shapes):
    model = build_model(variant)
    assert model.count_params() == 1_369_738
    assert [(layer.name, tuple(layer.output.shape[1:])) for layer in model.layers] == shapes


def test_paper_details():
    model = build_model()
    assert model.get_layer("input_dropout").rate == 0.2
    assert model.get_layer("dropout3").rate == 0.5 and model.get_layer("dropout6").rate == 0.5
    assert model.get_layer("conv7").padding == "valid"
    assert model.get_layer("predictions").dtype_policy.compute_dtype == "float32"


def test_options():
    model = build_model(classes=100, input_dropout=0.0, dropout=0.3, weight_decay=0.001,
                        kernel_initializer="glorot_uniform", batch_norm=True)
    assert model.output_shape[-1] == 100
    assert "input_dropout" not in [layer.name for layer in model.layers]
    assert model.get_layer("dropout3").rate == 0.3
    conv = model.get_layer("conv1")
    # The paper's decay 0.001 on the gradient is l2(0.0005) on the loss.
    assert conv.kernel_regularizer.l2 == pytest.approx(0.0005)
    assert isinstance(conv.kernel_initializer, keras.initializers.GlorotUniform)
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]) == 9


def test_forward_pass_under_active_backend():
    model = build_model(seed=1)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    probabilities = keras.ops.convert_to_numpy(model(x, training=False))
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # Dropout is off at inference: two calls agree.
    np.testing.assert_array_equal(probabilities, keras.ops.convert_to_numpy(model(x, training=False)))


def test_unknown_variant():
    with pytest.raises(ConfigError, match="variant: .* is not one of paper, tutorial"):
        build_model("resnet")


def _with_batch_norm_statistics(model: keras.Model, rng: np.random.Generator) -> keras.Model:
    """Gives every batch norm statistics far from 0 and 1, and variances small enough that
    its epsilon (1e-3) changes the scale by 1-5%: a fold that forgot it is off by much more than 1e-5."""
    for layer in model.layers:
        # A RepConv sums its branches: each gets a share of the scale and offset, so the sum keeps them.
        branches = layer.norms() if isinstance(layer, RepConv) else [layer] if isinstance(layer, BatchNormalization) else []
        for norm in branches:
            channels = norm.gamma.shape[0]
            variance = rng.uniform(0.02, 0.1, channels)
            gamma = rng.uniform(0.7, 1.3, channels) * np.sqrt(variance)  # 0.1-0.4: keeps activations in range
            norm.set_weights([gamma / len(branches), (rng.uniform(-0.4, 0.4, channels) + 0.3) / len(branches),
                              rng.uniform(-0.5, 0.5, channels) - 0.3, variance])
    # Activations grow through nine such layers; a small last gamma keeps the softmax from saturating.
    last = batch_norms(model)[-1]  # the classifier's (a 1x1 conv to the classes: one branch)
    last.gamma.assign(last.gamma * 0.05)
    return model


@pytest.mark.parametrize("reparam", [False, True], ids=["batch_norm", "reparam"])
@pytest.mark.parametrize("variant", FOLD_VARIANTS)
def test_fold_batch_norm_gives_the_plain_network_with_the_same_outputs(variant, reparam):
    rng = np.random.default_rng(0)
    normed = _with_batch_norm_statistics(build_model(variant, batch_norm=True, reparam=reparam, seed=0), rng)
    folded = fold_batch_norm(normed)
    plain = build_model(variant)
    assert [layer.name for layer in folded.layers] == [layer.name for layer in plain.layers]
    assert folded.count_params() == plain.count_params()
    x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(normed(x, training=False))
    assert np.median(expected.max(axis=1)) < 0.9  # not saturated: the comparison means something
    np.testing.assert_allclose(keras.ops.convert_to_numpy(folded(x, training=False)), expected, atol=1e-5)
    # The check is sharp enough to catch a fold that leaves epsilon out.
    for layer in batch_norms(normed):
        layer.epsilon = 0.0
    without_epsilon = keras.ops.convert_to_numpy(normed(x, training=False))
    assert np.abs(without_epsilon - expected).max() > 1e-4  # ten times the tolerance above


def test_reparam_branches_are_repvggs():
    """A 1x1 branch beside each 3x3 conv; the identity where the conv keeps the channels at stride 1
    (centre-cropped for the valid conv7); one conv alone for the classifier."""
    model = build_model(batch_norm=True, reparam=True)
    convs = [layer for layer in model.layers if isinstance(layer, RepConv)]
    assert [(layer.name, layer.pointwise is not None, layer.identity, len(layer.norms())) for layer in convs] == [
        ("conv1", True, False, 2), ("conv2", True, True, 3), ("conv3", True, False, 2),
        ("conv4", True, False, 2), ("conv5", True, True, 3), ("conv6", True, False, 2),
        ("conv7", True, True, 3), ("conv8", False, True, 2), ("conv9", False, False, 1)]
    assert len(batch_norms(model)) == 20
    assert model.output_shape == build_model().output_shape


def test_reparam_needs_batch_norm():
    with pytest.raises(ConfigError, match="reparam: .* needs batch_norm"):
        build_model(reparam=True)


def test_reparam_weights_save_and_load(tmp_path):
    rng = np.random.default_rng(5)
    saved = _with_batch_norm_statistics(build_model(batch_norm=True, reparam=True, seed=0), rng)
    saved.save_weights(tmp_path / "rep.weights.h5")
    loaded = build_model(batch_norm=True, reparam=True, seed=1)
    loaded.load_weights(tmp_path / "rep.weights.h5")
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)),
                                  keras.ops.convert_to_numpy(saved(x, training=False)))


def test_fold_batch_norm_refuses_a_network_without_it():
    with pytest.raises(ConfigError, match="no batch norm to fold"):
        fold_batch_norm(build_model())


def test_our_batch_norm_computes_what_keras_does_in_training_and_inference(monkeypatch):
    """Under TensorFlow ours runs the fused kernel; under other backends it is Keras' own."""
    fused_calls = []
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        fused = tf.compat.v1.nn.fused_batch_norm
        monkeypatch.setattr(tf.compat.v1.nn, "fused_batch_norm",
                            lambda *args, **kwargs: fused_calls.append(kwargs["is_training"]) or fused(*args, **kwargs))
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(8, 6, 6, 5)).astype("float32")
    weights = [rng.uniform(0.5, 2, 5), rng.uniform(-1, 1, 5), np.full(5, 0.5), np.full(5, 4.0)]
    ours, theirs = BatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    for layer in (ours, theirs):
        layer.build(x.shape)
        layer.set_weights(weights)
    for training in (False, True):  # inference first: training moves the statistics inference uses
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x, training=training)),
                                   keras.ops.convert_to_numpy(theirs(x, training=training)), atol=1e-4)
    assert fused_calls == ([False, True] if keras.backend.backend() == "tensorflow" else [])
    # The moving statistics move alike.
    for mine, keras_own in zip(ours.get_weights()[2:], theirs.get_weights()[2:]):
        np.testing.assert_allclose(mine, keras_own, rtol=1e-5)


def test_batch_norm_weights_load_across_keras_and_our_layer(tmp_path):
    model = build_model(batch_norm=True)
    assert all(type(layer) is BatchNormalization for layer in model.layers if "bn" in layer.name)
    plain_keras = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.BatchNormalization()])
    ours = keras.Sequential([keras.Input((4, 4, 3)), BatchNormalization()])
    plain_keras.layers[0].moving_mean.assign([1.0, 2.0, 3.0])
    plain_keras.save_weights(tmp_path / "keras.weights.h5")
    ours.load_weights(tmp_path / "keras.weights.h5")
    np.testing.assert_array_equal(ours.layers[0].moving_mean.numpy(), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("reparam", [False, True], ids=["batch_norm", "reparam"])
@pytest.mark.parametrize("variant", FOLD_VARIANTS)
def test_unfold_batch_norm_starts_equal_to_the_plain_network_and_folds_back(variant, reparam):
    rng = np.random.default_rng(1)
    plain = build_model(variant, seed=0)
    for conv in (layer for layer in plain.layers if isinstance(layer, keras.layers.Conv2D)):
        conv.bias.assign(rng.normal(0.0, 0.1, conv.bias.shape))  # not 0: the unfold must place them
    images = rng.normal(0.3, 1.2, size=(64, 32, 32, 3)).astype("float32")
    # Training mode below: no dropout.
    normed = build_model(variant, batch_norm=True, reparam=reparam, input_dropout=0.0, dropout=0.0)
    with warnings.catch_warnings():  # Keras warns when a model's inputs and the call's differ in structure
        warnings.simplefilter("error")
        unfold_batch_norm(plain, normed, images, batch_size=24)
    expected = keras.ops.convert_to_numpy(plain(images, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(normed(images, training=False)), expected, atol=1e-5)
    # The statistics are those of the images given: in training mode (batch statistics) it is close too.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(normed(images, training=True)), expected, atol=1e-3)
    assert min(norm.moving_variance.numpy().min() for norm in batch_norms(normed)) > 0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fold_batch_norm(normed)(images, training=False)),
                               expected, atol=1e-5)


def test_refresh_batch_norm_averages_the_batch_statistics_with_dropout_off():
    rng = np.random.default_rng(4)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, name="conv1"),
                              BatchNormalization(name="bn1"), keras.layers.ReLU(), keras.layers.Dropout(0.5),
                              keras.layers.Conv2D(2, 3, name="conv2"), BatchNormalization(name="bn2")])
    for norm in (model.get_layer("bn1"), model.get_layer("bn2")):
        channels = norm.gamma.shape[0]  # stale statistics, and a gamma and beta that matter
        norm.set_weights([rng.uniform(0.5, 2, channels), rng.uniform(-1, 1, channels),
                          np.full(channels, 9.0), np.full(channels, 9.0)])
    images = rng.normal(1.0, 2.0, size=(24, 6, 6, 3)).astype("float32")

    refresh_batch_norm(model, images, batch_size=8)

    def moments(x):  # per channel, over a batch: the biased variance, as Keras keeps it
        x = np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)
        return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))

    expected = {"bn1": [], "bn2": []}
    for batch in np.split(images, 3):  # by hand: bn1 normalizes by its batch's statistics, no dropout
        conv1 = model.get_layer("conv1")(batch)
        mean, variance = moments(conv1)
        gamma, beta = (w.numpy() for w in (model.get_layer("bn1").gamma, model.get_layer("bn1").beta))
        normed = np.maximum(gamma * (conv1 - mean) / np.sqrt(variance + 1e-3) + beta, 0).astype("float32")
        expected["bn1"].append((mean, variance))
        expected["bn2"].append(moments(model.get_layer("conv2")(normed)))
    for name, per_batch in expected.items():
        norm = model.get_layer(name)
        np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean([m for m, _ in per_batch], axis=0), atol=1e-4)
        np.testing.assert_allclose(norm.moving_variance.numpy(), np.mean([v for _, v in per_batch], axis=0),
                                   rtol=1e-4)
        assert norm.momentum == 0.99
