"""Decoding image files of any format and size into CIFAR-like uint8 arrays.

One path for every command that reads photos (`predict`, `explain`, and
`train`/`evaluate` on image-folder datasets): the first frame, EXIF orientation
applied, converted to RGB (transparency composited on white, 16-bit modes
scaled to 8 bits rather than clipped), then resized (whole image, aspect not
kept, so no object is cropped away) to `size` x `size` with Lanczos, an
antialiasing filter; `reducing_gap` first box-reduces huge images, and JPEG
`draft` decodes them at a reduced scale, both for speed.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from allcnn.errors import AllcnnError

SIZE = 32
# Larger than any camera's photos (48 MP phones) yet a bound on decoding memory.
MAX_PIXELS = 1 << 26


class ImageError(AllcnnError, ValueError):
    """One input file cannot be used; the message names it."""


def _to_rgb(image) -> "Image.Image":
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        scale = 257.0 if image.mode != "F" else 1.0
        array = np.clip(np.asarray(image, dtype=np.float64) / scale, 0, 255)
        image = Image.fromarray(array.round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, size: int = SIZE) -> np.ndarray:
    """A uint8 (size, size, 3) array from any image Pillow reads.

    Raises:
        ImageError: missing, empty, unreadable, truncated or oversized file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(f"{path}: {image.width}x{image.height} pixels is over the {MAX_PIXELS} limit "
                                     "(a decompression bomb?)")
                image.draft(None, (2 * size, 2 * size))
                image = ImageOps.exif_transpose(_to_rgb(image))
                return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types for broken files.
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def image_suffixes() -> set[str]:
    """Extensions of the formats Pillow can decode: not its save-only ones (PDF) nor its
    stubs that only identify a file (HDF5, so a `.weights.h5` beside the photos, GRIB, WMF)."""
    from PIL import Image, ImageFile

    Image.init()
    decodable = {name for name, (factory, _) in Image.OPEN.items()
                 if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return {suffix for suffix, name in Image.registered_extensions().items() if name in decodable}


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> Iterator[Path | ImageError]:
    """Files as given, directories as their image files, globs as matches; sorted, in input order."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in image_suffixes() and p.is_file())
            yield from files or [ImageError(f"{path}: no image files in this folder")]
        elif path.exists() or not glob.has_magic(str(item)):
            yield path
        else:
            yield from [Path(p) for p in sorted(glob.glob(str(item)))] or [ImageError(f"{item}: no files match")]


def load_batches(files: Iterable[Path | ImageError], batch_size: int,
                 size: int = SIZE) -> Iterator[list[tuple[Path | None, np.ndarray | ImageError]]]:
    """Files (`expand_inputs`' items) decoded (`size` x `size`) `batch_size` at a time, in order:
    `(path, uint8 image)`, or `(path, ImageError)` for a bad one (path `None` for a pattern
    that matched nothing), so a folder of any size streams with bounded memory."""
    batch: list[tuple[Path | None, np.ndarray | ImageError]] = []
    for item in files:
        batch.append((None, item) if isinstance(item, ImageError) else (item, load_or_error(item, size)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_or_error(path: Path, size: int = SIZE) -> np.ndarray | ImageError:
    """`load_image`, with a bad file's error returned rather than raised."""
    try:
        return load_image(path, size)
    except ImageError as e:
        return e
