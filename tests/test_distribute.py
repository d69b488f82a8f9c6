"""Data parallelism on CPU: JAX DataParallel (one and two processes), TF MirroredStrategy.

Each run is a subprocess, because the backend and the device count are fixed
when a process starts. Tolerance: with dropout off, the losses of a 2-replica
run and a 1-device run with the same global batch and data order agreed to
5e-7 here (float32; only the order of the gradient sums differs); we allow
1e-5. With dropout on they differed by up to 5e-4 (loss) and 3e-3 (val_loss)
after one epoch, as the dropout draws of the sharded step differ.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from allcnn.cli import main
from allcnn.config import tomllib
from conftest import needs_jax

TOLERANCE = 1e-5
COMMON = ["--val-size", "40", "--precision", "float32", "--lr", "0.01", "--schedule", "cosine"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _no_dropout(tmp_path: Path) -> list[str]:
    recipe = tmp_path / "no-dropout.toml"
    recipe.write_text("input_dropout = 0.0\ndropout = 0.0\n")
    return ["--config", str(recipe)]


def _jax_env(devices: int = 1) -> dict:
    return _env(KERAS_BACKEND="jax", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _train(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "allcnn", "train", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _finish(process) -> str:
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return output


def _losses(run: Path) -> list[tuple[float, float]]:
    return [(float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(open(run / "history.csv"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b) -> bool:
    return all(abs(x - y) <= TOLERANCE for pair_a, pair_b in zip(a, b, strict=True) for x, y in zip(pair_a, pair_b))


@needs_jax
@pytest.mark.slow
def test_jax_data_parallel_matches_one_device_with_the_same_global_batch(cifar_dir, tmp_path):
    env = _jax_env(devices=2)
    data = ["--data-dir", str(cifar_dir), "--epochs", "1", *COMMON, *_no_dropout(tmp_path)]
    parallel = _train([*data, "--out", str(tmp_path / "dp"), "--distribute", "data-parallel", "--batch-size", "8",
                       "--lr-scaling", "none"], env)
    output = _finish(parallel)
    assert "distribute: data-parallel: 2 replicas on" in output and "global batch 16" in output
    single = _finish(_train([*data, "--out", str(tmp_path / "one"), "--distribute", "none", "--batch-size", "16"],
                            env))
    assert "distribute: none: 1 replica" in single

    dp, one = _losses(tmp_path / "dp"), _losses(tmp_path / "one")
    assert _close(dp, one), (dp, one)
    config = tomllib.loads((tmp_path / "dp" / "config.toml").read_text())
    assert config["distribute"] == "data-parallel" and config["lr_scaling"] == "none"
    layout = json.loads((tmp_path / "dp" / "distribution.json").read_text())
    assert layout["replicas"] == 2 and layout["global_batch_size"] == 16 and layout["lr"] == 0.01


@needs_jax
def test_linear_lr_scaling_is_recorded(cifar_dir, tmp_path):
    output = _finish(_train(["--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), "--epochs", "1",
                             "--batch-size", "8", "--distribute", "data-parallel", *COMMON], _jax_env(devices=2)))
    assert "global batch 16, lr 0.02" in output
    assert "lr 0.02 (linear lr scaling)" in (tmp_path / "run" / "config.toml").read_text()


def _two_processes(args, outs, port):
    cluster = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    return [_train([*args, *cluster, "--process-id", str(i), "--out", str(out)], _jax_env())
            for i, out in enumerate(outs)]


@needs_jax
@pytest.mark.slow
def test_two_processes_finish_and_only_process_0_writes(cifar_dir, tmp_path):
    args = ["--data-dir", str(cifar_dir), "--epochs", "1", "--batch-size", "8", "--test", *COMMON]
    chief, other = tmp_path / "run", tmp_path / "process-1"
    outputs = [_finish(p) for p in _two_processes(args, [chief, other], _free_port())]
    assert "data-parallel: 2 replicas" in outputs[0] and "process 0 of 2" in outputs[0]
    assert ", test accuracy " in outputs[0]  # process 0 evaluates alone, outside the distribution
    assert "process 1 finished 1 epochs; process 0 wrote the run folder" in outputs[1]
    assert len(_losses(chief)) == 1 and (chief / "last.weights.h5").exists()
    assert not other.exists()


@needs_jax
@pytest.mark.slow
def test_a_lost_worker_stops_the_run_and_resume_continues(cifar_dir, tmp_path):
    args = ["--data-dir", str(cifar_dir), "--epochs", "6", "--batch-size", "8", *COMMON]
    run = tmp_path / "run"
    chief, other = _two_processes(args, [run, tmp_path / "process-1"], _free_port())
    deadline = time.time() + 300
    while not (run / "history.csv").exists() or len(_losses(run)) < 1:
        assert time.time() < deadline and chief.poll() is None, chief.communicate()[0]
        time.sleep(0.2)
    other.send_signal(signal.SIGKILL)
    other.wait()
    output = chief.communicate(timeout=300)[0]
    assert chief.returncode == 1, output
    assert "another process of the run stopped" in output and "restart every process with --resume" in output
    assert "Traceback" not in output and "Check failure" not in output
    done = len(_losses(run))
    assert 1 <= done < 6

    for process in _two_processes(["--resume", "--data-dir", str(cifar_dir)], [run, run], _free_port()):
        _finish(process)
    assert [r["epoch"] for r in csv.DictReader(open(run / "history.csv"))] == [str(e) for e in range(6)]


MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from allcnn.config import make_config
    from allcnn.training import train
    common = dict(epochs=1, val_size=40, input_dropout=0.0, dropout=0.0, precision="float32", lr=0.01, schedule="cosine", lr_scaling="none")
    data_dir, out = sys.argv[1], sys.argv[2]
    train(make_config(distribute="mirrored", batch_size=8, **common), out + "/mirrored", data_dir=data_dir)
    train(make_config(distribute="none", batch_size=16, **common), out + "/one", data_dir=data_dir)
""")


@pytest.mark.slow
def test_tf_mirrored_on_two_logical_cpus_matches_one_device(cifar_dir, tmp_path):
    process = subprocess.run([sys.executable, "-c", MIRRORED, str(cifar_dir), str(tmp_path)], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "mirrored: 2 replicas on cpu:0, cpu:1" in process.stdout
    mirrored, one = _losses(tmp_path / "mirrored"), _losses(tmp_path / "one")
    assert _close(mirrored, one), (mirrored, one)


@pytest.mark.parametrize("args, message", [
    (["--distribute", "data-parallel"], "data-parallel is keras.distribution (JAX); with the tensorflow backend use mirrored"),
    (["--num-processes", "2", "--process-id", "0"], "several processes need KERAS_BACKEND=jax"),
])
def test_engine_mismatch_is_one_line(cifar_dir, tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
