"""Input preprocessing fitted on training images and replayed at test time.

The fitted statistics travel with the weights (`preprocessing.json`, and in
the weights manifest) so `evaluate` and `predict` transform images exactly as
training did.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from allcnn.config import PREPROCESSINGS, ConfigError
from allcnn.errors import FileAccessError
from allcnn.files import atomic_write, atomic_write_text

# Global contrast normalization scale and ZCA regularizer, as in Goodfellow et
# al.'s maxout preprocessing that the paper reuses.
_GCN_SCALE = 55.0
_ZCA_EPSILON = 0.01


@dataclass
class Preprocessing:
    """A fitted preprocessing: `method` plus the statistics it needs.

    `mean`/`std` are per channel for `standardize`; for `zca` `mean` is the
    per-pixel mean (3072 values) and `whiten` the 3072x3072 ZCA matrix.
    """

    method: str = "standardize"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    whiten: np.ndarray | None = field(default=None, repr=False)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Maps uint8 images (N, H, W, 3) to float32 network inputs."""
        x = np.asarray(images, dtype=np.float32) / 255.0
        if self.method == "scale":
            return x
        if self.method == "standardize":
            return (x - np.float32(self.mean)) / np.float32(self.std)
        flat = global_contrast_normalize(x.reshape(len(x), -1))
        return ((flat - np.float32(self.mean)) @ self.whiten.astype(np.float32)).reshape(x.shape)

    def to_dict(self) -> dict:
        """The JSON-able statistics (the ZCA matrix is saved beside, see `save`)."""
        return {"method": self.method, "mean": self.mean, "std": self.std}

    def save(self, path: str | os.PathLike) -> None:
        """Writes JSON (and for ZCA a `.zca.npy` beside it) atomically."""
        d = self.to_dict()
        if self.whiten is not None:
            matrix = Path(path).with_suffix(".zca.npy")
            with atomic_write(matrix) as tmp, open(tmp, "wb") as f:
                np.save(f, self.whiten)
            d["whiten_file"] = matrix.name
        atomic_write_text(path, json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> "Preprocessing":
        """Builds from `to_dict()` output; `base` is where `whiten_file` lies."""
        if not isinstance(d, dict):
            raise ConfigError(f"preprocessing: expected a JSON object, got {type(d).__name__}")
        if d.get("method") not in PREPROCESSINGS:
            raise ConfigError(f"preprocessing: unknown method {d.get('method')!r}; expected one of {PREPROCESSINGS}")
        whiten = np.load(Path(base or ".") / d["whiten_file"]) if "whiten_file" in d else None
        return cls(d["method"], d.get("mean", []), d.get("std", []), whiten)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Preprocessing":
        """Reads `save()`'s JSON (and ZCA matrix); a missing or damaged file is one line naming it."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), path.parent)
        except OSError as e:
            raise FileAccessError.of(e) from None
        except (ValueError, KeyError) as e:  # bad JSON or a bad .zca.npy
            raise ConfigError(f"{path}: damaged preprocessing file ({e})") from None


def global_contrast_normalize(flat, xp=np):
    """Each image (a row of `flat`) centred and scaled to a root mean square of `_GCN_SCALE`.

    `xp` is the array library: numpy here, `keras.ops` inside an exported graph
    (allcnn/export.py), so both compute the same thing from one definition.
    """
    centered = flat - xp.mean(flat, axis=1, keepdims=True)
    norms = xp.sqrt(xp.mean(centered**2, axis=1, keepdims=True))
    return _GCN_SCALE * centered / xp.maximum(norms, 1e-8)


def fit_preprocessing(method: str, train_images: np.ndarray) -> Preprocessing:
    """Fits `method` on training images only (never validation or test)."""
    if method not in PREPROCESSINGS:
        raise ConfigError(f"preprocessing: unknown method {method!r}; expected one of {PREPROCESSINGS}")
    if method == "scale":
        return Preprocessing("scale")
    x = np.asarray(train_images, dtype=np.float64) / 255.0
    if method == "standardize":
        return Preprocessing("standardize", x.mean(axis=(0, 1, 2)).tolist(), x.std(axis=(0, 1, 2)).tolist())
    flat = global_contrast_normalize(x.reshape(len(x), -1))
    mean = flat.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(flat - mean, rowvar=False))
    whiten = (eigenvectors / np.sqrt(eigenvalues + _ZCA_EPSILON)) @ eigenvectors.T
    return Preprocessing("zca", mean.tolist(), [], whiten.astype(np.float32))
