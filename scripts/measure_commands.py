"""Whole-command wall clock (start-up included) and evaluate's peak memory, next to the targets of issue 10.

    python scripts/measure_commands.py [--data-dir ../shared/data] [--weights W] [--runs 5]

Each figure is the median of `--runs` runs (evaluate: one run, it is the long
one). Peak resident memory comes from `/usr/bin/time -v` where present, else
from `getrusage(RUSAGE_CHILDREN)`. A command that is missing or fails (no
weights yet, no data) is reported as skipped with its error, not measured.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from allcnn.hardware import cpu_name, has_native_bf16  # noqa: E402  (no Keras import)

GNU_TIME = Path("/usr/bin/time")


class Skipped(Exception):
    """The command cannot be measured here yet; the message says why."""


def allcnn_command() -> list[str]:
    """The installed `allcnn` script, else this interpreter running the package from the checkout."""
    script = shutil.which("allcnn") or shutil.which("allcnn", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "allcnn"]


def run_timed(argv: list[str], memory: bool = False) -> tuple[float, float | None]:
    """Wall seconds of one run and, if asked, its peak RSS in GB; raises Skipped if it fails."""
    use_gnu_time = memory and GNU_TIME.exists()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        full = [str(GNU_TIME), "-v", "-o", report.name, *argv] if use_gnu_time else argv
        start = time.perf_counter()
        done = subprocess.run(full, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        usage = report.read()
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise Skipped(f"exit {done.returncode}: {lines[-1] if lines else 'no message'}")
    if not memory:
        return seconds, None
    if use_gnu_time:
        kbytes = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", usage).group(1))
    else:  # the largest child so far; evaluate is the largest this script runs
        kbytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, kbytes / 1e6


def supports(command: list[str], name: str) -> None:
    """Raises Skipped when this checkout has no `allcnn <name>` yet."""
    if subprocess.run([*command, name, "--help"], cwd=REPO, capture_output=True).returncode:
        raise Skipped(f"this checkout has no `allcnn {name}` command yet")


def median_seconds(argv: list[str], runs: int) -> float:
    return statistics.median(run_timed(argv)[0] for _ in range(runs))


def one_png(folder: Path) -> Path:
    """A random 32x32 RGB image, the input a user would hand to predict."""
    path = folder / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def report(label: str, measure, target: float, unit: str) -> None:
    """Prints one figure next to its target, or why it was skipped."""
    try:
        value = measure()
    except Skipped as e:
        print(f"{label:<28} skipped: {e}")
        return
    verdict = "ok" if value < target else "MISSES"
    print(f"{label:<28} {value:8.2f} {unit:<2} (target < {target} {unit}: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="CIFAR-10 for evaluate (default: ../shared/data)")
    parser.add_argument("--weights", help="passed to predict and evaluate as --weights")
    parser.add_argument("--runs", type=int, default=5, help="runs of --help and predict (median)")
    args = parser.parse_args()

    command = allcnn_command()
    weights = ["--weights", args.weights] if args.weights else []
    print(f"CPU {cpu_name()} ({os.cpu_count()} cores, native bf16: {'yes' if has_native_bf16() else 'no'})")
    print(f"command: {' '.join(command)}; peak memory via {'/usr/bin/time -v' if GNU_TIME.exists() else 'getrusage'}")

    report("allcnn --help", lambda: median_seconds([*command, "--help"], args.runs), 0.5, "s")
    with tempfile.TemporaryDirectory() as tmp:
        png = one_png(Path(tmp))

        def predict() -> float:
            supports(command, "predict")
            return median_seconds([*command, "predict", str(png), *weights], args.runs)

        report("allcnn predict one.png", predict, 5, "s")

    evaluation: dict[str, float] = {}

    def evaluate() -> float:
        supports(command, "evaluate")
        if not args.data_dir.exists():
            raise Skipped(f"no CIFAR-10 at {args.data_dir}; pass --data-dir")
        evaluation["seconds"], evaluation["gb"] = run_timed(
            [*command, "evaluate", "--data-dir", str(args.data_dir), *weights], memory=True)
        return evaluation["seconds"]

    report("allcnn evaluate (10,000)", evaluate, 45, "s")
    if evaluation:
        report("evaluate peak RSS", lambda: evaluation["gb"], 3, "GB")


if __name__ == "__main__":
    main()
