"""`allcnn predict`: classify image files of any format and size (decoded by `allcnn.images`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from allcnn.config import ConfigError
from allcnn.images import ImageError, expand_inputs, load_batches, load_image
from allcnn.inference import DEFAULT_BATCH_SIZE, Classifier, Progress
from allcnn.plots import GRID_LIMIT, plot_labelled_images


def check_top_k(top_k: int, class_names: tuple[str, ...]) -> None:
    """Refuses more classes per image than the weights have."""
    if not 1 <= top_k <= len(class_names):
        raise ConfigError(f"--top-k {top_k}: the weights classify {len(class_names)} classes; "
                          f"pass 1..{len(class_names)}")


def predict(
    inputs: Iterable[str | os.PathLike],
    classifier: Classifier,
    *,
    top_k: int = 3,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: str = "none",
    progress: bool = False,
) -> Iterator[dict]:
    """Yields, in input order, `{"path", "top": [{"class", "probability"}]}` or `{"path", "error"}`.

    `classifier` from `allcnn.model.load_classifier`. Images are decoded and classified
    `batch_size` at a time, so a folder of any size streams with bounded memory.
    `tta="flip"` averages each image with its mirror. `progress` shows a progress bar on
    stderr, when that is a terminal, for 100 images or more.
    """
    names = classifier.class_names
    check_top_k(top_k, names)
    files = list(expand_inputs(inputs))
    bar = Progress(len(files), progress)
    for batch in load_batches(files, batch_size, classifier.image_size):
        good = [(path, image) for path, image in batch if not isinstance(image, ImageError)]
        probabilities = classifier.probabilities(np.stack([image for _, image in good]), tta=tta) if good else []
        bar.add(len(batch))
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
    shown = results[:GRID_LIMIT]
    captions = [f"{Path(r['path']).name}\n{r['top'][0]['class']} {r['top'][0]['probability']:.0%}" for r in shown]
    plot_labelled_images([load_image(r["path"]) for r in shown], captions, path, total=len(results))
