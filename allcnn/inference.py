"""The fast inference path shared by `evaluate` and `predict`.

`Classifier` bundles a model, its preprocessing and a compiled forward pass,
and maps uint8 images to float32 class probabilities in batches.

Precision: the default is `auto`: mixed_bfloat16 where the hardware has bf16
natively (a CPU with avx512_bf16/amx_bf16, a GPU of compute capability >= 8.0),
float32 elsewhere — never emulated bf16, which is many times slower. Measured
on an AVX-512 BF16 EPYC with the weights shipped before (stages 1-2) on the 10,000 test
images: bf16 top-1 85.41% vs float32 85.39% (+0.02 points, loss 0.4583 vs 0.4580)
at 1,452 vs 775 images/s. `--precision float32` gives the exact figures the
manifest records (they were measured in float32).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import numpy as np

from allcnn.config import TTA_MODES, ConfigError
from allcnn.data import CLASS_NAMES
from allcnn.manifest import WeightsSpec
from allcnn.preprocessing import Preprocessing

DEFAULT_PRECISION = "auto"
DEFAULT_BATCH_SIZE = 256
# A command shows a progress bar for at least this many images: fewer finish at once.
PROGRESS_MIN_IMAGES = 100


class Progress:
    """Keras' `Progbar` over `total` images, on stderr (stdout keeps the results, which
    may be piped) and only when stderr is a terminal; otherwise it does nothing."""

    def __init__(self, total: int, enabled: bool = True):
        self._bar, self._done = None, 0
        if enabled and total >= PROGRESS_MIN_IMAGES and sys.stderr.isatty():
            import keras

            with contextlib.redirect_stdout(sys.stderr):  # Progbar writes to sys.stdout
                self._bar = keras.utils.Progbar(total, unit_name="image")

    def add(self, images: int) -> None:
        """Counts `images` more as done."""
        if self._bar is not None:
            self._done += images
            with contextlib.redirect_stdout(sys.stderr):
                self._bar.update(self._done)


def compile_forward(model) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled `model(x, training=False)` returning float32 numpy probabilities.

    Under TensorFlow a `tf.function` with a fixed input signature (any batch
    size) traces once, and skips the per-call overhead of `model.predict`.
    Other backends use `predict_on_batch`, which Keras compiles for them.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return lambda x: np.asarray(model.predict_on_batch(x), dtype=np.float32)
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
    forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return lambda x: np.asarray(forward(x), dtype=np.float32)


class Classifier:
    """A model ready for inference on uint8 images (N, S, S, 3), S = `image_size` (CIFAR's 32).

    Args:
        model: a built Keras model ending in softmax.
        preprocessing: the training preprocessing, replayed on every batch.
        spec: where the weights came from (for reports), if known.
        precision: the dtype policy the model was built under.
        device: the device description (for reports).
    """

    def __init__(self, model, preprocessing: Preprocessing, *, spec: WeightsSpec | None = None,
                 precision: str = DEFAULT_PRECISION, device: str = ""):
        self.model, self.preprocessing, self.spec = model, preprocessing, spec
        self.precision, self.device = precision, device
        # Preprocessed inputs (a training batch as augmented, for a teacher) to float32 probabilities.
        self.forward = compile_forward(model)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The names of the model's outputs, in order (CIFAR-10's for weights that record none)."""
        return self.spec.class_names if self.spec else CLASS_NAMES

    @property
    def image_size(self) -> int:
        return self.model.input_shape[1]

    def probabilities(self, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE, tta: str = "none",
                      progress: Progress | None = None) -> np.ndarray:
        """float32 (N, classes): preprocessing and forward pass, batch by batch (see `TTA_MODES`),
        each batch counted on `progress`."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        if tta not in TTA_MODES:
            raise ConfigError(f"tta {tta!r} is not one of {', '.join(TTA_MODES)}")
        classes = self.model.output_shape[-1]
        out = np.empty((len(images), classes), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            out[start : start + len(batch)] = self.forward(self.preprocessing(batch))
            if tta == "flip":  # the mirror image, preprocessed like any other
                mirrored = self.forward(self.preprocessing(batch[:, :, ::-1]))
                out[start : start + len(batch)] = (out[start : start + len(batch)] + mirrored) / 2
            if progress is not None:
                progress.add(len(batch))
        return out


def check_float32(classifier: Classifier, purpose: str) -> None:
    """Refuses a classifier built in reduced precision where its numbers would be too coarse."""
    if classifier.precision != "float32":
        raise ConfigError(f"{purpose} needs a float32 classifier, got {classifier.precision}: "
                          "load_classifier(..., precision='float32')")
