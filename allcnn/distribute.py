"""Data-parallel training on the engines Keras 3 supports; no scheme of our own.

- TensorFlow backend: `tf.distribute.MirroredStrategy` over the GPUs of one
  host (or its logical CPU devices, which is how the tests prove the path).
- JAX backend: `keras.distribution.DataParallel` over every device of every
  process. Several hosts join through `keras.distribution.initialize()`, the
  multi-host path Keras documents, which calls `jax.distributed.initialize()`.

Keras 3 with TensorFlow's `MultiWorkerMirroredStrategy` is an open upstream
problem (keras-team/keras issue 20585), so several hosts means the JAX backend.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import keras

from allcnn.config import TrainConfig
from allcnn.errors import AllcnnError
from allcnn.hardware import keras_setting


class DistributeError(AllcnnError, RuntimeError):
    """The requested distribution does not fit this backend or these devices."""


class WorkerLost(DistributeError):
    """Another process of a multi-process run stopped; the run cannot go on."""


@dataclass
class Replicas:
    """Where one training step runs: `count` devices across `processes` processes."""

    mode: str
    devices: list[str]
    process_id: int = 0
    processes: int = 1
    strategy: object = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return len(self.devices)

    @property
    def is_chief(self) -> bool:
        """Process 0 alone writes the run folder."""
        return self.process_id == 0

    def scope(self):
        """Where the model must be built and compiled (the strategy's scope on TensorFlow)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def layout(self, config: TrainConfig) -> dict:
        """Global batch and lr of `config` over these replicas: its batch_size is per replica."""
        scale = self.count if config.lr_scaling == "linear" else 1
        return {"mode": self.mode, "replicas": self.count, "processes": self.processes, "devices": self.devices,
                "global_batch_size": config.batch_size * self.count, "lr": config.lr * scale}

    def describe(self) -> str:
        text = f"{self.mode}: {self.count} replica{'s' if self.count > 1 else ''} on {', '.join(self.devices)}"
        if self.processes > 1:
            text += f"; process {self.process_id} of {self.processes}"
        return text


def join_cluster(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-process JAX run; must come before anything touches a JAX device.

    Each process runs the same command with its own `process_id`; process 0
    hosts the coordinator at `coordinator_address` (host:port).
    """
    if keras.backend.backend() != "jax":
        raise DistributeError("several processes need KERAS_BACKEND=jax (Keras 3 does not support TensorFlow's "
                              "MultiWorkerMirroredStrategy, keras-team/keras issue 20585)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributeError(f"--process-id {process_id} is not in 0..{num_processes - 1}")
    try:
        keras.distribution.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        raise DistributeError(f"could not join the cluster at {coordinator_address}: {str(e).splitlines()[0]}") from None


def setup(mode: str, use_gpu: bool) -> Replicas:
    """Resolves `mode` for this backend and these devices, and makes it current.

    `auto` is data parallel over all local GPUs when there are several (or
    over every process's devices in a multi-process JAX run), else `none`.
    """
    backend = keras.backend.backend()
    if mode == "auto":
        mode = _auto_mode(backend, use_gpu)
    if mode == "none":
        return Replicas("none", ["gpu:0" if use_gpu else "cpu:0"])
    if mode == "mirrored":
        if backend != "tensorflow":
            raise DistributeError(f"--distribute mirrored is TensorFlow's strategy; with the {backend} backend use "
                                  "data-parallel")
        return _mirrored(use_gpu)
    if backend != "jax":
        raise DistributeError(f"--distribute data-parallel is keras.distribution (JAX); with the {backend} backend "
                              "use mirrored")
    return _data_parallel(use_gpu)


def _auto_mode(backend: str, use_gpu: bool) -> str:
    if backend == "jax":
        import jax

        several = jax.process_count() > 1 or (use_gpu and jax.local_device_count() > 1)
        return "data-parallel" if several else "none"
    if backend == "tensorflow" and use_gpu:
        import tensorflow as tf

        return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "none"
    return "none"


def _mirrored(use_gpu: bool) -> Replicas:
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("GPU" if use_gpu else "CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    short = [name.split("device:")[-1].lower() for name in devices]
    return Replicas("mirrored", short, strategy=strategy)


def _data_parallel(use_gpu: bool) -> Replicas:
    import jax

    devices = keras.distribution.list_devices("gpu" if use_gpu else "cpu")
    distribution = keras.distribution.DataParallel(devices=devices)
    # Each process feeds its own slice of every global batch (CifarBatches' shard),
    # so Keras must not try to shard the input itself (it can only shard tf.data).
    distribution.auto_shard_dataset = False
    keras.distribution.set_distribution(distribution)
    return Replicas("data-parallel", list(devices), process_id=jax.process_index(), processes=jax.process_count())


def is_worker_loss(error: BaseException) -> bool:
    """Whether an error raised in a multi-process step means another process went away."""
    text = str(error)
    return any(sign in text for sign in ("Connection closed by peer", "Gloo", "heartbeat", "coordination service",
                                         "NCCL", "DEADLINE_EXCEEDED", "UNAVAILABLE"))


def outside_distribution() -> contextlib.AbstractContextManager:
    """Runs a block that process 0 does alone (a save, the final test) with no distribution set.

    Each `save_weights` makes a reference Optimizer, with variables, to learn
    which attributes to skip (Keras 3.15 caches it under a misspelt key, so
    every save does). Under a multi-process distribution creating a variable
    is a collective step, and process 0 saving alone would wait forever for
    the others; outside the distribution the variable is local. The saved
    values themselves are replicated, so process 0 holds them all.
    """
    return keras_setting(keras.distribution.distribution, keras.distribution.set_distribution, None)
