import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from allcnn import benchmark
from allcnn.cli import main
from allcnn.model import build_model
from conftest import needs_jax

# 2 * H_out * W_out * K * K * C_in * C_out for the paper variant, by hand.
PAPER_FORWARD_FLOPS = {
    "conv1": 2 * 32 * 32 * 3 * 3 * 3 * 96,  # 5,308,416
    "conv2": 2 * 32 * 32 * 3 * 3 * 96 * 96,  # 169,869,312
    "conv3": 2 * 16 * 16 * 3 * 3 * 96 * 96,  # stride 2
    "conv4": 2 * 16 * 16 * 3 * 3 * 96 * 192,
    "conv5": 2 * 16 * 16 * 3 * 3 * 192 * 192,
    "conv6": 2 * 8 * 8 * 3 * 3 * 192 * 192,  # stride 2
    "conv7": 2 * 6 * 6 * 3 * 3 * 192 * 192,  # valid: 8x8 -> 6x6
    "conv8": 2 * 6 * 6 * 1 * 1 * 192 * 192,
    "conv9": 2 * 6 * 6 * 1 * 1 * 192 * 10,
}
# Model C (Table 1): the same convs at stride 1, a max-pooling (no FLOPs counted) halving the maps after each stage.
MODEL_C_FORWARD_FLOPS = {
    "conv1": 2 * 32 * 32 * 3 * 3 * 3 * 96,
    "conv2": 2 * 32 * 32 * 3 * 3 * 96 * 96,
    "conv3": 2 * 16 * 16 * 3 * 3 * 96 * 192,  # after the first max-pooling
    "conv4": 2 * 16 * 16 * 3 * 3 * 192 * 192,
    "conv5": 2 * 6 * 6 * 3 * 3 * 192 * 192,  # after the second, valid: 8x8 -> 6x6
    "conv6": 2 * 6 * 6 * 1 * 1 * 192 * 192,
    "conv7": 2 * 6 * 6 * 1 * 1 * 192 * 10,
}
TINY = ["benchmark", "--precision", "float32", "--batch-size", "2", "--steps", "1", "--repeats", "1"]
# `allcnn` with TensorFlow unimportable, as on a machine that has JAX alone.
WITHOUT_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None; from allcnn.cli import main; main(sys.argv[1:])"


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    """One real `allcnn benchmark --json` run on minimal settings, shared by the tests below."""
    result = CliRunner().invoke(main, [*TINY, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # fails unless stdout is exactly one JSON object


def test_flops_match_hand_computed_values():
    flops = benchmark.conv_flops(build_model("paper"))
    assert flops["conv1"] == 5_308_416
    assert flops["conv2"] == 169_869_312
    assert flops == PAPER_FORWARD_FLOPS
    total = benchmark.model_flops(build_model("paper"))
    assert total == {"forward": 541_596_672, "train": 3 * 541_596_672}


def test_flops_of_a_max_pooling_network():
    assert benchmark.conv_flops(build_model("model-c")) == MODEL_C_FORWARD_FLOPS


def test_spread_is_median_and_range():
    assert benchmark.Spread.of([3.0, 1.0, 2.0, 10.0]) == benchmark.Spread(2.5, 1.0, 10.0)


def test_all_skips_emulated_bf16(monkeypatch):
    monkeypatch.setattr(benchmark.hardware, "has_native_bf16", lambda flags=None: False)
    assert [policy for policy, _ in benchmark.policies("all", None)] == ["float32"]
    monkeypatch.setattr(benchmark.hardware, "has_native_bf16", lambda flags=None: True)
    assert [policy for policy, _ in benchmark.policies("all", None)] == ["float32", "mixed_bfloat16"]


def test_json_has_every_figure(tiny_result):
    assert set(tiny_result) == {"machine", "protocol", "flops_per_image", "ceiling_gflops",
                                "pipeline_images_per_s", "runs", "skipped"}
    assert {"cpu", "cores", "native_bf16", "backend", "tensorflow", "keras"} <= set(tiny_result["machine"])
    assert tiny_result["skipped"] == {}  # the TensorFlow backend skips nothing
    assert tiny_result["flops_per_image"]["forward"] == sum(PAPER_FORWARD_FLOPS.values())
    assert tiny_result["protocol"]["variant"] == "paper"
    assert tiny_result["ceiling_gflops"]["float32"]["median"] > 0
    assert tiny_result["pipeline_images_per_s"]["2"]["median"] > 0
    (run,) = tiny_result["runs"]
    assert (run["precision"], run["batch_size"]) == ("float32", 2)
    for task in ("train", "train_bn", "infer"):
        rate = run[task]["images_per_s"]
        assert rate["min"] <= rate["median"] <= rate["max"]
        assert run[task]["gflops"]["median"] > 0 and run[task]["percent_of_ceiling"] > 0


def test_table_is_the_default_output(tiny_result, monkeypatch):
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *args, **kwargs: tiny_result)
    result = CliRunner().invoke(main, TINY)
    assert result.exit_code == 0, result.output
    assert not result.stdout.lstrip().startswith("{")
    for text in ("native bf16", "FLOPs per image: forward 541.6 M", "ceiling: float32", "input pipeline",
                 "% of ceiling", "float32             2 train", "float32             2 train_bn",
                 "float32             2 infer", "train_bn trains at"):
        assert text in result.stdout


def test_variant_reaches_the_benchmark(tiny_result, monkeypatch):
    asked = {}
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *args, **kwargs: asked.update(kwargs) or tiny_result)
    result = CliRunner().invoke(main, [*TINY, "--variant", "model-c"])
    assert result.exit_code == 0, result.output
    assert asked["variant"] == "model-c"


@pytest.mark.slow
def test_thread_pools_are_applied_in_a_fresh_process():
    """TensorFlow only takes thread counts before its first op, so this needs its own process."""
    done = subprocess.run([sys.executable, "-m", "allcnn", *TINY, "--intra-threads", "1", "--inter-threads", "1",
                           "--no-deterministic", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert (result["machine"]["intra_op_threads"], result["machine"]["inter_op_threads"]) == (1, 1)
    assert result["protocol"]["deterministic"] is False


@pytest.mark.slow
@needs_jax
def test_jax_without_tensorflow_skips_only_tensorflow_settings():
    """A borrowed GPU machine may have JAX and no TensorFlow: the benchmark runs, and says what it skipped."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    args = ["benchmark", "--precision", "float32", "--batch-size", "8", "--steps", "1", "--repeats", "1"]
    done = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "jax backend" in done.stdout and "TensorFlow 2" not in done.stdout
    for task in ("train", "train_bn", "infer"):
        assert f"float32             8 {task}" in done.stdout
    assert "skipped: tensorflow, onednn_opts, intra_op_threads, inter_op_threads, deterministic " \
           "(the jax backend runs without TensorFlow)" in done.stdout
