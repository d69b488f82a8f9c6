"""Where the shipped weights and recipes are, installed or in a checkout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _package_dir(package: str, folder: str) -> Path:
    """`weights/` and `configs/` install as data-only (namespace) packages;
    `importlib.resources` gives those a MultiplexedPath, so ask the import
    system for the folder itself."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return _REPO / folder  # a checkout on sys.path without installing
    return Path(list(spec.submodule_search_locations)[0])


def weights_dir() -> Path:
    return _package_dir("allcnn.weights", "weights")


def configs_dir() -> Path:
    return _package_dir("allcnn.configs", "configs")


def recipe_names() -> list[str]:
    """The recipes shipped in `configs/`, by the name `--config` takes."""
    return sorted(path.stem for path in configs_dir().glob("*.toml"))
