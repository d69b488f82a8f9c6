"""Where the shipped weights and recipes are, installed or in a checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _package_dir(package: str, folder: str) -> Path:
    try:
        return Path(str(resources.files(package)))
    except (ModuleNotFoundError, TypeError):
        return _REPO / folder  # a checkout on sys.path without installing


def weights_dir() -> Path:
    return _package_dir("allcnn.weights", "weights")


def configs_dir() -> Path:
    return _package_dir("allcnn.configs", "configs")
