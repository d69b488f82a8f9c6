"""`allcnn evaluate`: loss, top-1/top-5 and per-class accuracy on a split of the weights' dataset."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from allcnn import data
from allcnn.config import ConfigError
from allcnn.inference import DEFAULT_BATCH_SIZE, Classifier, Progress
from allcnn.plots import plot_labelled_images

SPLITS = ("test", "val")


def metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict:
    """Cross-entropy loss, top-1, top-5, per-class accuracy and the confusion matrix.

    Top-5 is left out for 5 classes or fewer, where it is always 100%; a class with
    no image among `labels` has accuracy None (n/a), not 0.
    """
    labels = np.asarray(labels, dtype=np.int64)
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    predicted = top5[:, 0]
    classes = len(class_names)
    confusion = np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    images = confusion.sum(axis=1)
    per_class = [round(float(right / n), 6) if n else None for right, n in zip(np.diag(confusion), images)]
    result = {"loss": float(-np.log(np.clip(picked, 1e-7, 1.0)).mean()), "top1": float((predicted == labels).mean())}
    if classes > 5:
        result["top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    return {**result, "per_class": dict(zip(class_names, per_class)), "confusion": confusion.tolist()}


def evaluate(
    classifier: Classifier,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    batch_size: int = DEFAULT_BATCH_SIZE,
    dataset: str = "auto",
    indices: slice | None = None,
    tta: str = "none",
    samples_plot: str | os.PathLike | None = None,
    samples: int = 16,
    progress: bool = False,
) -> dict:
    """Evaluates a classifier (see `allcnn.model.load_classifier`) on the test split
    or its run's held-out validation split.

    `dataset` and `data_dir` as for `allcnn.data.load_dataset`: for an image
    folder, `test` is every image in it, labelled by its class folder (the
    weights' classes); `val` is the part a run trained on that folder held out.
    `val` rebuilds the validation images with the run's `val_size` and `seed`
    (from its config.toml or the manifest), so they are the ones training held out.
    `indices` evaluates a part of the split, e.g. `slice(0, 1000)`: of our copy of
    CIFAR-10, test images 0..999 are the exact official pixels. `tta="flip"` averages
    each image with its mirror. `samples_plot` writes a PNG grid of the first `samples`
    images evaluated, with their predicted and true classes (see `plot_samples`).
    `progress` shows a progress bar on stderr when that is a terminal.
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    x_train, y_train, x, y = _split_source(classifier, dataset, data_dir)
    if split == "val":
        spec = classifier.spec
        _, (x, y) = data.hold_out(x_train, y_train, spec.dataset, spec.val_size, spec.val_split, spec.seed)
    first, stop, _ = (indices or slice(None)).indices(len(x))
    x, y = x[first:stop], y[first:stop]
    if not len(x):
        raise ConfigError(f"indices {first}:{stop} select no images of the {split} split")
    start = time.perf_counter()
    probabilities = classifier.probabilities(x, batch_size, tta, Progress(len(x), progress))
    seconds = time.perf_counter() - start
    if samples_plot is not None:
        plot_samples(x[:samples], y[:samples], probabilities[:samples], samples_plot, classifier.class_names,
                     title=f"{classifier.spec.path.name} on {split} {first}:{first + min(samples, len(x))}")
    return {"weights": str(classifier.spec.path), "variant": classifier.spec.variant, "split": split,
            "indices": f"{first}:{stop}", "tta": tta, "images": len(x),
            **metrics(probabilities, y, classifier.class_names),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(x) / seconds, 1), "precision": classifier.precision,
            "device": classifier.device}


def _split_source(classifier, dataset: str, data_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and test images and labels of the dataset to evaluate on, which must have the weights' classes.

    An image folder has no training part apart from itself: its images are both
    (`val` holds out some of them as training did; `test` takes them all).
    """
    if dataset == "auto":  # what the weights were trained on, where their run folder says
        dataset = classifier.spec.dataset
    loaded = data.load_dataset(dataset, data_dir, image_size=classifier.image_size)
    for line in loaded.skipped:
        print(f"warning: {line}", file=sys.stderr)
    trained, found = classifier.class_names, loaded.class_names
    if found != trained:
        preview = lambda names: ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")  # noqa: E731
        raise data.DatasetError(f"{classifier.spec.path} classifies {len(trained)} classes ({preview(trained)}); "
                                f"the {loaded.name} data has {len(found)} ({preview(found)}): pass --data-dir "
                                "with the classes it was trained on")
    return (*loaded.train, *(loaded.test or loaded.train))


def plot_samples(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, path: str | os.PathLike,
                 class_names: tuple[str, ...], title: str = "") -> None:
    """A grid of images captioned with the predicted class, its probability and the true
    class; the misclassified ones in red, and their count in the title."""
    predicted = probabilities.argmax(axis=1)
    captions = [f"{class_names[p]} {probabilities[i, p]:.0%}\ntrue: {class_names[t]}"
                for i, (p, t) in enumerate(zip(predicted, labels))]
    wrong = predicted != labels
    plot_labelled_images(images, captions, path, colors=["red" if w else "black" for w in wrong],
                         title=f"{title}: {int(wrong.sum())} of {len(images)} misclassified (red)".lstrip(": "))
