"""`allcnn predict`: classify image files of any format and size (decoded by `allcnn.images`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from allcnn.images import ImageError, load_batches, load_image
from allcnn.inference import DEFAULT_BATCH_SIZE, DEFAULT_PRECISION, load_classifier


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
    classifier = load_classifier(weights, variant=variant, preprocessing_json=preprocessing_json,
                                 precision=precision, device=device, weights_dir=weights_dir)
    names = classifier.class_names
    for batch in load_batches(inputs, batch_size, classifier.image_size):
        good = [(path, image) for path, image in batch if not isinstance(image, ImageError)]
        probabilities = classifier.probabilities(np.stack([image for _, image in good]), tta=tta) if good else []
        by_path = {path: p for (path, _), p in zip(good, probabilities)}
        for path, image in batch:
            if isinstance(image, ImageError):
                yield {"path": None if path is None else str(path), "error": str(image)}
                continue
            order = np.argsort(-by_path[path])[:top_k]
            yield {"path": str(path), "top": [{"class": names[i], "probability": round(float(by_path[path][i]), 6)}
                                              for i in order]}


def plot_predictions(results: list[dict], path: str | os.PathLike) -> None:
    """A grid of classified images (`predict`'s results without errors), each captioned with
    its file name, top class and probability; the first `GRID_LIMIT` are drawn."""
    from allcnn.plots import GRID_LIMIT, plot_labelled_images

    shown = results[:GRID_LIMIT]
    captions = [f"{Path(r['path']).name}\n{r['top'][0]['class']} {r['top'][0]['probability']:.0%}" for r in shown]
    plot_labelled_images([load_image(r["path"]) for r in shown], captions, path, total=len(results))
