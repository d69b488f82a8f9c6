"""Atomic file writes: a crash leaves the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from allcnn.errors import FileAccessError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yields a temp path beside `path`; on success fsyncs it and renames it over.

    `suffix` keeps an extension a writer insists on (Keras wants `.weights.h5`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise FileAccessError.of(e, path) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk while writing, say
        raise FileAccessError.of(e, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Writes `rows` as CSV with a header: `fieldnames`, or every key of any row in order of
    appearance (rows that lack one leave it blank)."""
    fieldnames = fieldnames or list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fieldnames, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def atomic_save_weights(model, path: str | os.PathLike) -> None:
    """`model.save_weights` through a temp file, so a kill never truncates `path`. Under a
    distribution, call it inside `allcnn.distribute.outside_distribution()`."""
    with atomic_write(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp, overwrite=True)


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Makes `path` a hard link to `source` (a copy where the file system has no hard links),
    replacing `path` atomically: the same bytes under a second name, written once."""
    with atomic_write(path, suffix=Path(path).suffix) as tmp:
        os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


@contextlib.contextmanager
def atomic_write_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temp folder beside `path`; on success it takes `path`'s place.

    A folder cannot be renamed over another, so an existing `path` is first
    renamed aside and removed only once the new one is in place: a crash leaves
    the old folder or the new one (or the old one under its temp name), never a mix.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise FileAccessError.of(e, path) from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give what mkdir would
    try:
        yield tmp
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent)) / path.name
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old.parent)
    except OSError as e:
        raise FileAccessError.of(e, path) from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
