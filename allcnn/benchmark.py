"""`allcnn benchmark`: how fast All-CNN-C (or another variant) trains and infers here, and how close that is to
the machine's ceiling.

Every throughput is images/s on synthetic CIFAR-shaped data, timed after a
warm-up over several repetitions and reported as median, min and max: CPU
timings of this model vary up to 2x between identical runs.

FLOPs count a multiply-add as 2 and cover the convolutions only (bias, ReLU,
max- and average pooling and softmax add well under 1%). A training step counts 3x the forward
pass (forward, plus gradients with respect to inputs and to weights), the
usual convention. The ceiling is one large matmul's GFLOP/s: the best a dense
kernel reaches here in float32 and, where the CPU has it natively, bfloat16.

Under the TensorFlow backend it also sizes TensorFlow's thread pools, turns on
op determinism and feeds tf.data. Other backends skip those settings, and the
report names them (`skipped`): they would change nothing there, and a machine
with JAX alone has no TensorFlow to import.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import keras
import numpy as np

from allcnn import hardware
from allcnn.config import make_config
from allcnn.hardware import dtype_policy
from allcnn.inference import Classifier
from allcnn.model import build_model
from allcnn.optim import compile_model
from allcnn.pipeline import CifarBatches
from allcnn.preprocessing import Preprocessing

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf
else:  # TensorFlow's settings would change nothing here, and it may not be installed
    tf = None

# What only TensorFlow has (`machine` and `protocol` keys), reported as skipped under other backends.
TENSORFLOW_ONLY = ("tensorflow", "onednn_opts", "intra_op_threads", "inter_op_threads", "deterministic")

MATMUL_SIZE = 2048
_CLASSES = 10
_IMAGE_SHAPE = (32, 32, 3)
# Roughly CIFAR-10's channel statistics; any fixed values cost the same.
_PREPROCESSING = Preprocessing("standardize", [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])


@dataclass
class Spread:
    """Median and range of repeated measurements."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        """Rounded to 0.1: run-to-run noise is far larger."""
        return cls(*(round(v, 1) for v in (statistics.median(values), min(values), max(values))))

    def scaled(self, factor: float) -> "Spread":
        return Spread.of([self.median * factor, self.min * factor, self.max * factor])


def timed_rates(work: Callable[[int], float], repeats: int) -> Spread:
    """Runs `work(repetition)` once to warm up, then `repeats` times; `work` returns units done.

    The warm-up absorbs tracing, oneDNN kernel selection and allocator growth.
    """
    work(0)
    rates = []
    for repetition in range(1, repeats + 1):
        start = time.perf_counter()
        done = work(repetition)
        rates.append(done / (time.perf_counter() - start))
    return Spread.of(rates)


def conv_flops(model: keras.Model) -> dict[str, int]:
    """Forward FLOPs per image of each Conv2D: 2 * H_out * W_out * K_h * K_w * C_in * C_out."""
    flops = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w, c_in, _ = layer.kernel.shape
            flops[layer.name] = 2 * h * w * k_h * k_w * c_in * c_out
    return flops


def model_flops(model: keras.Model) -> dict[str, int]:
    """FLOPs per image: forward, and forward+backward (3x forward)."""
    forward = sum(conv_flops(model).values())
    return {"forward": forward, "train": 3 * forward}


def configure_threads(intra: int, inter: int) -> None:
    """Sizes TensorFlow's op thread pools (0 keeps its default); TensorFlow allows it only before its first op.
    Other backends have no such pools: nothing to size."""
    if tf is None:
        return
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)


def matmul_ceiling(dtype: str, repeats: int, size: int = MATMUL_SIZE, chain: int = 4) -> Spread:
    """GFLOP/s of `chain` size x size matmuls: the dense-kernel ceiling the model's figures are compared to."""
    a = keras.random.normal((size, size), dtype=dtype, seed=1)
    b = keras.random.normal((size, size), dtype=dtype, seed=2)

    def work(_: int) -> float:
        for _ in range(chain):
            float(keras.ops.cast(keras.ops.matmul(a, b)[0, 0], "float32"))  # waits for the result
        return chain * 2 * size**3 / 1e9

    return timed_rates(work, repeats)


def synthetic_batch(batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardized-looking inputs and one-hot labels of CIFAR-10's shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, *_IMAGE_SHAPE), dtype=np.float32)
    y = np.eye(_CLASSES, dtype=np.float32)[rng.integers(0, _CLASSES, batch_size)]
    return x, y


def synthetic_images(n: int) -> np.ndarray:
    """Random uint8 images, what the pipeline and `evaluate` start from."""
    return np.random.default_rng(0).integers(0, 256, (n, *_IMAGE_SHAPE), dtype=np.uint8)


def synthetic_pipeline(batch_size: int, steps: int) -> CifarBatches:
    """`allcnn train`'s pipeline (shuffle, flips, 5-pixel translations) over random images."""
    n = batch_size * steps
    labels = np.eye(_CLASSES, dtype=np.float32)[np.random.default_rng(1).integers(0, _CLASSES, n)]
    return CifarBatches(synthetic_images(n), labels, _PREPROCESSING, batch_size, shuffle=True, flip=True, translate=5)


def pipeline_rate(batch_size: int, steps: int, repeats: int) -> Spread:
    """Images/s the input pipeline alone delivers, one new epoch's order per repetition."""
    batches = synthetic_pipeline(batch_size, steps)

    def work(repetition: int) -> float:
        batches.set_epoch(repetition)
        return sum(len(batches[i][0]) for i in range(len(batches)))

    return timed_rates(work, repeats)


class _SameBatch(keras.utils.PyDataset):
    """One batch, already backend tensors, `steps` times: feed="tensors" where tf.data is not at hand."""

    def __init__(self, batch: tuple[np.ndarray, np.ndarray], steps: int):
        super().__init__()
        self._batch, self._steps = tuple(keras.ops.convert_to_tensor(a) for a in batch), steps

    def __len__(self) -> int:
        return self._steps

    def __getitem__(self, index: int) -> tuple:
        return self._batch


class _EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch of `fit`; the first is the warm-up (tracing)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def train_rate(policy: str, batch_size: int, steps: int, repeats: int, feed: str = "tensors",
               batch_norm: bool = False, variant: str = "paper") -> Spread:
    """Images/s of `model.fit` compiled exactly as `allcnn train` compiles it (SGD Nesterov, L2),
    with `batch_norm` the network a batch-norm recipe trains (configs/release-bn.toml).

    feed="tensors" repeats one in-memory batch, so only the train step counts;
    feed="pipeline" feeds `allcnn train`'s augmenting `CifarBatches`, so the
    figure includes the pipeline as `allcnn train` runs it.
    """
    with dtype_policy(policy):
        model = compile_model(make_config(variant=variant, batch_size=batch_size, precision=policy,
                                          batch_norm=batch_norm), steps)
    if feed == "pipeline":
        data, steps_per_epoch = synthetic_pipeline(batch_size, steps), None
    elif tf is None:
        data, steps_per_epoch = _SameBatch(synthetic_batch(batch_size), steps), None
    else:
        data, steps_per_epoch = tf.data.Dataset.from_tensors(synthetic_batch(batch_size)).repeat(), steps
    timer = _EpochTimer()
    model.fit(data, epochs=repeats + 1, steps_per_epoch=steps_per_epoch, callbacks=[timer], shuffle=False, verbose=0)
    return Spread.of([batch_size * steps / s for s in timer.seconds[1:]])


def infer_rate(policy: str, batch_size: int, steps: int, repeats: int, variant: str = "paper") -> Spread:
    """Images/s of `evaluate` and `predict`'s own path (`allcnn.inference.Classifier`): uint8 images in,
    preprocessing, the compiled forward pass, float32 probabilities out."""
    with dtype_policy(policy):
        classifier = Classifier(build_model(variant), _PREPROCESSING, precision=policy)
    images = synthetic_images(batch_size * steps)

    def work(_: int) -> float:
        return len(classifier.probabilities(images, batch_size))

    return timed_rates(work, repeats)


def policies(requested: str, gpu: hardware.Accelerator | None) -> list[tuple[str, str]]:
    """(policy, reason) pairs to measure; `all` adds bf16 only where it is native, as emulated bf16 takes hours."""
    if requested != "all":
        return [hardware.resolve_precision(requested, gpu)]
    chosen = [("float32", "requested")]
    if gpu is not None or hardware.has_native_bf16():
        chosen.append(("mixed_bfloat16", "requested"))
    return chosen


def machine(gpu: hardware.Accelerator | None) -> dict:
    """What the figures were measured on; TensorFlow's settings are None under other backends."""
    return {
        "device": hardware.describe(gpu),
        "cpu": hardware.cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "native_bf16": hardware.has_native_bf16(),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "tensorflow": tf and tf.__version__,
        "onednn_opts": tf and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "intra_op_threads": tf and tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf and tf.config.threading.get_inter_op_parallelism_threads(),
    }


def _figures(rate: Spread, flops_per_image: int, ceiling: Spread) -> dict:
    """Images/s, the GFLOP/s they amount to, and that median as % of the ceiling's best (max) repetition."""
    gflops = rate.scaled(flops_per_image / 1e9)
    return {"images_per_s": asdict(rate), "gflops": asdict(gflops),
            "percent_of_ceiling": round(100 * gflops.median / ceiling.max, 1)}


def run_benchmark(precision: str = "auto", batch_sizes: tuple[int, ...] = (128,), *, steps: int = 10,
                  repeats: int = 5, intra_threads: int = 0, inter_threads: int = 0, feed: str = "tensors",
                  device: str = "auto", deterministic: bool = True, variant: str = "paper") -> dict:
    """Measures everything `allcnn benchmark` reports of the `variant` network; returns it as one JSON-able dict.

    `deterministic` enables TensorFlow's op determinism on the CPU, as `allcnn
    train` does, so the figures are what training gets; turn it off to see its
    cost. TensorFlow cannot turn it off again within a process. Under another
    backend the TensorFlow settings are skipped, and `skipped` says so.
    """
    configure_threads(intra_threads, inter_threads)
    gpu = hardware.select_device(device)
    cases = [(policy, reason, batch_size) for policy, reason in policies(precision, gpu) for batch_size in batch_sizes]
    # allcnn train runs batch norm without op determinism (allcnn.training._configure), and
    # TensorFlow cannot turn it off again within a process: the batch-norm steps come first.
    batch_norm = {(policy, batch_size): train_rate(policy, batch_size, steps, repeats, feed, True, variant)
                  for policy, _, batch_size in cases}
    if tf is not None and gpu is None and deterministic:
        tf.config.experimental.enable_op_determinism()
    ceilings = {"float32": matmul_ceiling("float32", repeats)}
    if gpu is not None or hardware.has_native_bf16():
        ceilings["bfloat16"] = matmul_ceiling("bfloat16", repeats)
    flops = model_flops(build_model(variant))
    runs = []
    for policy, reason, batch_size in cases:
        ceiling_dtype = "bfloat16" if policy == "mixed_bfloat16" and "bfloat16" in ceilings else "float32"
        rates = {"train": (train_rate(policy, batch_size, steps, repeats, feed, variant=variant), flops["train"]),
                 "train_bn": (batch_norm[policy, batch_size], flops["train"]),
                 "infer": (infer_rate(policy, batch_size, steps, repeats, variant), flops["forward"])}
        runs.append({"precision": policy, "reason": reason, "batch_size": batch_size, "ceiling": ceiling_dtype,
                     **{task: _figures(rate, work, ceilings[ceiling_dtype]) for task, (rate, work) in rates.items()}})
    return {
        "machine": machine(gpu),
        "protocol": {"variant": variant, "steps": steps, "repeats": repeats, "warmup_repetitions": 1, "feed": feed,
                     "infer_path": "allcnn.inference.Classifier: uint8 in, preprocessing, compiled forward",
                     "deterministic": deterministic and gpu is None and tf is not None, "matmul_size": MATMUL_SIZE,
                     "flops": "conv multiply-adds x2; train = 3x forward",
                     "train_bn": "training with a batch norm after every conv (release-bn), its FLOPs not counted, "
                                 "op determinism off as allcnn train runs it",
                     "percent_of_ceiling": "median GFLOP/s / best matmul repetition"},
        "flops_per_image": flops,
        "ceiling_gflops": {dtype: asdict(spread) for dtype, spread in ceilings.items()},
        "pipeline_images_per_s": {str(b): asdict(pipeline_rate(b, steps, repeats)) for b in batch_sizes},
        "runs": runs,
        "skipped": {} if tf is not None else {key: f"the {keras.backend.backend()} backend runs without TensorFlow"
                                              for key in TENSORFLOW_ONLY},
    }


def _spread(d: dict, digits: int = 0) -> str:
    return f"{d['median']:.{digits}f} ({d['min']:.{digits}f}-{d['max']:.{digits}f})"


def format_table(result: dict) -> str:
    """The human-readable report: machine, ceilings, then one row per precision, batch size and task."""
    m, p = result["machine"], result["protocol"]
    software = f"Keras {m['keras']}, {m['backend']} backend"
    if m["tensorflow"]:
        software = (f"TensorFlow {m['tensorflow']}, {software}, oneDNN opts: {m['onednn_opts']}, threads intra/inter: "
                    f"{m['intra_op_threads']}/{m['inter_op_threads']} (0 = TensorFlow's default)")
    lines = [
        f"device: {m['device']}, {m['usable_cores']} usable cores, native bf16: {'yes' if m['native_bf16'] else 'no'}",
        software,
        f"protocol: {p['repeats']} timed repetitions of {p['steps']} batches after 1 warm-up, median (min-max); "
        f"training fed by {p['feed']}; op determinism {'on' if p['deterministic'] else 'off'}",
        f"{p['variant']}: FLOPs per image: forward {result['flops_per_image']['forward'] / 1e6:.1f} M, "
        f"train {result['flops_per_image']['train'] / 1e6:.1f} M ({p['flops']})",
    ]
    lines += [f"ceiling: {dtype} {MATMUL_SIZE}x{MATMUL_SIZE} matmul {_spread(s, 1)} GFLOP/s (% below: of its max)"
              for dtype, s in result["ceiling_gflops"].items()]
    lines += [f"input pipeline (flips + translations), batch {b}: {_spread(s)} images/s"
              for b, s in result["pipeline_images_per_s"].items()]
    reasons = {run["precision"]: run["reason"] for run in result["runs"]}
    lines += [f"precision {policy}: {reason}" for policy, reason in reasons.items()]
    if result["skipped"]:
        lines.append(f"skipped: {', '.join(result['skipped'])} ({'; '.join(sorted(set(result['skipped'].values())))})")
    header = f"{'precision':<15} {'batch':>5} {'task':<8} {'images/s':>22} {'GFLOP/s':>20} {'% of ceiling':>16}"
    lines += ["", header, "-" * len(header)]
    for run in result["runs"]:
        for task in ("train", "train_bn", "infer"):
            f = run[task]
            percent = f"{f['percent_of_ceiling']}% {run['ceiling']}"
            lines.append(f"{run['precision']:<15} {run['batch_size']:>5} {task:<8} {_spread(f['images_per_s']):>22} "
                         f"{_spread(f['gflops'], 1):>20} {percent:>16}")
        ratio = run["train_bn"]["images_per_s"]["median"] / run["train"]["images_per_s"]["median"]
        lines.append(f"{'':<15} {'':>5} train_bn trains at {100 * ratio:.0f}% of train's images/s (batch norm after every conv)")
    return "\n".join(lines)
