"""Reading weights in every format people have, into a `build_model` network.

Formats, detected from the file contents rather than the extension:

- Keras 3 weights (`model.save_weights`, e.g. a run's `best.weights.h5`);
- full Keras 3 models (`.keras` zip archives), loaded with `safe_mode=True`;
- legacy Keras 2 HDF5 weights (e.g. the tutorial's
  `all_cnn_weights_0.9088_0.4994.hdf5`).

Which model variant and preprocessing go with a file is `allcnn.manifest`'s
business; this module only reads arrays and fits them to a model, naming the
first layer that differs.
"""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from allcnn.errors import AllcnnError

KERAS3, KERAS_MODEL, LEGACY_H5 = "keras3-weights", "keras-model", "keras2-hdf5"


class WeightsError(AllcnnError, ValueError):
    """Weights that cannot be found, verified, or fitted to the model; one line."""


@contextlib.contextmanager
def _open_hdf5(path: Path):
    """h5py.File, whose errors for a cut or damaged file become one line naming it."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            yield f
    except (OSError, KeyError) as e:
        raise WeightsError(f"{path}: damaged weights file, cannot be read (h5py: {_first_line(e)})") from None


def weights_format(path: str | os.PathLike) -> str:
    """`KERAS3`, `KERAS_MODEL` or `LEGACY_H5`, from the contents (extensions lie)."""
    import h5py

    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if {"config.json", "model.weights.h5"} <= set(archive.namelist()):
                return KERAS_MODEL
    elif h5py.is_hdf5(path):
        with _open_hdf5(path) as f:
            if "layer_names" in f.attrs or "model_weights" in f:
                return LEGACY_H5
            if "layers" in f or "vars" in f:
                return KERAS3
    raise WeightsError(f"{path}: not a Keras weights file (expected Keras 3 .weights.h5, .keras, or Keras 2 HDF5)")


# --- Reading saved weights as [(saved layer name, [arrays])] ------------------


def _snake_case(name: str) -> str:
    """Keras' `to_snake_case`, which names layers inside a Keras 3 weights file."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _keras3_keys(model) -> list[str]:
    """The `layers/<key>` group of each layer, numbered per class as Keras saves them."""
    used: dict[str, int] = {}
    keys = []
    for layer in model.layers:
        name = _snake_case(type(layer).__name__)
        used[name] = used.get(name, -1) + 1
        keys.append(f"{name}_{used[name]}" if used[name] else name)
    return keys


def _arrays(group, layer) -> list[np.ndarray]:
    """A layer's arrays in the order of `layer.weights`: its own `vars`, then those of its `sublayers`
    (`allcnn.model.RepConv`), each saved in the group of the attribute that holds it, its name."""
    own = group["vars"] if "vars" in group else {}
    arrays = [own[k][()] for k in sorted(own, key=int)]
    for sublayer in layer.sublayers() if hasattr(layer, "sublayers") else []:
        arrays += _arrays(group.get(sublayer.name, {}), sublayer)
    return arrays


def _read_keras3(f, model, path: Path) -> list[tuple[str, list[np.ndarray]]]:
    """Per weighted layer of `model`, in order, the arrays stored for it.

    Reading the groups directly (instead of `model.load_weights`) skips the
    optimizer variables that training checkpoints also hold, and lets a
    mismatch be reported in one line naming the layer.
    """
    saved = f["layers"] if "layers" in f else {}
    result = []
    for layer, key in zip(model.layers, _keras3_keys(model)):
        if not layer.weights:
            continue
        result.append((key, _arrays(saved.get(key, {}), layer)))
    used = {key for key, _ in result}
    extra = [k for k in saved if k not in used and len(saved[k].get("vars", {}))]
    if extra:
        raise WeightsError(f"{path}: holds weights for layer {extra[0]!r}, which model {model.name} lacks "
                           "(another architecture or variant?)")
    return result


def _read_legacy(f) -> list[tuple[str, list[np.ndarray]]]:
    """Keras 2 HDF5: `layer_names` in order, each with its `weight_names`."""
    if "model_weights" in f:  # a whole model saved with Keras 2 `model.save`
        f = f["model_weights"]
    decode = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    layers = []
    for name in map(decode, f.attrs["layer_names"]):
        weights = [f[name][decode(w)][()] for w in f[name].attrs.get("weight_names", [])]
        if weights:
            layers.append((name, weights))
    return layers


def _read_keras_model(path: Path) -> list[tuple[str, list[np.ndarray]]]:
    import keras

    try:
        source = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - deserialization raises many types; report one line.
        raise WeightsError(f"{path}: cannot load this .keras model ({type(e).__name__}: {_first_line(e)})") from None
    return [(layer.name, layer.get_weights()) for layer in source.layers if layer.weights]


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def _assign(model, saved: list[tuple[str, list[np.ndarray]]], path: Path, only: list | None) -> None:
    """Copies weights layer by layer, checking counts and shapes first; `only`: see `load_weights`."""
    layers = [layer for layer in model.layers if layer.weights]
    if len(saved) != len(layers):
        raise WeightsError(f"{path}: holds {len(saved)} layers with weights, model {model.name} has {len(layers)} "
                           "(another architecture?)")
    if only is not None:
        kept = sum(1 for layer in only if layer.weights)
        layers, saved = layers[:kept], saved[:kept]
    for layer, (saved_name, arrays) in zip(layers, saved):
        expected = [tuple(w.shape) for w in layer.weights]
        found = [tuple(a.shape) for a in arrays]
        if expected != found:
            has = f"the file's layer {saved_name!r} has {found}" if found else f"the file has none for it ({saved_name!r})"
            raise WeightsError(f"{path}: layer {layer.name!r} of model {model.name} expects weight shapes {expected}, "
                               f"{has}")
    for layer, (_, arrays) in zip(layers, saved):
        layer.set_weights(arrays)


def load_weights(model, path: str | os.PathLike, *, only: list | None = None) -> None:
    """Loads a Keras 3, `.keras` or Keras 2 HDF5 weights file into `model`.

    `only` (the model's first layers, e.g. `allcnn.model.base_layers(model)`) loads
    those from the file's first layers and leaves the rest, the classifier, as they
    are: how weights trained on other classes start a network with a new classifier
    (transfer learning).

    Raises:
        WeightsError: unreadable file, or weights that do not fit `model`,
            naming the first layer that differs.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    kind = weights_format(path)
    if kind == KERAS_MODEL:
        saved = _read_keras_model(path)
    else:
        with _open_hdf5(path) as f:
            saved = _read_keras3(f, model, path) if kind == KERAS3 else _read_legacy(f)
    _assign(model, saved, path, only)
