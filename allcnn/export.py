"""`allcnn export`: the network as one file that runs without allcnn (ONNX, LiteRT, SavedModel).

The exported graph takes what a camera gives: float32 RGB pixels 0..255,
NHWC, 32x32 or the size the network was trained at (resizing is the caller's job). The training preprocessing is
built in as Keras layers in front of the network (`Rescaling(1/255)`, then for
`standardize` a per-channel `Rescaling` by 1/std with offset -mean/std, the training statistics;
for `zca` a layer with the contrast normalization and the whitening matrix), dropout
is left out (inference only) and everything is float32. It returns the softmax
probabilities (N, classes).

Export goes through Keras' own `model.export` (formats `onnx`, `litert`,
`tf_saved_model`). Before the file is put in place, it is loaded with its own
runtime (onnxruntime, LiteRT's interpreter, TensorFlow) and its probabilities
are compared with `Classifier.probabilities` (numpy preprocessing + Keras) on
a few images: a difference over `TOLERANCE` is an error and nothing is written.
A JSON file beside the export records the classes, the input spec, the source
weights and that check.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from allcnn.config import ConfigError
from allcnn.errors import AllcnnError
from allcnn.files import atomic_write, atomic_write_directory, atomic_write_text
from allcnn.hardware import dtype_policy
from allcnn.inference import Classifier, check_float32
from allcnn.manifest import sha256
from allcnn.preprocessing import global_contrast_normalize

# float32 through different kernels (oneDNN in Keras, the runtimes' own): the probabilities
# measured here agreed to ~1e-6; a real mismatch (wrong preprocessing, dropout left on) is > 1e-2.
TOLERANCE = 1e-4
CHECK_IMAGES = 16
_INSTALL = "pip install 'allcnn[export]'"


class ExportError(AllcnnError, RuntimeError):
    """The model cannot be exported, or the exported file does not match Keras."""


@dataclass(frozen=True)
class Format:
    """An export format: Keras' name for it, the file name it needs, the packages to
    convert and to run it, and how to run it (`load` maps a path to a function of pixels)."""

    keras_name: str
    suffix: str
    converters: tuple[str, ...]
    runtime: str
    load: Callable[[str], Callable[[np.ndarray], np.ndarray]]


def _onnxruntime(path: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _litert(path: str) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()

    def run(x: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(given["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(given["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(taken["index"])

    return run


def _saved_model(path: str) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(path)  # kept referenced: its variables die with it
    return lambda x: loaded.serve(tf.constant(x)).numpy()


# Package names as pip knows them; the module each provides is the name with "-" as "_",
# except where noted in `_MODULES`.
FORMATS = {
    "onnx": Format("onnx", ".onnx", ("tf2onnx", "onnx"), "onnxruntime", _onnxruntime),
    "tflite": Format("litert", ".tflite", (), "ai-edge-litert", _litert),
    "saved_model": Format("tf_saved_model", "", (), "tensorflow", _saved_model),
}
_MODULES = {"ai-edge-litert": "ai_edge_litert"}


def _require(packages: tuple[str, ...], what: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(_MODULES.get(p, p)) is None]
    if missing:
        raise ExportError(f"{what} needs {' and '.join(missing)}: {_INSTALL}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _zca_layer(mean: np.ndarray, whiten: np.ndarray):
    """A layer doing what `Preprocessing("zca")` does after the /255: global contrast
    normalization of each image, then `(x - mean) @ whiten`, the statistics held as
    non-trainable weights (the converters fold them into constants)."""
    import keras
    from keras import ops

    class ZcaWhitening(keras.layers.Layer):
        def build(self, input_shape):
            self.mean = self.add_weight(shape=mean.shape, initializer=keras.initializers.Constant(mean),
                                        trainable=False, name="mean")
            self.whiten = self.add_weight(shape=whiten.shape, initializer=keras.initializers.Constant(whiten),
                                          trainable=False, name="whiten")

        def call(self, x):
            flat = global_contrast_normalize(ops.reshape(x, (-1, whiten.shape[0])), ops)
            return ops.reshape(ops.matmul(flat - self.mean, self.whiten), (-1, *x.shape[1:]))

    return ZcaWhitening(name="zca_whitening")


def preprocessing_layers(classifier: Classifier) -> list:
    """The classifier's numpy preprocessing as Keras layers on pixels 0..255."""
    import keras

    prep = classifier.preprocessing
    layers = [keras.layers.Rescaling(1 / 255, name="scale_to_unit")]
    if prep.method == "standardize":
        # (x - mean) / std per channel. Not `Normalization`: it holds its statistics as
        # eager tensors, which tf2onnx turns into extra graph inputs instead of constants.
        mean, std = np.asarray(prep.mean, np.float32), np.asarray(prep.std, np.float32)
        layers.append(keras.layers.Rescaling((1 / std).tolist(), offset=(-mean / std).tolist(), name="standardize"))
    elif prep.method == "zca":
        layers.append(_zca_layer(np.asarray(prep.mean, np.float32), np.asarray(prep.whiten, np.float32)))
    return layers


def deployable_model(classifier: Classifier):
    """A float32 functional model: pixels 0..255 in, probabilities out, dropout left out.

    The new layers are made under a float32 policy whatever the global one (a notebook's,
    or a training run's mixed precision earlier in the process)."""
    import keras

    with dtype_policy("float32"):
        pixels = keras.Input(classifier.model.input_shape[1:], dtype="float32", name="pixels")
        x = pixels
        for layer in preprocessing_layers(classifier) + classifier.model.layers:
            if not isinstance(layer, keras.layers.Dropout):
                x = layer(x)
        model = keras.Model(pixels, x, name=f"{classifier.model.name}_deployable")
    model(np.zeros((1, *model.input_shape[1:]), np.float32))  # Keras exports only a model that has been called
    return model


def check_images(count: int = CHECK_IMAGES, shape: tuple[int, ...] = (32, 32, 3)) -> np.ndarray:
    """Seeded uint8 images for the check: uniform noise, and smooth colour ramps, so that
    both busy and calm inputs (and the extremes 0 and 255) are compared."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (count - count // 2, *shape), dtype=np.uint8)
    ramp = np.linspace(0, 255, shape[0] * shape[1] * shape[2]).reshape(shape)
    ramps = np.stack([np.roll(ramp, int(shift), axis=1) for shift in rng.integers(0, shape[1], count // 2)])
    return np.concatenate([noise, ramps.astype(np.uint8)])


def verify(run: Callable[[np.ndarray], np.ndarray], classifier: Classifier, runtime: str) -> dict:
    """Compares the exported file's probabilities with Keras'; raises ExportError above `TOLERANCE`."""
    images = check_images(shape=classifier.model.input_shape[1:])
    expected = classifier.probabilities(images)
    got = np.asarray(run(images.astype(np.float32)))
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    check = {"runtime": f"{runtime} {_version(runtime)}", "images": len(images),
             "max_abs_difference": difference, "tolerance": TOLERANCE}
    if not difference <= TOLERANCE:
        raise ExportError(f"the exported model's probabilities differ from Keras' by {difference:.3g} "
                          f"(tolerance {TOLERANCE:g}, {check['runtime']}, output shape {got.shape}); nothing written")
    return check


@contextlib.contextmanager
def _quiet_converters() -> Iterator[None]:
    """tf2onnx and TensorFlow's converter log every step at INFO, and Keras' tf2onnx patch warns
    about numpy's future; a CLI user needs their errors only."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("tf2onnx", "absl", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def spec_path(out: str | os.PathLike) -> Path:
    """Where the JSON beside an export goes: `<out>.json`."""
    return Path(f"{out}.json")


def check_target(format: str, out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuses, before any model is built, an unknown format, a wrong suffix, an `out` that
    exists without `overwrite`, or a converter or runtime that is not installed.

    Raises:
        ConfigError, ExportError: with one line.
    """
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    kind, out = FORMATS[format], Path(out)
    if kind.suffix and out.suffix != kind.suffix:
        raise ConfigError(f"--out {out}: a {format} file must end in {kind.suffix}")
    if (out.exists() or spec_path(out).exists()) and not overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    _require(kind.converters, f"export to {format}")
    _require((kind.runtime,), f"checking the {format} file")


def export(classifier: Classifier, *, format: str, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Exports a float32 classifier (`load_classifier(..., precision="float32")`) to `out`
    in `format` (see `FORMATS`), checks it with its runtime, and writes `<out>.json`;
    returns that JSON's contents.

    Raises:
        ConfigError: see `check_target`; a classifier that is not float32.
        ExportError: a missing package, or an export that does not match Keras.
    """
    check_target(format, out, overwrite)
    check_float32(classifier, "export")
    kind, out = FORMATS[format], Path(out)
    model = deployable_model(classifier)
    target = atomic_write(out, suffix=kind.suffix) if kind.suffix else atomic_write_directory(out)
    with target as tmp, _quiet_converters():
        try:
            model.export(tmp, format=kind.keras_name, verbose=False)
        except Exception as e:  # noqa: BLE001 - converters raise many types; report one line.
            raise ExportError(f"export to {format} failed ({type(e).__name__}: {str(e).strip()[:300]})") from None
        check = verify(kind.load(tmp), classifier, kind.runtime)
    spec = {
        "format": format,
        "file": out.name,
        "sha256": sha256(out) if out.is_file() else None,  # a SavedModel is a folder
        "classes": list(classifier.class_names),
        "input": {"shape": [None, *classifier.model.input_shape[1:]], "dtype": "float32",
                  "range": [0, 255], "layout": "NHWC", "channels": "RGB"},
        "output": {"shape": [None, len(classifier.class_names)], "dtype": "float32", "values": "softmax probabilities"},
        "preprocessing": {**classifier.preprocessing.to_dict(), "in_graph": True},
        "source_weights": {"path": str(classifier.spec.path), "sha256": sha256(classifier.spec.path),
                           "variant": classifier.spec.variant},
        "check": check,
        "exported_with": {"keras": _version("keras"), "tensorflow": _version("tensorflow"),
                          **{p: _version(p) for p in kind.converters}},
    }
    atomic_write_text(spec_path(out), json.dumps(spec, indent=2) + "\n")
    return spec
