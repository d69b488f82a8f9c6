"""What this machine is, and which device and precision suit it.

bf16 is a trap on the wrong CPU: measured with this model, `mixed_bfloat16`
trains ~2x faster than float32 on an AMD CPU with AVX-512 BF16 but ~15x
slower on a Zen 3 CPU with AVX2 only, where bf16 is emulated.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from allcnn.errors import AllcnnError

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class DeviceError(AllcnnError, RuntimeError):
    """The requested device does not exist here."""


def _cpuinfo_fields(cpuinfo: str | None) -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo (empty where unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():  # processors are separated by a blank line
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags from `/proc/cpuinfo` (empty where unreadable)."""
    fields = _cpuinfo_fields(cpuinfo)
    return set(fields.get("flags", fields.get("Features", "")).split())


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU model, with its family and model numbers when the name is generic.

    Cloud hosts often report only "AMD EPYC"; the family tells the generations
    apart (AMD: 25 is Zen 3/Zen 4, 26 is Zen 5), which is what speed depends on.
    """
    fields = _cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def has_native_bf16(flags: set[str] | None = None) -> bool:
    return bool(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))


@dataclass
class Accelerator:
    """A GPU the Keras backend can use."""

    name: str
    compute_capability: tuple[int, int] | None


def find_gpu() -> Accelerator | None:
    """The first GPU the active Keras backend sees, or None."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        details = tf.config.experimental.get_device_details(gpus[0])
        return Accelerator(details.get("device_name", "GPU"), details.get("compute_capability"))
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            return None
        cc = getattr(gpus[0], "compute_capability", None)
        return Accelerator(gpus[0].device_kind, tuple(int(v) for v in cc.split(".")) if cc else None)
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        return Accelerator(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
    return None


def select_device(device: str) -> Accelerator | None:
    """Applies `auto|cpu|gpu`; returns the GPU in use or None for the CPU.

    Must run before the first model is built. On TensorFlow, `cpu` hides the
    GPUs and a used GPU gets memory growth, so other processes can share it.
    """
    import keras

    if device == "cpu" and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        return None
    gpu = None if device == "cpu" else find_gpu()
    if device == "gpu" and gpu is None:
        raise DeviceError(f"--device gpu: the {keras.backend.backend()} backend sees no GPU here; use --device cpu or auto")
    if gpu is not None and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        for physical in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(physical, True)
    return gpu


def choose_precision(gpu: Accelerator | None, flags: set[str] | None = None) -> tuple[str, str]:
    """The `auto` precision for this machine, and the reason in words."""
    if gpu is not None:
        if gpu.compute_capability and tuple(gpu.compute_capability) >= (8, 0):
            return "mixed_bfloat16", f"GPU {gpu.name} has native bf16 (compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]})"
        return "mixed_float16", f"GPU {gpu.name} has fast float16 but no native bf16"
    import keras

    if keras.backend.backend() == "jax":
        # Measured on an EPYC with avx512_bf16, batch 64: XLA's CPU convolutions train at
        # 105 images/s in float32 and 96 in bf16, so bf16 buys nothing there.
        return "float32", "XLA (the JAX backend) on a CPU trains no faster in bf16"
    found = sorted(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    if found:
        return "mixed_bfloat16", f"CPU has native bf16 ({', '.join(found)})"
    return "float32", "CPU has no native bf16 (no avx512_bf16/amx_bf16 flag): bf16 would be emulated, many times slower"


def resolve_precision(requested: str, gpu: Accelerator | None, flags: set[str] | None = None) -> tuple[str, str]:
    """Turns `auto` into a policy; warns about bf16 on a CPU that emulates it."""
    if requested == "auto":
        return choose_precision(gpu, flags)
    if requested == "mixed_bfloat16" and gpu is None and not has_native_bf16(flags):
        return requested, "requested; WARNING: this CPU has no native bf16, so training will be many times slower than float32"
    return requested, "requested"


def describe(gpu: Accelerator | None) -> str:
    """One line naming what computes: the GPU, or the CPU and its cores."""
    if gpu is not None:
        return f"GPU {gpu.name}"
    return f"CPU {cpu_name()}, {os.cpu_count()} cores"


@contextlib.contextmanager
def keras_setting(get: Callable[[], object], set: Callable[[object], None], value) -> Iterator[None]:
    """`set(value)` for a block, then what `get()` gave back: Keras keeps the dtype policy and
    the distribution as process globals, which a notebook (or the next run) must keep."""
    previous = get()
    set(value)
    try:
        yield
    finally:
        set(previous)


def dtype_policy(policy: str) -> contextlib.AbstractContextManager:
    """Builds under `policy` (layers take it when built), then restores the global one."""
    import keras

    return keras_setting(keras.config.dtype_policy, keras.config.set_dtype_policy, policy)
