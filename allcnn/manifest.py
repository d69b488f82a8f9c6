"""Knowing what goes with a weights file: its model variant and preprocessing.

Weights alone are not enough to classify an image: the model variant and the
preprocessing statistics must match the ones used in training, or accuracy
silently collapses (the `paper`, `tutorial` and `convpool-cnn-c` variants even have
identical weight shapes). `resolve_weights` therefore returns the weights path *with*
its variant and preprocessing, taken from the run folder, the manifest, or the
file format itself.

A Keras 2 HDF5 file (see `allcnn.weights_io` for the formats) is always the
`tutorial` variant with inputs scaled to [0, 1].

The shipped default weights are described by `weights/manifest.json`::

    {
      "default": "allcnn-c",
      "weights": [{
        "name": "allcnn-c",
        "file": "allcnn-c.weights.h5",
        "sha256": "<hex digest of the file>",
        "variant": "paper",
        "batch_norm": false,
        "preprocessing": {"method": "standardize", "mean": [...], "std": [...]},
        "val_size": 5000, "seed": 0,
        "accuracy": {"test_top1": 0.92, "test_top5": 0.997},
        "produced": {"recipe": "release", "epochs": 350, "hardware": "..."}
      }]
    }

`write_manifest_entry` produces such an entry from a finished run folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from allcnn import resources
from allcnn.config import VARIANTS, variant_of
from allcnn.data import CIFAR_VAL_SIZE, CLASS_NAMES, held_out_record
from allcnn.files import atomic_write_text
from allcnn.preprocessing import Preprocessing
from allcnn.run_folder import RunFolder
from allcnn.weights_io import KERAS_MODEL, LEGACY_H5, WeightsError, weights_format

MANIFEST = "manifest.json"
WEIGHTS_DIR_ENV = "ALLCNN_WEIGHTS_DIR"
_PASS_WEIGHTS = "pass --weights PATH (a run's best.weights.h5, a .keras model or a Keras 2 .hdf5 file)"


@dataclass(frozen=True)
class WeightsSpec:
    """A weights file and everything needed to use it.

    `architecture` holds extra `build_model` arguments (`batch_norm`, `classes`,
    `input_shape`); `val_size`/`val_split`/`seed` rebuild the run's validation
    split; `class_names` are the classifier's outputs, in order.
    """

    path: Path
    format: str
    variant: str
    preprocessing: Preprocessing
    architecture: dict = field(default_factory=dict)
    val_size: int = CIFAR_VAL_SIZE
    seed: int = 0
    class_names: tuple[str, ...] = CLASS_NAMES
    val_split: float = 0.0
    dataset: str = "auto"  # what the weights were trained on: `auto` where nothing records it


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_weights_dir() -> Path:
    """`$ALLCNN_WEIGHTS_DIR`, else the shipped `weights/` folder."""
    return Path(os.environ[WEIGHTS_DIR_ENV]) if os.environ.get(WEIGHTS_DIR_ENV) else resources.weights_dir()


def read_manifest(directory: str | os.PathLike | None = None) -> dict:
    """The parsed `manifest.json` of a weights folder."""
    path = Path(directory or default_weights_dir()) / MANIFEST
    if not path.is_file():
        raise WeightsError(f"no default weights: {path} does not exist; {_PASS_WEIGHTS}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not all(isinstance(e, dict) for e in manifest.get("weights", [])):
        raise WeightsError(f"{path}: expected an object with a list of weights entries")
    return manifest


def manifest_entry(name: str | None = None, directory: str | os.PathLike | None = None) -> dict:
    """The manifest entry called `name` (default: the manifest's `default`)."""
    manifest = read_manifest(directory)
    name = name or manifest.get("default")
    entries = {entry.get("name"): entry for entry in manifest.get("weights", [])}
    if name not in entries:
        raise WeightsError(f"the weights manifest has no entry {name!r} (entries: {', '.join(map(str, entries))})")
    missing = [key for key in ("file", "sha256", "variant", "preprocessing") if key not in entries[name]]
    if missing:
        raise WeightsError(f"the weights manifest's entry {name!r} lacks {', '.join(missing)}")
    return entries[name]


def _verified(directory: Path, entry: dict) -> Path:
    """The entry's weights path, after checking its sha256."""
    path = directory / entry["file"]
    if not path.is_file():
        raise WeightsError(f"default weights {path} are missing (not downloaded or not installed?); {_PASS_WEIGHTS}")
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise WeightsError(f"{path}: sha256 {actual} does not match the manifest's {entry['sha256']}; "
                           "the file is corrupt or was replaced")
    return path


def _from_manifest(directory: Path) -> WeightsSpec:
    entry = manifest_entry(directory=directory)
    path = _verified(directory, entry)
    names = entry.get("classes", CLASS_NAMES)
    if not (isinstance(names, (list, tuple)) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise WeightsError(f"the weights manifest's entry {entry['name']!r}: classes must be a list of names")
    names = tuple(names)
    return WeightsSpec(path, weights_format(path), entry["variant"],
                       Preprocessing.from_dict(entry["preprocessing"], directory),
                       {"batch_norm": bool(entry.get("batch_norm", False)), "classes": len(names)},
                       int(entry.get("val_size", CIFAR_VAL_SIZE)), int(entry.get("seed", 0)), names,
                       float(entry.get("val_split", 0.0)))


def _keras_archive_architecture(path: Path) -> tuple[str | None, dict]:
    """Variant and batch norm of an allcnn `.keras` file, from its JSON config only."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    name = config.get("config", {}).get("name", "")
    layers = config.get("config", {}).get("layers", [])
    return variant_of(name), {"batch_norm": any(layer.get("class_name") == "BatchNormalization" for layer in layers)}


def _from_file(path: Path, variant: str | None, preprocessing_json: Path | None) -> WeightsSpec:
    """Settings for a given file: its run folder, else what its format implies."""
    kind = weights_format(path)
    run = RunFolder(path.parent)
    found_variant, architecture, split = None, {}, {}
    if run.has_run():
        config = run.read_config()
        names = run.read_class_names() or CLASS_NAMES
        found_variant = config.variant
        architecture = {"batch_norm": config.batch_norm, "reparam": config.reparam, "classes": len(names),
                        "input_shape": (config.image_size, config.image_size, 3)}
        split = {"val_size": config.val_size, "val_split": config.val_split, "seed": config.seed, "class_names": names,
                 "dataset": config.dataset}
    prep = run.read_preprocessing()
    if kind == LEGACY_H5:
        found_variant, prep = found_variant or "tutorial", prep or Preprocessing("scale")
    elif kind == KERAS_MODEL and found_variant is None:
        found_variant, architecture = _keras_archive_architecture(path)
    variant = variant or found_variant
    if variant is None:
        raise WeightsError(f"{path}: no config.toml beside it tells the model variant; pass --variant NAME "
                           f"(paper for All-CNN-C; all: {', '.join(VARIANTS)})")
    if preprocessing_json is not None:
        prep = Preprocessing.load(preprocessing_json)
    if prep is None:
        raise WeightsError(f"{path}: no preprocessing.json beside it; pass --preprocessing-json PATH from its run")
    return WeightsSpec(path, kind, variant, prep, architecture, **split)


def resolve_weights(
    weights: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    preprocessing_json: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
) -> WeightsSpec:
    """Which weights, model variant and preprocessing to use.

    Args:
        weights: a weights file; `None` means the manifest's default entry
            (sha256-checked) in `weights_dir`.
        variant, preprocessing_json: override what the file's run folder (or
            format) says; needed for a bare Keras 3 weights file.
        weights_dir: where `manifest.json` lies (default: `$ALLCNN_WEIGHTS_DIR`,
            else the shipped `weights/`).
    """
    if weights is None:
        spec = _from_manifest(Path(weights_dir or default_weights_dir()))
        if variant or preprocessing_json:
            prep = Preprocessing.load(preprocessing_json) if preprocessing_json else spec.preprocessing
            spec = dataclasses.replace(spec, variant=variant or spec.variant, preprocessing=prep)
        return spec
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    return _from_file(path, variant, Path(preprocessing_json) if preprocessing_json else None)


def write_manifest_entry(
    weights_file: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    name: str,
    accuracy: dict,
    produced: dict,
    default: bool = True,
    batch_norm: bool | None = None,
) -> dict:
    """Adds (or replaces) the entry for `weights_file` in its folder's manifest.

    The variant, architecture, split and preprocessing come from `run_dir`, so
    the manifest cannot drift from how the weights were trained. `accuracy`
    (e.g. `{"test_top1": ...}` from `allcnn evaluate --json`) and `produced`
    (recipe, epochs, hardware) are recorded as given. `batch_norm` says whether the file's
    network has batch norm, where it differs from the run's (weights shipped folded).
    """
    weights_file, run = Path(weights_file), RunFolder(run_dir)
    config = run.read_config()
    prep = Preprocessing.load(run.preprocessing_path)
    if prep.whiten is not None:
        raise WeightsError("ZCA preprocessing needs its matrix beside the manifest; copy the .zca.npy file by hand")
    entry = {"name": name, "file": weights_file.name, "sha256": sha256(weights_file), "variant": config.variant,
             "batch_norm": config.batch_norm if batch_norm is None else batch_norm, "preprocessing": prep.to_dict(),
             **held_out_record(config.val_size, config.val_split, config.seed, config.dataset),
             "accuracy": accuracy, "produced": produced}
    path = weights_file.parent / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"weights": []}
    manifest["weights"] = [e for e in manifest["weights"] if e.get("name") != name] + [entry]
    if default or "default" not in manifest:
        manifest["default"] = name
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return entry
