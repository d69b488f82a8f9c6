import keras
import numpy as np
import pytest

from allcnn.config import ConfigError
from allcnn.model import build_model

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
