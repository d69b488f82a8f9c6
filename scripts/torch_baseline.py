"""PyTorch baseline for `allcnn benchmark`: the same All-CNN-C, timed the same way.

Run it in the same sitting as `allcnn benchmark` so both see the same machine
state. It needs PyTorch, which is not an `allcnn` dependency:
`pip install torch==2.13.0` (the CPU wheel).

Protocol, as in `allcnn.benchmark`: synthetic CIFAR-shaped batches, one
warm-up repetition, then `--repeats` timed repetitions of `--steps` batches,
reported as median (min-max) images/s. Training is SGD Nesterov with L2 on the
conv kernels (as `allcnn train`), fed one in-memory batch; inference is
`model.eval()` under `torch.inference_mode()` on float tensors, each batch's
output fetched (`allcnn benchmark` also counts its uint8 preprocessing, ~1%).

Float32 always; `--bf16` adds PyTorch's mixed precision on the CPU,
`torch.autocast("cpu", dtype=torch.bfloat16)` (float32 weights, bf16 compute:
what Keras' mixed_bfloat16 policy does), PyTorch's strongest setting where
the CPU has native bf16 (avx512_bf16 or amx_bf16).

    python scripts/torch_baseline.py --batch-size 128 --repeats 5 --steps 10 [--bf16] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from allcnn.hardware import cpu_name  # noqa: E402  (no Keras import)

PARAMS = 1_369_738
PRECISIONS = ("float32", "mixed_bfloat16")  # the names allcnn benchmark gives them


def all_cnn_c(classes: int = 10) -> nn.Sequential:
    """All-CNN-C, paper variant: dropout 0.2 on the input and 0.5 after each stride-2 conv."""
    def conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.ReLU()]

    model = nn.Sequential(
        nn.Dropout(0.2),
        *conv(3, 96, 3), *conv(96, 96, 3), *conv(96, 96, 3, 2), nn.Dropout(0.5),
        *conv(96, 192, 3), *conv(192, 192, 3), *conv(192, 192, 3, 2), nn.Dropout(0.5),
        *conv(192, 192, 3, padding=0), *conv(192, 192, 1, padding=0), *conv(192, classes, 1, padding=0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS, f"{count} parameters, expected {PARAMS} as in allcnn.model"
    return model


def forward_flops(model: nn.Sequential) -> int:
    """Forward FLOPs per image, from the conv output shapes: 2 * H * W * K * K * C_in * C_out."""
    total = 0
    x = torch.zeros(1, 3, 32, 32)
    for layer in model:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            k_h, k_w = layer.kernel_size
            total += 2 * x.shape[2] * x.shape[3] * k_h * k_w * layer.in_channels * layer.out_channels
    return total


def measure(work: Callable[[], None], images: int, repeats: int) -> dict:
    """Images/s of `work` after one warm-up call: median, min and max over `repeats`."""
    work()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        rates.append(images / (time.perf_counter() - start))
    return {k: round(f(rates), 1) for k, f in (("median", statistics.median), ("min", min), ("max", max))}


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """Where the forward pass runs in bf16 (mixed_bfloat16), or nothing changes (float32)."""
    if precision == "mixed_bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_work(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, steps: int,
               precision: str) -> Callable[[], None]:
    """`steps` SGD Nesterov steps on one batch, as `allcnn train` with the paper recipe;
    under autocast the forward pass and loss only, as PyTorch's AMP recipe has it."""
    kernels = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": kernels, "weight_decay": 0.001}, {"params": biases}],
                                lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()

    def work() -> None:
        model.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        loss.item()

    return work


def infer_work(model: nn.Sequential, x: torch.Tensor, steps: int, precision: str) -> Callable[[], None]:
    """`steps` forward passes in eval mode, each softmax fetched to numpy (float32) as evaluate does."""
    def work() -> None:
        model.eval()
        with torch.inference_mode(), autocast(precision):
            for _ in range(steps):
                torch.softmax(model(x).float(), dim=1).numpy()

    return work


def run(batch_sizes: list[int], steps: int, repeats: int, threads: int, precisions: tuple[str, ...]) -> dict:
    """Everything the table shows, as one JSON-able dict shaped like `allcnn benchmark --json`'s."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    forward = forward_flops(all_cnn_c().eval())
    runs = []
    for precision in precisions:
        for batch in batch_sizes:
            x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
            for task, work, flops in (("train", train_work(all_cnn_c(), x, y, steps, precision), 3 * forward),
                                      ("infer", infer_work(all_cnn_c(), x, steps, precision), forward)):
                rate = measure(work, batch * steps, repeats)
                runs.append({"precision": precision, "batch_size": batch, "task": task, "images_per_s": rate,
                             "gflops": round(rate["median"] * flops / 1e9, 1)})
    return {
        "machine": {"cpu": cpu_name(), "torch": torch.__version__, "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(),
                    "mkldnn": torch.backends.mkldnn.is_available()},
        "protocol": {"steps": steps, "repeats": repeats, "warmup_repetitions": 1,
                     "flops": "conv multiply-adds x2; train = 3x forward"},
        "flops_per_image": {"forward": forward, "train": 3 * forward},
        "runs": runs,
    }


def table(result: dict) -> str:
    m, p = result["machine"], result["protocol"]
    lines = [f"CPU {m['cpu']}; PyTorch {m['torch']}, {m['threads']} threads of {m['cores']} cores, "
             f"oneDNN: {m['mkldnn']}",
             f"protocol: {p['repeats']} timed repetitions of {p['steps']} batches after 1 warm-up, median (min-max)",
             f"FLOPs per image: forward {result['flops_per_image']['forward'] / 1e6:.1f} M, "
             f"train {result['flops_per_image']['train'] / 1e6:.1f} M ({p['flops']})", "",
             f"{'precision':<14} {'batch':>5} {'task':<6} {'images/s':>22} {'GFLOP/s':>8}"]
    for r in result["runs"]:
        rate = r["images_per_s"]
        spread = f"{rate['median']:.0f} ({rate['min']:.0f}-{rate['max']:.0f})"
        lines.append(f"{r['precision']:<14} {r['batch_size']:>5} {r['task']:<6} {spread:>22} {r['gflops']:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, action="append", help="repeat to compare (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="batches per timed repetition")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--bf16", action="store_true",
                        help='also time torch.autocast("cpu", dtype=torch.bfloat16) (mixed_bfloat16)')
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    result = run(args.batch_size or [128], args.steps, args.repeats, args.threads,
                 PRECISIONS if args.bf16 else PRECISIONS[:1])
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
