"""A teacher for distillation: a small CIFAR network of another family, fast to train.

Every stage from the shipped All-CNN-C weights has stayed at ~91.3% validation, whatever its
schedule or regularization (docs/results.md): a network taught by its own predictions learns
nothing new. A teacher that is better than the student has something to teach. This one follows
airbench94 (Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds", 10 epochs on a GPU): a 2x2 conv that
whitens the input's patches (frozen, set from the training images' covariance), then three blocks
of conv, max-pooling, batch norm (no scale) and GELU (64, 256, 256 channels), max-pooled to the
classes; its 3x3 convs start as identities (dirac), its batch norm offsets learn 64x faster, and a
lookahead averages the weights through the run's end. Its alternating flips and its whitening bias
(trained for 3 epochs) are left out. An epoch costs about half an All-CNN-C one on a Zen 4 (bf16),
about as much as one on a Zen 3 (float32).

`train_teacher` writes a teacher folder: `teacher.keras` (the whole model, on inputs
preprocessed as `preprocessing.json` says) and `teacher.json` (its classes, the validation images
it held out, its augmentation, accuracy and time), which a run's `teacher` key can name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from allcnn import hardware
from allcnn.files import atomic_write, atomic_write_text
from allcnn.inference import Classifier
from allcnn.pipeline import CifarBatches, EpochSeeder
from allcnn.preprocessing import fit_preprocessing

WIDTHS = (64, 256, 256)
# Whitened patch directions: each of the 12 eigenvectors of 2x2x3 patches, and its negative (the GELU
# after the whitening keeps one sign of each).
WHITENING_FILTERS = 24
# Patches the covariance is taken from, and the ridge on its eigenvalues (of standardized pixels):
# airbench's; 10x and 100x larger ones did no better (+0.4, +0.2 points, one seed) on JPEG-rebuilt images.
WHITENING_PATCHES = 200_000
WHITENING_EPSILON = 5e-4
BN_MOMENTUM = 0.6


def whitening_kernel(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The (2, 2, 3, 24) kernel that whitens `images`' (preprocessed, float) 2x2 patches: their
    covariance's eigenvectors scaled by 1 / sqrt(eigenvalue + eps), and their negatives."""
    patches = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2))  # N, H-1, W-1, C, 2, 2
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)  # rows in the kernel's (h, w, c) order
    rng = np.random.default_rng(seed)
    patches = patches[rng.choice(len(patches), min(WHITENING_PATCHES, len(patches)), replace=False)]
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    filters = (eigenvectors / np.sqrt(eigenvalues + WHITENING_EPSILON)).T
    kernel = np.concatenate([filters, -filters]).reshape(WHITENING_FILTERS, 2, 2, 3).transpose(1, 2, 3, 0)
    return kernel.astype(np.float32)


def _conv(filters: int) -> layers.Conv2D:
    # PyTorch's default initialization (uniform, variance 1 / (3 fan_in)), which airbench's learning
    # rate and weight decay were tuned with; Keras' Glorot default is ~1.7x larger for 256 channels.
    init = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")
    return layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init)


def _block(x, filters: int):
    for pool in (True, False):
        x = _conv(filters)(x)
        if pool:
            x = layers.MaxPooling2D(2)(x)
        # airbench's: no scale (gamma), only an offset; statistics that follow the fast-moving weights
        # (momentum 0.6), which the lookahead averages along with them.
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, scale=False)(x)
        x = layers.Activation("gelu")(x)
    return x


def dirac_init(model: keras.Model) -> None:
    """Starts each 3x3 conv as the identity on its inputs' channels (its first `in` filters; the
    rest stay random): airbench's "implicit residual", which trains a plain stack like a ResNet."""
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer.kernel_size == (3, 3):
            kernel = layer.kernel.numpy()
            channels = min(kernel.shape[2], kernel.shape[3])
            kernel[:, :, :, :channels] = 0
            kernel[1, 1, np.arange(channels), np.arange(channels)] = 1
            layer.kernel.assign(kernel)


def build_teacher(whitening: np.ndarray, classes: int = 10, input_shape: tuple = (32, 32, 3)) -> keras.Model:
    """The teacher network, its first conv frozen at the `whitening` kernel, its 3x3 convs identities."""
    inputs = keras.Input(input_shape)
    whiten = layers.Conv2D(WHITENING_FILTERS, 2, trainable=False, name="whiten")
    x = layers.Activation("gelu")(whiten(inputs))
    for filters in WIDTHS:
        x = _block(x, filters)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(classes, use_bias=False)(x)
    # airbench's scale of the logits.
    x = layers.Rescaling(1 / 9)(x)
    outputs = layers.Activation("softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="airbench_teacher")
    whiten.set_weights([whitening, np.zeros(WHITENING_FILTERS, "float32")])
    dirac_init(model)
    return model


@keras.saving.register_keras_serializable("allcnn")
class Triangle(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's lr: from `start` x `lr` linearly up to `lr` at `peak` of the run, then down to `end` x `lr`."""

    def __init__(self, lr: float, steps: int, start: float = 0.2, peak: float = 0.23, end: float = 0.07):
        self.lr, self.steps, self.start, self.peak, self.end = lr, steps, start, peak, end

    def __call__(self, step):
        step = ops.cast(step, "float32")
        top = float(int(self.peak * self.steps))
        rise = self.start + (1 - self.start) * step / top
        fall = 1 + (self.end - 1) * (step - top) / (self.steps - top)
        return self.lr * ops.where(step < top, rise, ops.maximum(fall, self.end))

    def get_config(self):
        return {"lr": self.lr, "steps": self.steps, "start": self.start, "peak": self.peak, "end": self.end}


@keras.saving.register_keras_serializable("allcnn")
class BiasScaledSGD(keras.optimizers.SGD):
    """SGD whose batch norm offsets (beta) learn `bias_lr_scale` times faster, their weight decay
    unchanged (airbench's `bias_scaler`): without a scale, the offsets alone place each channel's ReLU-like cut."""

    def __init__(self, *args, bias_lr_scale: float = 64.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_lr_scale = bias_lr_scale

    def build(self, variables):
        super().build(variables)
        # Keys, not paths: under TensorFlow, update_step gets the backend's variables, which have none.
        self._offsets = {self._var_key(v) for v in variables if v.path.endswith("/beta")}

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._offsets:
            learning_rate = learning_rate * self.bias_lr_scale
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale}


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead: from `start_epoch` on, every `every` steps the network's weights and
    batch norm statistics move to an average of themselves, rho = `decay` ** `every` x
    (progress ** 3), which keeps the early run fast and averages strongly at its end; the network
    is set to the average at each epoch's end."""

    def __init__(self, total_steps: int, steps_per_epoch: int, start_epoch: int = 3, every: int = 5,
                 decay: float = 0.95):
        super().__init__()
        self.total_steps, self.start_step, self.every = total_steps, start_epoch * steps_per_epoch, every
        self.base_rho = decay**every
        self.step, self.variables, self.average = 0, [], None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step < self.start_step or self.step % self.every:
            return
        if self.average is None:
            # The float variables: weights and batch norm statistics, not the step counters.
            self.variables = [v for v in self.model.variables if "float" in str(v.dtype)]
            self.average = [ops.copy(v.value) for v in self.variables]
            return
        self._update(self.base_rho * (self.step / self.total_steps) ** 3)

    def on_epoch_end(self, epoch, logs=None):
        if self.average is not None:
            self._update(1.0)

    def _update(self, rho: float):
        for i, variable in enumerate(self.variables):
            self.average[i] = rho * self.average[i] + (1 - rho) * variable.value
            variable.assign(self.average[i])


def tta_probabilities(classifier: Classifier, images: np.ndarray) -> np.ndarray:
    """airbench's test-time augmentation, on uint8 `images`: the flip average (`tta="flip"`),
    averaged half and half with the flip averages of the images moved one pixel up-left and one
    down-right (reflected at the border)."""
    def mirrored(x):
        return classifier.probabilities(x, tta="flip")

    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    moved = (mirrored(padded[:, :h, :w]) + mirrored(padded[:, 2:, 2:])) / 2
    return (mirrored(images) + moved) / 2


def train_teacher(train: tuple, val: tuple, class_names: tuple[str, ...], out, *, held_out: dict,
                  epochs: int = 10, batch_size: int = 1024, lr: float = 1.5, momentum: float = 0.85,
                  weight_decay: float = 0.0089, label_smoothing: float = 0.2, translate: int = 2,
                  cutout: int = 0, seed: int = 0) -> dict:
    """Trains the teacher on `train` (uint8 images, int labels), validating on `val`, and writes
    the teacher folder `out`; returns `teacher.json`'s record. `held_out` (a `data.held_out_record`)
    names the validation images, which a student's run must hold out too.

    airbench94's recipe in Keras' terms: SGD-Nesterov at batch 1024 under its triangular lr, batch
    norm offsets at 64x the lr, lookahead, label smoothing, flips and translations (and `cutout`, as
    a run's). Its lr 11.5 and weight decay 0.0153 "per 1024 examples" are, for a mean loss and
    Keras' decoupled decay, lr = 11.5 / (1 + 1 / (1 - momentum)) = 1.5 and weight_decay =
    0.0153 / (11.5 (1 - momentum)) = 0.0089 (its coupled decay goes through the momentum).
    """
    keras.utils.set_random_seed(seed)
    prep = fit_preprocessing("standardize", train[0])
    one_hot = lambda y: keras.utils.to_categorical(y, len(class_names))  # noqa: E731
    batches = CifarBatches(train[0], one_hot(train[1]), prep, batch_size, shuffle=True, flip=True,
                           translate=translate, cutout=cutout, seed=seed)
    val_batches = CifarBatches(val[0], one_hot(val[1]), prep, 500)
    policy = hardware.resolve_precision("auto", None)[0]
    with hardware.dtype_policy(policy):
        model = build_teacher(whitening_kernel(prep(train[0][:5000]), seed), len(class_names), train[0].shape[1:])
        steps = epochs * len(batches)
        optimizer = BiasScaledSGD(Triangle(lr, steps), momentum=momentum, nesterov=True, weight_decay=weight_decay)
        model.compile(optimizer, keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                      metrics=["accuracy"])
        started = time.perf_counter()
        model.fit(batches, epochs=epochs, validation_data=val_batches, verbose=2,
                  callbacks=[EpochSeeder(batches, seed), Lookahead(steps, len(batches))])
        seconds = time.perf_counter() - started
    classifier = Classifier(model, prep)
    accuracy = lambda p: round(float(np.mean(p.argmax(axis=1) == val[1])), 4)  # noqa: E731
    record = {
        "network": "airbench-style teacher (allcnn.airbench)",
        "class_names": list(class_names),
        "held_out": held_out,
        "epochs": epochs,
        "augmentation": {"flip": True, "translate": translate, "cutout": cutout},
        "train_seconds": round(seconds, 1),
        "val_accuracy": accuracy(classifier.probabilities(val[0])),
        "val_accuracy_tta": accuracy(tta_probabilities(classifier, val[0])),
        "precision": policy,
        "machine": hardware.describe(None),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep.save(out / "preprocessing.json")
    with atomic_write(out / "teacher.keras", ".keras") as tmp:
        model.save(tmp)
    atomic_write_text(out / "teacher.json", json.dumps(record, indent=2) + "\n")
    return record
