"""The networks of Springenberg et al. (ICLR 2015), All-CNN-C first, as Keras 3 models.

Only Keras APIs are used, so the same model runs under the TensorFlow, JAX and
PyTorch backends. `load_classifier` builds it with trained weights, ready for inference.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

from allcnn import hardware
from allcnn.config import PRECISIONS, VARIANTS, ConfigError, canonical_variant, model_name, variant_of
from allcnn.inference import DEFAULT_PRECISION, Classifier
from allcnn.manifest import WeightsSpec, resolve_weights
from allcnn.weights_io import load_weights


@dataclass(frozen=True)
class Conv:
    """A convolution, followed by a ReLU where `relu`; `filters=None` means one per class."""

    filters: int | None
    kernel: int
    strides: int = 1
    padding: str = "same"
    relu: bool = True


@dataclass(frozen=True)
class Pool:
    """The paper's max-pooling: 3x3, stride 2."""

    strides: int = 2


# Table 1: the convs of each of the two stages of base models A, B and C, as (filters, kernel);
# a max-pooling follows each stage.
_STAGES = {
    "a": [[(96, 5)], [(192, 5)]],
    "b": [[(96, 5), (96, 1)], [(192, 5), (192, 1)]],
    "c": [[(96, 3), (96, 3)], [(192, 3), (192, 3)]],
}
# The top every network shares (Table 1): a valid 3x3 conv (8x8 -> 6x6 on CIFAR), a 1x1 conv and
# the 1x1 conv to the classes, then global average pooling and the softmax.
_TOP = [Conv(192, 3, padding="valid"), Conv(192, 1), Conv(None, 1)]
# The paper's dropout on the input is 20%; the tutorial has none.
_DEFAULT_INPUT_DROPOUT = {"tutorial": 0.0}


def _stage(convs: list[Conv], kind: str) -> list[Conv | Pool]:
    """One stage of a network of Table 2, from its base model's convs: `model` keeps the
    max-pooling; `strided-cnn` drops it and gives the conv before it stride 2; `convpool-cnn`
    puts a 3x3 conv (the pooling's size) before it; `all-cnn` replaces it by that conv with stride 2."""
    extra = Conv(convs[-1].filters, 3)
    return {"model": [*convs, Pool()],
            "strided-cnn": [*convs[:-1], dataclasses.replace(convs[-1], strides=2)],
            "convpool-cnn": [*convs, extra, Pool()],
            "all-cnn": [*convs, dataclasses.replace(extra, strides=2)]}[kind]


def _tutorial(specs: list[Conv]) -> list[Conv]:
    """The popular Keras tutorial's All-CNN-C: 'same' padding throughout, and no ReLU after the two
    stride-2 convs nor after the classifier. Its HDF5 weights load into it."""
    last = len(specs) - 1
    return [dataclasses.replace(conv, padding="same", relu=conv.strides == 1 and i < last) for i, conv in enumerate(specs)]


def network_layers(variant: str) -> list[Conv | Pool]:
    """The convs and max-poolings of a variant, input to classifier."""
    variant = canonical_variant(variant)
    if variant == "tutorial":
        return _tutorial(network_layers("paper"))
    kind, family = ("all-cnn-c" if variant == "paper" else variant).rsplit("-", 1)
    stages = [_stage([Conv(filters, kernel) for filters, kernel in convs], kind) for convs in _STAGES[family]]
    return [spec for stage in stages for spec in stage] + _TOP


def classifier_layer(model: keras.Model) -> str:
    """The name of the classifier, the last conv (1x1 to the classes): the one layer whose shape
    depends on the classes. Transfer learning replaces it (and its batch norm, if any)."""
    return [layer.name for layer in model.layers if isinstance(layer, layers.Conv2D)][-1]


# Keeps the class name: Keras names a layer's weights in a .weights.h5 file after its class,
# so files saved with keras.layers.BatchNormalization load into this one and back.
@keras.saving.register_keras_serializable(package="allcnn")
class BatchNormalization(layers.BatchNormalization):
    """Keras' batch norm, computed by TensorFlow's fused kernel under the TensorFlow backend.

    Keras 3 casts bf16 activations to float32 and normalizes in separate ops (moments,
    then the affine map): with it a batch-norm All-CNN-C trained 190 images/s where the plain
    network trains 507 (`allcnn train`'s step, Intel Xeon with AMX, bf16, batch 128, 2 cores).
    TensorFlow's fused kernel takes the bf16 activations as they are: 381. Same variables, same
    results to float rounding; other backends, masks and renorm use Keras' own code. Under op
    determinism TensorFlow swaps in a slow kernel (75 images/s), so batch-norm runs go without it.
    """

    def call(self, inputs, training=None, mask=None):
        channels_last = len(inputs.shape) == 4 and self.axis in (-1, 3)
        if keras.backend.backend() != "tensorflow" or mask is not None or self.renorm or not channels_last:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        gamma, beta = (ops.cast(weight, "float32") for weight in (self.gamma, self.beta))
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
            # TensorFlow's batch variance has Bessel's correction; Keras' moving average has none.
            count = ops.cast(ops.size(inputs) // ops.shape(inputs)[-1], "float32")
            variance = variance * (count - 1.0) / count
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, mean=ops.cast(self.moving_mean, "float32"),
                variance=ops.cast(self.moving_variance, "float32"), epsilon=self.epsilon,
                data_format="NHWC", is_training=False)
        return ops.cast(outputs, self.compute_dtype)


def _fold(kernel: np.ndarray, bias, norm: layers.BatchNormalization) -> tuple[np.ndarray, np.ndarray]:
    """A conv's kernel and bias with the batch norm after it folded in (float64): in inference mode
    the batch norm is `s * (x - moving_mean) + beta`, `s = gamma / sqrt(moving_variance + epsilon)`."""
    gamma, beta, mean, variance = (np.asarray(w, dtype=np.float64) for w in norm.get_weights())
    scale = gamma / np.sqrt(variance + norm.epsilon)
    return kernel * scale, beta + (bias - mean) * scale


def _start_norm(norm: layers.BatchNormalization, mean: np.ndarray, variance: np.ndarray, bias=0.0) -> None:
    """Sets a batch norm to pass a plain conv's outputs (channel statistics `mean`, `variance`) on
    unchanged in inference mode, where the conv before it computes them without `bias`: the moving
    statistics are those of its own outputs, `gamma = sqrt(variance + epsilon)` and `beta = mean`."""
    norm.set_weights([np.sqrt(variance + norm.epsilon), mean, mean - bias, variance])


def _centres(size: int, kernel: int, strides: int, padding: str) -> slice:
    """The input pixels at the centres of a conv's windows along one axis, as Keras pads them."""
    out = -(-size // strides) if padding == "same" else (size - kernel) // strides + 1
    before = max((out - 1) * strides + kernel - size, 0) // 2 if padding == "same" else 0
    first = kernel // 2 - before
    return slice(first, first + (out - 1) * strides + 1, strides)


@keras.saving.register_keras_serializable(package="allcnn")
class RepConv(layers.Layer):
    """A conv trained as a sum of batch-normed branches that fold into one conv (RepVGG, Ding et al. 2021).

    The branches: the conv itself; for a 3x3 conv, a 1x1 conv on the centre pixel of each of its
    windows; where the conv keeps the channel count at stride 1, that centre pixel itself (the
    identity). Each branch is linear in the input and has its own batch norm, so in inference mode
    the layer is one conv with a bias (`fold`): the plain network's conv, which trains differently
    (the branches precondition its steps) but infers the same. RepVGG's plain ImageNet network
    gained 2.7 points top-1 from these branches.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, padding: str = "same",
                 identity: bool = False, kernel_initializer="he_normal", kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides, self.padding = filters, kernel_size, strides, padding
        self.identity = identity
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        conv = lambda size, name, **kwargs: layers.Conv2D(  # noqa: E731
            filters, size, use_bias=False, kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer, dtype=self.dtype_policy, name=name, **kwargs)
        norm = lambda name: BatchNormalization(dtype=self.dtype_policy, name=name)  # noqa: E731
        # Each sublayer is held by an attribute of its own name, under which Keras saves it.
        self.conv = conv(kernel_size, "conv", strides=strides, padding=padding)
        self.pointwise = conv(1, "pointwise") if kernel_size > 1 else None  # on the centres: stride 1
        self.conv_bn = norm("conv_bn")
        self.pointwise_bn = norm("pointwise_bn") if self.pointwise is not None else None
        self.identity_bn = norm("identity_bn") if identity else None

    # Methods, not properties: Keras saves the layers that any attribute or property returns.
    def sublayers(self) -> list[layers.Layer]:
        """The sublayers in the order of `self.weights` (the order they were assigned in)."""
        return [layer for layer in (self.conv, self.pointwise, self.conv_bn, self.pointwise_bn, self.identity_bn)
                if layer is not None]

    def norms(self) -> list[BatchNormalization]:
        """The branches' batch norms: the conv's, the 1x1 conv's, the identity's (those there are)."""
        return [layer for layer in self.sublayers() if isinstance(layer, BatchNormalization)]

    def build(self, input_shape):
        _, height, width, channels = input_shape
        if self.identity and channels != self.filters:
            raise ValueError(f"{self.name}: an identity branch needs {self.filters} input channels, got {channels}")
        self._rows, self._cols = (_centres(n, self.kernel_size, self.strides, self.padding) for n in (height, width))
        self.conv.build(input_shape)
        centre_shape = (None, len(range(height)[self._rows]), len(range(width)[self._cols]), channels)
        if self.pointwise is not None:
            self.pointwise.build(centre_shape)
        for norm in self.norms():
            norm.build((*centre_shape[:3], self.filters))

    def call(self, inputs, training=None):
        centres = inputs[:, self._rows, self._cols, :]
        branches = [self.conv(inputs)] + ([self.pointwise(centres)] if self.pointwise is not None else [])
        branches += [centres] * self.identity
        return sum(norm(branch, training=training) for norm, branch in zip(self.norms(), branches))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def _kernels(self) -> list[np.ndarray]:
        """Each branch's map as a full-size kernel (float64), in the order of `norms`."""
        centre = np.zeros((self.kernel_size, self.kernel_size, 1, 1))
        centre[self.kernel_size // 2, self.kernel_size // 2] = 1.0
        kernels = [np.asarray(self.conv.get_weights()[0], dtype=np.float64)]
        if self.pointwise is not None:
            kernels.append(centre * np.asarray(self.pointwise.get_weights()[0], dtype=np.float64))
        if self.identity:
            kernels.append(centre * np.eye(self.filters))
        return kernels

    def fold(self) -> tuple[np.ndarray, np.ndarray]:
        """The kernel and bias of the one conv this layer computes in inference mode (float64):
        each branch's batch norm folded into its kernel (as `fold_batch_norm`), then summed."""
        kernels, biases = zip(*(_fold(kernel, 0.0, norm) for kernel, norm in zip(self._kernels(), self.norms())))
        return sum(kernels), sum(biases)

    def start_from(self, kernel: np.ndarray, bias: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> None:
        """Makes the layer compute the plain conv `kernel`, `bias` in inference mode, for a run that
        goes on from plain weights (`unfold_batch_norm`; `mean`, `variance`: the statistics of that
        conv's outputs). The conv branch gets them and its batch norm their statistics; the other
        branches start switched off (gamma and beta 0), and training grows them from there."""
        self.conv.set_weights([kernel])
        _start_norm(self.conv_bn, mean, variance, bias)  # the branch's conv has no bias
        for norm in self.norms()[1:]:
            norm.set_weights([np.zeros(self.filters)] * 3 + [np.ones(self.filters)])

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "identity": self.identity,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer)}


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
    reparam: bool = False,
    seed: int | None = None,
) -> keras.Sequential:
    """Builds one of the paper's networks, All-CNN-C by default.

    Args:
        variant: `"paper"` (All-CNN-C as in the paper; `"all-cnn-c"` is the same), `"tutorial"`
            (the layout of the popular Keras tutorial, whose HDF5 weights load into it), or a
            network of the paper's Tables 1-2: `"model-a"`, `"strided-cnn-a"`, `"convpool-cnn-a"`,
            `"all-cnn-a"`, the same for `b` and `c` (see `allcnn.config.VARIANTS`).
        classes: number of output classes.
        input_shape: shape of one image, channels last.
        input_dropout: dropout rate on the input; `None` means the variant's
            default (0.2 as in the paper, none for `tutorial`).
        dropout: dropout rate after each max-pooling, or the stride-2 conv in its place.
        weight_decay: the paper's weight decay. Keras' `l2(l)` adds
            `l * sum(w**2)` to the loss, whose gradient is `2 * l * w`, while
            the paper's (Caffe's) decay adds `weight_decay * w` to the
            gradient, so the kernels get `l2(weight_decay / 2)`.
        kernel_initializer: any Keras initializer name.
        batch_norm: extension, not in the paper: batch normalization after
            each convolution (before its ReLU).
        reparam: extension, with `batch_norm`: each conv trains as RepVGG's branches (`RepConv`),
            which `fold_batch_norm` folds into the plain conv.
        seed: seed for the dropout layers' random streams.

    Returns:
        An uncompiled `keras.Sequential` whose last layer is a float32 softmax,
        as Keras recommends for mixed precision. Its layers are named `conv1`, `bn1`, `relu1`...
        by conv, and the max-pooling and dropout after conv `i` are `pool{i}` and `dropout{i}`.
        Its weights are random: load saved ones with `allcnn.weights_io.load_weights(model, path)`,
        which reads every format (this module stays free of file formats).
    """
    if variant not in VARIANTS:
        raise ConfigError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    if input_dropout is None:
        input_dropout = _DEFAULT_INPUT_DROPOUT.get(variant, 0.2)
    if reparam and not batch_norm:
        raise ConfigError("reparam: the branches are batch-normed: it needs batch_norm")
    regularizer = keras.regularizers.l2(weight_decay / 2) if weight_decay else None

    model = keras.Sequential(name=model_name(variant))
    model.add(keras.Input(shape=input_shape))
    if input_dropout:
        model.add(layers.Dropout(input_dropout, seed=_offset(seed, 0), name="input_dropout"))
    index, channels = 0, input_shape[-1]  # the convs so far (layers are named after the last one), their output
    for spec in network_layers(variant):
        if isinstance(spec, Pool):
            model.add(layers.MaxPooling2D(3, strides=spec.strides, padding="same", name=f"pool{index}"))
        else:
            index, filters = index + 1, spec.filters or classes
            if reparam:
                model.add(RepConv(filters, spec.kernel, spec.strides, spec.padding,
                                  identity=filters == channels and spec.strides == 1,
                                  kernel_initializer=kernel_initializer, kernel_regularizer=regularizer,
                                  name=f"conv{index}"))
            else:
                model.add(layers.Conv2D(filters, spec.kernel, strides=spec.strides, padding=spec.padding,
                                        kernel_initializer=kernel_initializer, kernel_regularizer=regularizer,
                                        name=f"conv{index}"))
                if batch_norm:
                    model.add(BatchNormalization(name=f"bn{index}"))
            channels = filters
            if spec.relu:
                model.add(layers.ReLU(name=f"relu{index}"))
        if spec.strides == 2 and dropout:
            model.add(layers.Dropout(dropout, seed=_offset(seed, index), name=f"dropout{index}"))
    model.add(layers.GlobalAveragePooling2D(name="global_average_pooling"))
    model.add(layers.Activation("softmax", dtype="float32", name="predictions"))
    return model


def base_layers(model: keras.Model) -> list:
    """The layers before the classifier (`classifier_layer`): the features that transfer to other classes."""
    names = [layer.name for layer in model.layers]
    return model.layers[: names.index(classifier_layer(model))]


def freeze_base(model: keras.Model) -> None:
    """Makes the base untrainable, so that training fits the classifier alone (feature
    extraction); batch norm layers in it then also run in inference mode, as Keras does.
    Its dropout layers stay on while training, unlike the Keras guide's `base(x, training=False)`:
    on the frozen features they regularize the small classifier, as augmentation would."""
    for layer in base_layers(model):
        layer.trainable = False


def batch_norms(model: keras.Model) -> list:
    """The model's batch norm layers, in order, those of `RepConv` branches included (none in a plain network)."""
    return [norm for layer in model.layers
            for norm in (layer.norms() if isinstance(layer, RepConv) else [layer])
            if isinstance(norm, layers.BatchNormalization)]


def fold_batch_norm(model: keras.Sequential) -> keras.Sequential:
    """The same network without batch norm: each batch norm folded into the conv before it.

    In inference mode a batch norm between a conv and its ReLU is a per-channel affine map
    of the conv's output, so it folds exactly into that conv: with
    `s = gamma / sqrt(moving_variance + epsilon)`, the kernel becomes `kernel * s` (on the
    output-channel axis) and the bias `beta + (bias - moving_mean) * s`. The result *is* the plain
    network layer for layer (conv + bias + ReLU), so `build_model(variant)` loads its
    weights, and guided backpropagation finds each ReLU right after its conv.

    A `RepConv` (`reparam=True`) folds each branch's batch norm so, then sums the branches' kernels.

    Args:
        model: a `build_model(..., batch_norm=True)` network with its trained weights.

    Returns:
        A new `build_model(variant, batch_norm=False)` network (same classes, input shape
        and dropout rates), built under the global dtype policy; the fold is computed in
        float64 from the float32 variables.
    """
    if not batch_norms(model):
        raise ConfigError(f"{model.name} has no batch norm to fold")
    variant = variant_of(model.name)
    names = [layer.name for layer in model.layers]
    rates = {name: model.get_layer(name).rate for name in names if name.startswith(("input_dropout", "dropout"))}
    folded = build_model(
        variant,
        classes=model.output_shape[-1],
        input_shape=tuple(model.input_shape[1:]),
        input_dropout=rates.get("input_dropout", 0.0),
        dropout=next((rate for name, rate in rates.items() if name != "input_dropout"), 0.0),
    )
    for conv in (layer for layer in folded.layers if isinstance(layer, layers.Conv2D)):
        source = model.get_layer(conv.name)
        if isinstance(source, RepConv):
            conv.set_weights(source.fold())
        else:
            kernel, bias = (np.asarray(w, dtype=np.float64) for w in source.get_weights())
            conv.set_weights(_fold(kernel, bias, model.get_layer(conv.name.replace("conv", "bn"))))
    return folded


def unfold_batch_norm(plain: keras.Sequential, into: keras.Sequential, images: np.ndarray,
                      batch_size: int = 250) -> None:
    """Loads a plain network into its batch-norm twin `into` so that both compute the same.

    The inverse of `fold_batch_norm`, for a batch-norm run that goes on from plain weights
    (the shipped ones): each conv keeps its kernel and bias, and its batch norm gets the
    statistics of that conv's outputs on `images` (preprocessed network inputs) as its moving
    mean and variance, with `gamma = sqrt(variance + epsilon)` and `beta = mean`. In inference
    mode each batch norm is then the identity, so the run starts equal to the plain network;
    in training mode it normalizes with batch statistics close to these, so it starts near it.
    A `RepConv` (`reparam=True`) starts as its conv branch so (`RepConv.start_from`).
    """
    convs = [layer for layer in plain.layers if isinstance(layer, layers.Conv2D)]
    probe = keras.Model(plain.inputs[0], [conv.output for conv in convs])  # one input, called with one array: no warning
    # Per conv: the count of output values per channel, their sum and their sum of squares (float64).
    moments = [np.zeros((3, conv.filters)) for conv in convs]
    for start in range(0, len(images), batch_size):
        for moment, output in zip(moments, probe(images[start:start + batch_size], training=False)):
            values = np.asarray(keras.ops.convert_to_numpy(output), dtype=np.float64).reshape(-1, moment.shape[1])
            moment += [np.full(moment.shape[1], len(values)), values.sum(axis=0), np.square(values).sum(axis=0)]
    for conv, (count, total, square) in zip(convs, moments):
        mean = total / count
        variance = np.maximum(square / count - np.square(mean), 0.0)
        target = into.get_layer(conv.name)
        if isinstance(target, RepConv):
            target.start_from(*conv.get_weights(), mean, variance)
        else:
            target.set_weights(conv.get_weights())
            _start_norm(into.get_layer(conv.name.replace("conv", "bn")), mean, variance)


def refresh_batch_norm(model: keras.Sequential, images: np.ndarray, batch_size: int = 128) -> None:
    """Sets each batch norm's moving mean and variance to the statistics that the weights in
    the model now produce, averaged over the batches of `images` (PyTorch's `swa_utils.update_bn`).

    For averaged weights (Keras' `SGD(use_ema=True)` averages the trainable ones only), whose
    moving statistics were gathered by the trained weights and no longer match them. Each batch
    goes through the network with the batch norms in training mode, so every layer sees inputs
    normalized as in training, and everything else in inference mode: no dropout. `images`:
    preprocessed network inputs, training images augmented as in training. The network learnt
    to expect the statistics of those: refreshed on unaugmented ones instead, a network trained
    with cutout 16 lost 1.4 points of validation accuracy (docs/training.md).
    """
    norms = batch_norms(model)
    momenta = [norm.momentum for norm in norms]
    try:
        for step, start in enumerate(range(0, len(images), batch_size)):
            for norm in norms:  # moving = the running mean of the batch statistics so far
                norm.momentum = step / (step + 1)
            outputs = images[start:start + batch_size]
            for layer in model.layers:
                outputs = layer(outputs, training=isinstance(layer, (layers.BatchNormalization, RepConv)))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


def load_classifier(
    weights: str | os.PathLike | WeightsSpec | None = None,
    *,
    variant: str | None = None,
    preprocessing_json: str | os.PathLike | None = None,
    precision: str = DEFAULT_PRECISION,
    device: str = "auto",
    weights_dir: str | os.PathLike | None = None,
) -> Classifier:
    """Resolves the weights (see `resolve_weights`; a `WeightsSpec` is taken as resolved),
    builds the model and loads them.

    Weights of a network trained with batch norm come back folded (`fold_batch_norm`):
    the same probabilities (to float32 rounding) from the plain All-CNN-C.

    Raises:
        WeightsError, DeviceError, ConfigError: with a one-line message.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    spec = weights if isinstance(weights, WeightsSpec) else resolve_weights(
        weights, variant=variant, preprocessing_json=preprocessing_json, weights_dir=weights_dir)
    gpu = hardware.select_device(device)
    policy = hardware.choose_precision(gpu)[0] if precision == "auto" else precision
    with hardware.dtype_policy(policy):
        model = build_model(spec.variant, **spec.architecture)
        load_weights(model, spec.path)
        if spec.architecture.get("batch_norm"):
            # Batch norm was a training aid: folded, the network is the plain All-CNN-C, so
            # evaluate, predict, explain (ReLU right after each conv) and export see one graph.
            model = fold_batch_norm(model)
    return Classifier(model, spec.preprocessing, spec=spec, precision=policy, device=hardware.describe(gpu))
