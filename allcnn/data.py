"""Loading CIFAR-10 safely, from a local copy or Keras' own cache.

Images are returned as uint8 arrays of shape (N, 32, 32, 3) (channels last)
and labels as int64 arrays of shape (N,). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import IO, Callable

import numpy as np

from allcnn.config import ConfigError
from allcnn.errors import AllcnnError

CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ENV_VAR = "ALLCNN_DATA_DIR"

# The same globals Keras 3.15 admits when it unpickles its datasets
# (keras/src/datasets/npz_utils.py): what it takes to rebuild a numpy array,
# nothing that can run code.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)


class DataError(AllcnnError):
    """CIFAR-10 could not be found or a file in it is not a valid batch."""


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for something other than a numpy array."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays, so a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenGlobal(f"refusing to load {module}.{name}")


def _read_pickle(stream: IO[bytes], name: str) -> dict:
    try:
        obj = RestrictedUnpickler(stream, encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise DataError(f"{name}: not a CIFAR-10 batch ({e}); the file may be malicious") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{name}: truncated or corrupt CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: not a CIFAR-10 batch (expected a dict, got {type(obj).__name__})")
    return obj


def parse_batch(stream: IO[bytes], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one `data_batch_*`/`test_batch` pickle into (images, labels)."""
    batch = _read_pickle(stream, name)
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{name}: missing b'data' or b'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{name}: {len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{name}: labels outside 0..{len(CLASS_NAMES) - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _check_meta(stream: IO[bytes], name: str) -> None:
    meta = _read_pickle(stream, name)
    names = tuple(n.decode() if isinstance(n, bytes) else n for n in meta.get(b"label_names", ()))
    if names != CLASS_NAMES:
        raise DataError(f"{name}: class names {names} are not CIFAR-10's")


def _load(opener: Callable[[str], IO[bytes]], where: str) -> tuple[tuple, tuple]:
    def read(member: str):
        with opener(member) as stream:
            return parse_batch(stream, f"{where}/{member}")

    with opener(META_FILE) as stream:
        _check_meta(stream, f"{where}/{META_FILE}")
    train = [read(f) for f in TRAIN_FILES]
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train), read(TEST_FILE)


def _open_folder(folder: Path) -> Callable[[str], IO[bytes]]:
    def opener(member: str) -> IO[bytes]:
        path = folder / member
        if not path.is_file():
            raise DataError(f"{path}: missing (a CIFAR-10 folder holds {', '.join(TRAIN_FILES)}, {TEST_FILE}, {META_FILE})")
        return open(path, "rb")

    return opener


def _load_archive(path: Path) -> tuple[tuple, tuple]:
    """Reads the official tar.gz in memory, member by member, extracting nothing."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}

            def opener(member: str) -> IO[bytes]:
                if member not in members:
                    raise DataError(f"{path}: has no {member}")
                return io.BytesIO(archive.extractfile(members[member]).read())

            return _load(opener, str(path))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable {ARCHIVE} ({e})") from None


def _resolve(data_dir: Path) -> Path:
    """Accepts the batches folder, its parent, or the tar.gz (or its parent)."""
    for candidate in (data_dir, data_dir / FOLDER, data_dir / ARCHIVE):
        if candidate.is_file() or (candidate / TEST_FILE).is_file():
            return candidate
    raise DataError(
        f"no CIFAR-10 found in {data_dir}: expected a {FOLDER} folder, its parent, or {ARCHIVE}"
    )


def load_cifar10(data_dir: str | os.PathLike | None = None) -> tuple[tuple, tuple]:
    """Loads CIFAR-10 as `((x_train, y_train), (x_test, y_test))`.

    Looks in `data_dir`, else in `$ALLCNN_DATA_DIR`, else in Keras' cache
    (downloading there if needed, with `keras.datasets.cifar10`).

    Raises:
        DataError: with one line that says what was tried and how to fix it.
    """
    data_dir = data_dir or os.environ.get(ENV_VAR)
    if data_dir:
        path = _resolve(Path(data_dir).expanduser())
        return _load_archive(path) if path.is_file() else _load(_open_folder(path), str(path))
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / FOLDER
    if (cache / TEST_FILE).is_file():
        return _load(_open_folder(cache), str(cache))
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice.
        raise DataError(
            f"CIFAR-10 not found: no --data-dir, no ${ENV_VAR}, nothing in {cache}, "
            f"and the download failed ({type(e).__name__}). Point --data-dir at a "
            f"{FOLDER} folder, its parent, or {ARCHIVE}."
        ) from None
    return (x_train, y_train.reshape(-1).astype(np.int64)), (x_test, y_test.reshape(-1).astype(np.int64))


def train_val_split(
    x: np.ndarray, y: np.ndarray, val_size: int = 5000, seed: int = 0
) -> tuple[tuple, tuple]:
    """Holds out `val_size` seeded random training images for model selection."""
    if not 0 <= val_size < len(x):
        raise ConfigError(f"val_size: must be in 0..{len(x) - 1}, got {val_size}")
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:val_size], order[val_size:]
    return (x[train], y[train]), (x[val], y[val])
