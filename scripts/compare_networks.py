"""The paper's Table 3 in small: networks trained with one recipe and budget, one after another.

    python scripts/compare_networks.py model-c strided-cnn-c convpool-cnn-c all-cnn-c \\
        --recipe configs/screening/c-family.toml --data-dir ../shared/data --root ~/allcnn-runs/c-family

Each network trains into ROOT/NAME with `allcnn train --config RECIPE --variant NAME` (the
recipe's seed; run the script again after any stop: each run resumes, a finished one is
kept). Then a Markdown table: best validation accuracy (the 5,000 held-out images), test
accuracy of best.weights.h5 on the full test_batch (float32, as `allcnn evaluate`), the median
epoch time, forward FLOPs per image, and the paper's error (Table 3: no augmentation, 350 epochs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from allcnn.benchmark import model_flops
from allcnn.config import VARIANTS
from allcnn.evaluation import evaluate
from allcnn.model import build_model, load_classifier
from allcnn.run_folder import RunFolder, best_val_accuracy

# Table 3 of Springenberg et al. (2015): CIFAR-10 test error without augmentation.
PAPER_ERROR = {
    "model-a": 12.47, "strided-cnn-a": 13.46, "convpool-cnn-a": 10.21, "all-cnn-a": 10.30,
    "model-b": 10.20, "strided-cnn-b": 10.98, "convpool-cnn-b": 9.33, "all-cnn-b": 9.10,
    "model-c": 9.74, "strided-cnn-c": 10.19, "convpool-cnn-c": 9.31, "all-cnn-c": 9.08,
}


def train(name: str, recipe: str, data_dir: str, out: Path) -> None:
    """Trains (or resumes) one network's run; stops the script if it fails (train said why)."""
    command = [sys.executable, "-m", "allcnn", "train", "--out", str(out), "--data-dir", data_dir]
    command += ["--resume"] if (out / "config.toml").exists() else ["--config", recipe, "--variant", name]
    if subprocess.run(command).returncode:
        sys.exit(f"error: training {name} in {out} failed; run the script again to resume it")


def row(name: str, out: Path, data_dir: str) -> str:
    """One network's line of the table, measured from its run folder."""
    history = RunFolder(out).read_history()
    test = evaluate(load_classifier(out / "best.weights.h5", precision="float32"), data_dir=data_dir)["top1"]
    seconds = statistics.median(float(epoch["epoch_seconds"]) for epoch in history)
    flops = model_flops(build_model(name))["forward"]
    return (f"| {name} | {len(history)} | {100 * best_val_accuracy(history):.2f}% | {100 * test:.2f}% | "
            f"{seconds:.0f} s | {flops / 1e6:.0f}M | {100 - PAPER_ERROR[name]:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("networks", nargs="+", choices=sorted(PAPER_ERROR), metavar="NETWORK",
                        help=f"any of {', '.join(v for v in VARIANTS if v in PAPER_ERROR)}")
    parser.add_argument("--recipe", required=True, help="a TOML recipe (path or name in configs/)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--root", type=Path, required=True, help="one run folder per network under it")
    args = parser.parse_args()
    for name in args.networks:
        train(name, args.recipe, args.data_dir, args.root / name)
    print("| network | epochs | best val | test | epoch time | forward FLOPs/image | paper's test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name in args.networks:
        print(row(name, args.root / name, args.data_dir))


if __name__ == "__main__":
    main()
