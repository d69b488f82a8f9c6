"""Loading the training data safely: CIFAR-10, CIFAR-100, or a folder of images per class.

CIFAR comes from a local copy (the official python layout or its tar.gz) or
Keras' own cache; an image folder has the layout of
`keras.utils.image_dataset_from_directory` (DIR/CLASS/IMAGE, classes the sorted
folder names), decoded with `allcnn.images`, the path `predict` uses.
Images are returned as uint8 arrays of shape (N, H, W, 3) (channels last)
and labels as int64 arrays of shape (N,). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np

from allcnn.config import DATASETS, ConfigError, TrainConfig
from allcnn.errors import AllcnnError
from allcnn.images import load_or_error

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
# CIFAR-100's fine labels, in the order of its meta file's b'fine_label_names'.
CIFAR100_CLASS_NAMES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm".split()
)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ENV_VAR = "ALLCNN_DATA_DIR"
# Training images held out for validation by default (see `hold_out`): CIFAR's 5,000 (as the
# paper), an image folder's 10%.
CIFAR_VAL_SIZE = 5000
FOLDER_VAL_FRACTION = 0.1

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


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR dataset's official python version keeps what."""

    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    class_names: tuple[str, ...]
    keras_loader: str  # the keras.datasets module that downloads it


CIFAR10 = CifarLayout("CIFAR-10", FOLDER, ARCHIVE, TRAIN_FILES, TEST_FILE, META_FILE, b"labels", b"label_names",
                      CLASS_NAMES, "cifar10")
CIFAR100 = CifarLayout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "meta",
                       b"fine_labels", b"fine_label_names", CIFAR100_CLASS_NAMES, "cifar100")
# The layout of each CIFAR dataset, by its name in `config.DATASETS`.
CIFAR_LAYOUTS = {"cifar10": CIFAR10, "cifar100": CIFAR100}


class DataError(AllcnnError):
    """The data could not be found or a file in it is not a valid batch."""


class DatasetError(DataError):
    """A dataset from which nothing can be trained or evaluated (exit status 2, as a bad flag)."""

    exit_code = 2


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for something other than a numpy array."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays, so a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenGlobal(f"refusing to load {module}.{name}")


def _read_pickle(stream: IO[bytes], name: str, title: str = "CIFAR-10") -> dict:
    try:
        obj = RestrictedUnpickler(stream, encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise DataError(f"{name}: not a {title} batch ({e}); the file may be malicious") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{name}: truncated or corrupt {title} batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: not a {title} batch (expected a dict, got {type(obj).__name__})")
    return obj


def parse_batch(stream: IO[bytes], name: str, layout: CifarLayout = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """Reads one batch pickle (`data_batch_*`/`test_batch`, or CIFAR-100's `train`/`test`) into (images, labels)."""
    batch = _read_pickle(stream, name, layout.title)
    key = layout.label_key
    if b"data" not in batch or key not in batch:
        raise DataError(f"{name}: missing b'data' or {key!r} (keys: {sorted(batch)})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{name}: {len(labels)} labels for {len(data)} images")
    classes = len(layout.class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{name}: labels outside 0..{classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _check_meta(stream: IO[bytes], name: str, layout: CifarLayout) -> None:
    meta = _read_pickle(stream, name, layout.title)
    names = tuple(n.decode() if isinstance(n, bytes) else n for n in meta.get(layout.names_key, ()))
    if names != layout.class_names:
        raise DataError(f"{name}: class names {names[:12]} are not {layout.title}'s")


def _load(opener: Callable[[str], IO[bytes]], where: str, layout: CifarLayout) -> tuple[tuple, tuple]:
    def read(member: str):
        with opener(member) as stream:
            return parse_batch(stream, f"{where}/{member}", layout)

    with opener(layout.meta_file) as stream:
        _check_meta(stream, f"{where}/{layout.meta_file}", layout)
    train = [read(f) for f in layout.train_files]
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train), read(layout.test_file)


def _open_folder(folder: Path, layout: CifarLayout) -> Callable[[str], IO[bytes]]:
    def opener(member: str) -> IO[bytes]:
        path = folder / member
        if not path.is_file():
            members = ", ".join((*layout.train_files, layout.test_file, layout.meta_file))
            raise DataError(f"{path}: missing (a {layout.title} folder holds {members})")
        return open(path, "rb")

    return opener


def _load_archive(path: Path, layout: CifarLayout) -> tuple[tuple, tuple]:
    """Reads the official tar.gz in memory, member by member, extracting nothing."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}

            def opener(member: str) -> IO[bytes]:
                if member not in members:
                    raise DataError(f"{path}: has no {member}")
                return io.BytesIO(archive.extractfile(members[member]).read())

            return _load(opener, str(path), layout)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable {layout.archive} ({e})") from None


def _find(data_dir: Path, layout: CifarLayout) -> Path | None:
    """The batches folder or the tar.gz: `data_dir` itself, or inside it."""
    for candidate in (data_dir, data_dir / layout.folder, data_dir / layout.archive):
        if candidate.is_file() or (candidate / layout.test_file).is_file():
            return candidate
    return None


def load_cifar(layout: CifarLayout, data_dir: str | os.PathLike | None = None) -> tuple[tuple, tuple]:
    """Loads a CIFAR dataset as `((x_train, y_train), (x_test, y_test))`.

    Looks in `data_dir` (the batches folder, its parent, or the tar.gz), else in
    `$ALLCNN_DATA_DIR`, else in Keras' cache (downloading there if needed, with
    `keras.datasets`).

    Raises:
        DataError: with one line that says what was tried and how to fix it.
    """
    data_dir = data_dir or os.environ.get(ENV_VAR)
    if data_dir:
        path = _find(Path(data_dir).expanduser(), layout)
        if path is None:
            raise DataError(f"no {layout.title} found in {data_dir}: expected a {layout.folder} folder, its parent, "
                            f"or {layout.archive}")
        return _load_archive(path, layout) if path.is_file() else _load(_open_folder(path, layout), str(path), layout)
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / layout.folder
    if (cache / layout.test_file).is_file():
        return _load(_open_folder(cache, layout), str(cache), layout)
    try:
        import keras

        loader = getattr(keras.datasets, layout.keras_loader)
        kwargs = {"label_mode": "fine"} if layout is CIFAR100 else {}
        (x_train, y_train), (x_test, y_test) = loader.load_data(**kwargs)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice.
        raise DataError(
            f"{layout.title} not found: no --data-dir, no ${ENV_VAR}, nothing in {cache}, "
            f"and the download failed ({type(e).__name__}). Point --data-dir at a "
            f"{layout.folder} folder, its parent, or {layout.archive}."
        ) from None
    return (x_train, y_train.reshape(-1).astype(np.int64)), (x_test, y_test.reshape(-1).astype(np.int64))


def load_cifar10(data_dir: str | os.PathLike | None = None) -> tuple[tuple, tuple]:
    """CIFAR-10 as `((x_train, y_train), (x_test, y_test))` (see `load_cifar`)."""
    return load_cifar(CIFAR10, data_dir)


def load_cifar100(data_dir: str | os.PathLike | None = None) -> tuple[tuple, tuple]:
    """CIFAR-100 with its 100 fine labels, as `load_cifar10` (see `load_cifar`)."""
    return load_cifar(CIFAR100, data_dir)


# --- Image folders -------------------------------------------------------------------


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of an image-folder dataset, sorted by name (hidden ones skipped)."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _holds_cifar(path: Path) -> bool:
    return _find(path, CIFAR10) is not None or _find(path, CIFAR100) is not None


def is_image_folder(data_dir: str | os.PathLike | None) -> bool:
    """Whether `data_dir` holds class sub-folders and no CIFAR dataset (nor one a level
    deeper, which is a CIFAR copy given one folder too high, not a class)."""
    if not data_dir:
        return False
    path = Path(data_dir).expanduser()
    if not path.is_dir() or _holds_cifar(path):
        return False
    folders = class_folders(path)
    return bool(folders) and not any(_holds_cifar(folder) for folder in folders)


def load_image_folder(root: str | os.PathLike, size: int = 32,
                      class_names: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray, tuple, list[str]]:
    """Reads DIR/CLASS/IMAGE into `(images, labels, class names, skipped)`.

    Classes are the sorted folder names, or `class_names` (a test folder must
    have the training folder's). Every image is decoded by `allcnn.images` to
    `size` x `size`; files that cannot be (not images, unreadable, broken) are
    left out, each described by one line in `skipped`. Hidden files are ignored.

    Raises:
        DatasetError: no such folder, fewer than two classes, a class without a
            usable image, or classes other than `class_names`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (an image-folder dataset holds one sub-folder per class)")
    folders = class_folders(root)
    names = tuple(folder.name for folder in folders)
    if class_names is not None and names != tuple(class_names):
        missing, extra = sorted(set(class_names) - set(names)), sorted(set(names) - set(class_names))
        raise DatasetError(f"{root}: its classes differ from the training data's (missing: {', '.join(missing) or '-'}; "
                           f"extra: {', '.join(extra) or '-'})")
    if len(folders) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DatasetError(f"{root}: a classifier needs at least two class sub-folders (DIR/CLASS/IMAGE), found {found}")
    images, labels, skipped = [], [], []
    for label, folder in enumerate(folders):
        count = 0
        files = (p for p in folder.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        for path in sorted(files):
            image = load_or_error(path, size)
            if isinstance(image, np.ndarray):
                images.append(image)
                labels.append(label)
                count += 1
            else:
                skipped.append(f"skipped {image}")
        if not count:
            raise DatasetError(f"{folder}: class {folder.name!r} has no usable image; add images or remove the folder")
    return np.stack(images), np.asarray(labels, dtype=np.int64), names, skipped


# --- One entry point for training and evaluation -------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A dataset to train or evaluate on: uint8 images (N, H, W, 3), int64 labels.

    `test` is None for an image folder given without a test folder; `skipped`
    has one line for each file an image folder could not use.
    """

    name: str
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    class_names: tuple[str, ...]
    skipped: tuple[str, ...] = ()


def resolve_dataset(name: str, data_dir: str | os.PathLike | None) -> str:
    """`auto` is an image folder when `data_dir` holds class sub-folders (and no CIFAR), CIFAR-100
    when it holds CIFAR-100 and no CIFAR-10, else CIFAR-10."""
    if name not in DATASETS:
        raise ConfigError(f"dataset: {name!r} is not one of {', '.join(DATASETS)}")
    if name != "auto":
        return name
    data_dir = data_dir or os.environ.get(ENV_VAR)
    if is_image_folder(data_dir):
        return "folder"
    path = Path(data_dir).expanduser() if data_dir else None
    only_cifar100 = path is not None and _find(path, CIFAR10) is None and _find(path, CIFAR100) is not None
    return "cifar100" if only_cifar100 else "cifar10"


def load_dataset(name: str = "auto", data_dir: str | os.PathLike | None = None, *,
                 test_dir: str | os.PathLike | None = None, image_size: int = 32) -> Dataset:
    """Loads `name` (see `allcnn.config.DATASETS`) from `data_dir`.

    An image folder is `data_dir` itself, its test split `test_dir` (same
    classes); CIFAR datasets bring their own test split and are 32x32.

    Raises:
        DataError, DatasetError, ConfigError: with one line.
    """
    name = resolve_dataset(name, data_dir)
    if name != "folder":
        if test_dir is not None:
            raise ConfigError(f"--test-dir is for image-folder datasets; {name} has its own test split")
        if image_size != 32:
            raise ConfigError(f"image_size: {name} images are 32x32; other sizes are for image-folder datasets")
        layout = CIFAR_LAYOUTS[name]
        train, test = load_cifar(layout, data_dir)
        return Dataset(name, train, test, layout.class_names)
    data_dir = data_dir or os.environ.get(ENV_VAR)
    if not data_dir:
        raise DatasetError("an image-folder dataset needs --data-dir DIR (DIR/CLASS/IMAGE)")
    x, y, names, skipped = load_image_folder(data_dir, image_size)
    test = None
    if test_dir is not None:
        x_test, y_test, _, test_skipped = load_image_folder(test_dir, image_size, names)
        test, skipped = (x_test, y_test), skipped + test_skipped
    return Dataset(name, (x, y), test, names, tuple(skipped))


def load_splits(config: TrainConfig, data_dir, test_dir=None) -> tuple[Dataset, tuple, tuple]:
    """`config`'s dataset, and its training images split into train and validation (uint8
    images, int labels) as `hold_out` does; says how many it holds out, and warns of skipped files."""
    dataset = load_dataset(config.dataset, data_dir, test_dir=test_dir, image_size=config.image_size)
    for line in dataset.skipped:
        print(f"warning: {line}", file=sys.stderr)
    train, val = hold_out(*dataset.train, dataset.name, config.val_size, config.val_split, config.seed)
    folder_default = dataset.name == "folder" and not (config.val_size or config.val_split)
    print(f"validation: {len(val[0])} of {len(dataset.train[0])} training images held out" +
          (f" ({FOLDER_VAL_FRACTION:.0%} of the image folder, at least one a class)" if folder_default else ""))
    return dataset, train, val


def recorded_split(val_size: int = 0, val_split: float = 0.0, dataset: str = "cifar10") -> dict[str, int | float]:
    """The validation images that a run's `val_size` and `val_split` hold out (see `hold_out`), as the
    weights manifest records them: the fraction where one is set, else the count, with CIFAR's
    default (0) written out as `CIFAR_VAL_SIZE` so that an entry reads alone and older entries,
    which wrote 0, compare equal. With the seed (`held_out_record`), equal records hold out the same images.
    An image folder's default (a fraction, at least one image a class) stays 0."""
    if val_split:
        return {"val_split": val_split}
    return {"val_size": val_size or (0 if dataset == "folder" else CIFAR_VAL_SIZE)}


def held_out_record(val_size: int = 0, val_split: float = 0.0, seed: int | None = 0,
                    dataset: str = "cifar10") -> dict[str, int | float | None]:
    """`recorded_split` with the seed: equal records hold out the same images of the same data."""
    return {**recorded_split(val_size, val_split, dataset), "seed": seed}


def hold_out(x: np.ndarray, y: np.ndarray, dataset: str, val_size: int = 0, val_split: float = 0.0,
             seed: int = 0) -> tuple[tuple, tuple]:
    """Splits a dataset's training images into (train, validation) as a run's config says; training
    and `evaluate --split val` both call it, so that they agree on the images.

    The fraction `val_split` if given, else `val_size`, else the dataset's default: CIFAR's
    `CIFAR_VAL_SIZE`, or for an image folder (`dataset` "folder") `FOLDER_VAL_FRACTION` of it
    and at least one image of each class, each class's first in the seeded order, then the
    next ones (a small folder would otherwise leave a class unvalidated). Explicit settings
    hold out the images `train_val_split` always has, so a run keeps its validation set.

    Raises:
        DatasetError: nothing held out, or nothing left to train on.
    """
    folder_default = dataset == "folder" and not (val_size or val_split)
    if val_split:
        count = round(val_split * len(x))
    elif folder_default:
        count = max(round(FOLDER_VAL_FRACTION * len(x)), len(np.unique(y)))
    else:
        count = val_size or CIFAR_VAL_SIZE
    if not 1 <= count < len(x):
        raise DatasetError(f"{count} validation images of {len(x)}: hold out at least one and leave some "
                           "to train on (--val-size N or --val-split FRACTION)")
    if not folder_default:
        return train_val_split(x, y, count, seed)
    order = np.random.default_rng(seed).permutation(len(x))
    firsts = order[np.sort(np.unique(y[order], return_index=True)[1])]
    rest = order[~np.isin(order, firsts)]
    val, train = np.concatenate([firsts, rest[:count - len(firsts)]]), rest[count - len(firsts):]
    return (x[train], y[train]), (x[val], y[val])


def train_val_split(
    x: np.ndarray, y: np.ndarray, val_size: int = CIFAR_VAL_SIZE, seed: int = 0
) -> tuple[tuple, tuple]:
    """Holds out `val_size` seeded random training images for model selection."""
    if not 0 <= val_size < len(x):
        raise ConfigError(f"val_size: must be in 0..{len(x) - 1}, got {val_size}")
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:val_size], order[val_size:]
    return (x[train], y[train]), (x[val], y[val])
