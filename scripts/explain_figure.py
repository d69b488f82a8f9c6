"""Draws docs/img/explain-methods.png: one CIFAR-10 test image taken back three ways, one row per network.

    python scripts/explain_figure.py runs/model-c/best.weights.h5 shipped --data-dir ../shared/data \\
        --out docs/img/explain-methods.png

Each WEIGHTS is a weights file whose run folder (or the manifest, for `shipped`) tells its
variant and preprocessing. Per network: the image with the probability of its true class, then
that class's score taken back to the input by the plain gradient, the deconvnet and guided
backpropagation (`allcnn.explain`; the paper's Figure 3), each drawn alike: centred on grey, the
99.5th percentile of |value| at full scale. The same image and class in every row, so the rows
compare the networks (a max-pooling model-c against all-cnn-c) and the columns the methods.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from allcnn.config import SHIPPED
from allcnn.data import load_cifar10
from allcnn.errors import AllcnnError
from allcnn.explain import backpropagate, deconvnet, guided_gradient, to_display
from allcnn.model import load_classifier
from allcnn.plots import Panel, plot_panels

METHODS = {"gradient (saliency)": backpropagate, "deconvnet": deconvnet, "guided backpropagation": guided_gradient}


def row(weights: str, image: np.ndarray, label: int) -> list[Panel]:
    """The panels of one network: the image captioned with the network, then one per method."""
    classifier = load_classifier(None if weights == SHIPPED else weights, precision="float32")
    probability = classifier.probabilities(image[None])[0, label]
    x, classes = classifier.preprocessing(image[None]), np.array([label])
    caption = f"{classifier.spec.variant}: {Path(classifier.spec.path).name}\n" \
              f"{classifier.class_names[label]} {probability:.0%}"
    return [Panel(image, caption)] + [Panel(to_display(method(classifier.model, x, classes)[0]), title)
                                      for title, method in METHODS.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help=f"weights files, or {SHIPPED} for ours")
    parser.add_argument("--data-dir", default="../shared/data", help="CIFAR-10 (see allcnn evaluate --help)")
    parser.add_argument("--index", type=int, default=13, help="the test image (0..999 are exact in ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("docs/img/explain-methods.png"))
    args = parser.parse_args(argv)
    try:
        _, (images, labels) = load_cifar10(args.data_dir)
        if not 0 <= args.index < len(images):
            parser.error(f"--index {args.index}: the test split has images 0..{len(images) - 1}")
        panels = [panel for weights in args.weights for panel in row(weights, images[args.index], labels[args.index])]
    except AllcnnError as e:  # a missing file or folder: one line, as the allcnn commands say it
        parser.exit(1, f"error: {e}\n")
    plot_panels(panels, args.out, columns=1 + len(METHODS), title=f"test image {args.index}")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
