"""Packs CIFAR-10 into lossless WebP mosaics small enough to carry, and back.

The GPU machines we borrow take at most 64 MiB per call and have no
TensorFlow; lossless WebP halves the 150 MB of training batches, so the set
travels in parts and is rebuilt there in the official pickle layout.

    python scripts/pack_cifar.py pack ../shared/data/cifar-10-batches-py OUT_DIR [BATCH ...]
    python scripts/pack_cifar.py unpack OUT_DIR cifar-10-batches-py

BATCH names the batches to pack (e.g. data_batch_1 data_batch_2); default all.
"""

import math
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COLS = 200  # images per mosaic row at most


def pack(src: Path, dst: Path, *names: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in [src / name for name in names] or sorted(src.glob("*_batch*")):
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        cols = math.gcd(len(batch[b"data"]), COLS)  # 200 for CIFAR's 10,000 images: a 50 x 200 mosaic
        rows = len(batch[b"data"]) // cols
        x = batch[b"data"].reshape(rows, cols, 3, 32, 32).transpose(0, 3, 1, 4, 2).reshape(rows * 32, cols * 32, 3)
        Image.fromarray(x).save(dst / f"{path.name}.webp", lossless=True, quality=100, method=4)
        np.save(dst / f"{path.name}.labels.npy", np.asarray(batch[b"labels"], np.uint8))
    (dst / "batches.meta").write_bytes((src / "batches.meta").read_bytes())


def unpack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.webp")):
        x = np.asarray(Image.open(path).convert("RGB"))
        data = x.reshape(x.shape[0] // 32, 32, x.shape[1] // 32, 32, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3072)
        labels = np.load(src / path.name.replace(".webp", ".labels.npy")).tolist()
        with open(dst / path.stem, "wb") as f:
            pickle.dump({b"data": np.ascontiguousarray(data), b"labels": labels}, f)
    (dst / "batches.meta").write_bytes((src / "batches.meta").read_bytes())


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:])
