"""`allcnn predict`: classify image files of any format and size.

Images become CIFAR-like inputs: the first frame, EXIF orientation applied,
converted to RGB (transparency composited on white, 16-bit modes scaled to
8 bits rather than clipped), then resized (whole image, aspect not kept, so no
object is cropped away) to 32x32 with Lanczos, an antialiasing filter;
`reducing_gap` first box-reduces huge images, and JPEG `draft` decodes them at
a reduced scale, both for speed.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from allcnn.errors import AllcnnError
from allcnn.inference import DEFAULT_BATCH_SIZE, DEFAULT_PRECISION, load_classifier

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


def load_image(path: str | os.PathLike) -> np.ndarray:
    """A uint8 (32, 32, 3) array from any image Pillow reads.

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
                image.draft(None, (2 * SIZE, 2 * SIZE))
                image = ImageOps.exif_transpose(_to_rgb(image))
                return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types for broken files.
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _image_suffixes() -> set[str]:
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
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in _image_suffixes() and p.is_file())
            yield from files or [ImageError(f"{path}: no image files in this folder")]
        elif path.exists() or not glob.has_magic(str(item)):
            yield path
        else:
            yield from [Path(p) for p in sorted(glob.glob(str(item)))] or [ImageError(f"{item}: no files match")]


def load_batches(inputs: Iterable[str | os.PathLike],
                 batch_size: int) -> Iterator[list[tuple[Path | None, np.ndarray | ImageError]]]:
    """The inputs expanded (see `expand_inputs`) and decoded `batch_size` at a time, in order:
    `(path, uint8 image)`, or `(path, ImageError)` for a bad one (path `None` for a pattern
    that matched nothing), so a folder of any size streams with bounded memory."""
    batch: list[tuple[Path | None, np.ndarray | ImageError]] = []
    for item in expand_inputs(inputs):
        batch.append((None, item) if isinstance(item, ImageError) else (item, _load_or_error(item)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load_or_error(path: Path) -> np.ndarray | ImageError:
    try:
        return load_image(path)
    except ImageError as e:
        return e


def predict(
    inputs: Iterable[str | os.PathLike],
    weights: str | os.PathLike | None = None,
    *,
    top_k: int = 3,
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: str = DEFAULT_PRECISION,
    device: str = "auto",
    variant: str | None = None,
    preprocessing_json: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    tta: str = "none",
) -> Iterator[dict]:
    """Yields, in input order, `{"path", "top": [{"class", "probability"}]}` or `{"path", "error"}`.

    Images are decoded and classified `batch_size` at a time, so a folder of
    any size streams with bounded memory. `tta="flip"` averages each image with its mirror.
    """
    from allcnn.data import CLASS_NAMES

    classifier = load_classifier(weights, variant=variant, preprocessing_json=preprocessing_json,
                                 precision=precision, device=device, weights_dir=weights_dir)
    for batch in load_batches(inputs, batch_size):
        good = [(path, image) for path, image in batch if not isinstance(image, ImageError)]
        probabilities = classifier.probabilities(np.stack([image for _, image in good]), tta=tta) if good else []
        by_path = {path: p for (path, _), p in zip(good, probabilities)}
        for path, image in batch:
            if isinstance(image, ImageError):
                yield {"path": None if path is None else str(path), "error": str(image)}
                continue
            order = np.argsort(-by_path[path])[:top_k]
            yield {"path": str(path), "top": [{"class": CLASS_NAMES[i], "probability": round(float(by_path[path][i]), 6)}
                                              for i in order]}


def plot_predictions(results: list[dict], path: str | os.PathLike) -> None:
    """A grid of classified images (`predict`'s results without errors), each captioned with
    its file name, top class and probability; the first `GRID_LIMIT` are drawn."""
    from allcnn.plots import GRID_LIMIT, plot_labelled_images

    shown = results[:GRID_LIMIT]
    captions = [f"{Path(r['path']).name}\n{r['top'][0]['class']} {r['top'][0]['probability']:.0%}" for r in shown]
    plot_labelled_images([load_image(r["path"]) for r in shown], captions, path, total=len(results))
