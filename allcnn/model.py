"""All-CNN-C (Springenberg et al., ICLR 2015) as a Keras 3 model.

Only Keras APIs are used, so the same model runs under the TensorFlow, JAX and
PyTorch backends.
"""

from __future__ import annotations

import keras
from keras import layers

from allcnn.config import VARIANTS, ConfigError


# (filters, kernel, strides, padding, relu) for each convolution, per variant.
# "paper" follows Table 2 of the paper: ReLU everywhere and a valid 3x3 conv
# after the second stride-2 conv (8x8 -> 6x6). "tutorial" reproduces the
# popular Keras tutorial: 'same' padding throughout and no ReLU after the two
# stride-2 convs nor after the last 1x1 conv. Both have 1,369,738 parameters.
_CONVS = {
    "paper": [
        (96, 3, 1, "same", True),
        (96, 3, 1, "same", True),
        (96, 3, 2, "same", True),
        (192, 3, 1, "same", True),
        (192, 3, 1, "same", True),
        (192, 3, 2, "same", True),
        (192, 3, 1, "valid", True),
        (192, 1, 1, "valid", True),
        (None, 1, 1, "valid", True),
    ],
    "tutorial": [
        (96, 3, 1, "same", True),
        (96, 3, 1, "same", True),
        (96, 3, 2, "same", False),
        (192, 3, 1, "same", True),
        (192, 3, 1, "same", True),
        (192, 3, 2, "same", False),
        (192, 3, 1, "same", True),
        (192, 1, 1, "valid", True),
        (None, 1, 1, "valid", False),
    ],
}
_DEFAULT_INPUT_DROPOUT = {"paper": 0.2, "tutorial": 0.0}
# The classifier: the last 1x1 conv, the one layer whose shape depends on the classes.
# Transfer learning replaces it (and its batch norm, if any) and keeps the base before it.
HEAD = f"conv{len(_CONVS['paper'])}"


def _offset(seed: int | None, index: int) -> int | None:
    """Gives each dropout layer its own stream, reproducible from one seed."""
    return None if seed is None else seed * 100 + index


def build_model(
    variant: str = "paper",
    *,
    classes: int = 10,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    input_dropout: float | None = None,
    dropout: float = 0.5,
    weight_decay: float = 0.0,
    kernel_initializer: str = "he_normal",
    batch_norm: bool = False,
    seed: int | None = None,
) -> keras.Sequential:
    """Builds All-CNN-C.

    Args:
        variant: `"paper"` (the faithful network) or `"tutorial"` (the layout
            of the popular Keras tutorial, whose HDF5 weights load into it).
        classes: number of output classes.
        input_shape: shape of one image, channels last.
        input_dropout: dropout rate on the input; `None` means the variant's
            default (0.2 for `paper`, none for `tutorial`).
        dropout: dropout rate after each stride-2 convolution.
        weight_decay: the paper's weight decay. Keras' `l2(l)` adds
            `l * sum(w**2)` to the loss, whose gradient is `2 * l * w`, while
            the paper's (Caffe's) decay adds `weight_decay * w` to the
            gradient, so the kernels get `l2(weight_decay / 2)`.
        kernel_initializer: any Keras initializer name.
        batch_norm: extension, not in the paper: batch normalization after
            each convolution (before its ReLU).
        seed: seed for the dropout layers' random streams.

    Returns:
        An uncompiled `keras.Sequential` whose last layer is a float32 softmax,
        as Keras recommends for mixed precision. Its weights are random: load
        saved ones with `allcnn.weights_io.load_weights(model, path)`, which
        reads every format (this module stays free of file formats).
    """
    if variant not in _CONVS:
        raise ConfigError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    if input_dropout is None:
        input_dropout = _DEFAULT_INPUT_DROPOUT[variant]
    regularizer = keras.regularizers.l2(weight_decay / 2) if weight_decay else None

    model = keras.Sequential(name=f"allcnn_c_{variant}")
    model.add(keras.Input(shape=input_shape))
    if input_dropout:
        model.add(layers.Dropout(input_dropout, seed=_offset(seed, 0), name="input_dropout"))
    for index, (filters, kernel, strides, padding, relu) in enumerate(_CONVS[variant], 1):
        model.add(
            layers.Conv2D(
                filters or classes,
                kernel,
                strides=strides,
                padding=padding,
                kernel_initializer=kernel_initializer,
                kernel_regularizer=regularizer,
                name=f"conv{index}",
            )
        )
        if batch_norm:
            model.add(layers.BatchNormalization(name=f"bn{index}"))
        if relu:
            model.add(layers.ReLU(name=f"relu{index}"))
        if strides == 2 and dropout:
            model.add(layers.Dropout(dropout, seed=_offset(seed, index), name=f"dropout{index}"))
    model.add(layers.GlobalAveragePooling2D(name="global_average_pooling"))
    model.add(layers.Activation("softmax", dtype="float32", name="predictions"))
    return model


def base_layers(model: keras.Model) -> list:
    """The layers before the classifier (`HEAD`): the features that transfer to other classes."""
    names = [layer.name for layer in model.layers]
    return model.layers[: names.index(HEAD)]


def freeze_base(model: keras.Model) -> None:
    """Makes the base untrainable, so that training fits the classifier alone (feature
    extraction); batch norm layers in it then also run in inference mode, as Keras does.
    Its dropout layers stay on while training, unlike the Keras guide's `base(x, training=False)`:
    on the frozen features they regularize the small classifier, as augmentation would."""
    for layer in base_layers(model):
        layer.trainable = False
