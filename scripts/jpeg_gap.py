"""What the JPEG rebuilding of our CIFAR-10 copy costs a network: its accuracy on the exact test
images (../shared/data: 0..999) as they are and re-encoded as JPEG at the quality the copy's README
gives for the others (~75), and on the rebuilt images after them.

    python scripts/jpeg_gap.py [WEIGHTS] [--data-dir ../shared/data] [--quality 75] [--exact 1000]

WEIGHTS as `allcnn evaluate`'s (default: the shipped weights); float32 throughout. The exact images
and their JPEG copies are the same images, so their difference is the cost of the encoding alone.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np
from PIL import Image

from allcnn.data import load_dataset
from allcnn.errors import AllcnnError
from allcnn.evaluation import metrics
from allcnn.inference import Classifier
from allcnn.model import load_classifier


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 images (N, H, W, 3), each encoded as a JPEG by Pillow and decoded again."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def jpeg_gap(classifier: Classifier, images: np.ndarray, labels: np.ndarray, exact: int,
             quality: int) -> list[tuple[str, float]]:
    """(what, top-1) for the first `exact` images as they are and as JPEGs, then the rest as they are."""
    accuracy = lambda x, y: metrics(classifier.probabilities(x), y, classifier.class_names)["top1"]  # noqa: E731
    x, y = images[:exact], labels[:exact]
    encoded = jpeg(x, quality)
    difference = np.abs(encoded.astype(np.int16) - x).mean()
    rows = [(f"images 0..{len(x) - 1} as they are", accuracy(x, y)),
            (f"images 0..{len(x) - 1} as JPEG quality {quality} (mean |difference| {difference:.1f} grey levels)",
             accuracy(encoded, y))]
    if len(images) > exact:
        rows.append((f"images {exact}..{len(images) - 1} as they are", accuracy(images[exact:], labels[exact:])))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("weights", nargs="?", help="as allcnn evaluate's (default: the shipped weights)")
    parser.add_argument("--data-dir", default="../shared/data", help="as allcnn evaluate's")
    parser.add_argument("--quality", type=int, default=75, help="JPEG quality, 1-95")
    parser.add_argument("--exact", type=int, default=1000, help="the leading test images that are exact")
    args = parser.parse_args()
    if not 1 <= args.quality <= 95 or args.exact < 1:
        parser.error("--quality must be 1-95 and --exact at least 1")
    try:
        images, labels = load_dataset("cifar10", args.data_dir).test  # before the network: a wrong path fails fast
        classifier = load_classifier(args.weights, precision="float32")
        for what, top1 in jpeg_gap(classifier, images, labels, args.exact, args.quality):
            print(f"{what}: {top1:.2%}")
    except AllcnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
