"""Builds a small image-folder task from CIFAR-10 test images, for README "Transfer learning".

    python scripts/make_transfer_task.py ../shared/data OUT [--classes cat dog deer horse] [--train 150] [--test 250]

Writes OUT/train/CLASS/*.png and OUT/test/CLASS/*.png from test_batch images
1000 on (never seen in training the shipped weights; 0..999 stay for the exact
evaluation). The classes are CIFAR-10's, so the base has seen such images: this
measures how much our weights help a small dataset (150 images a class), not
transfer to unseen kinds of images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from allcnn.data import CLASS_NAMES, load_cifar10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", nargs="+", default=["cat", "dog", "deer", "horse"], choices=CLASS_NAMES)
    parser.add_argument("--train", type=int, default=150, help="training images per class")
    parser.add_argument("--test", type=int, default=250, help="test images per class")
    args = parser.parse_args()
    _, (x, y) = load_cifar10(args.data_dir)
    for name in args.classes:
        picked = [i for i in range(1000, len(x)) if y[i] == CLASS_NAMES.index(name)]
        if len(picked) < args.train + args.test:
            parser.error(f"{name}: only {len(picked)} test images from 1000 on")
        for split, indices in (("train", picked[: args.train]), ("test", picked[args.train : args.train + args.test])):
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                Image.fromarray(x[i]).save(folder / f"{i:05d}.png")
    print(f"{args.out}: {len(args.classes)} classes, {args.train} train and {args.test} test images each")


if __name__ == "__main__":
    main()
