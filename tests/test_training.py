import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from allcnn.cli import main
from allcnn.config import tomllib
from allcnn.hardware import Accelerator, choose_precision, cpu_flags, cpu_name, has_native_bf16, resolve_precision
from allcnn.run_folder import RunError, RunFolder
from allcnn.optim import LearningRate
from conftest import write_cifar_folder

TINY = ["--epochs", "2", "--batch-size", "16", "--val-size", "40", "--precision", "float32", "--lr", "0.01"]


def _train(*args):
    return CliRunner().invoke(main, ["train", *args])


def test_training_leaves_the_global_precision_policy_alone(cifar_dir, tmp_path):
    import keras

    from allcnn.config import load_config
    from allcnn.training import train

    before = keras.config.dtype_policy().name
    config = load_config(epochs=1, batch_size=16, val_size=40, precision="mixed_bfloat16")
    train(config, tmp_path / "run", data_dir=cifar_dir)
    assert keras.config.dtype_policy().name == before == "float32"


def test_two_epochs_write_the_whole_run_folder(cifar_dir, tmp_path):
    out = tmp_path / "run"
    result = _train("--data-dir", str(cifar_dir), "--out", str(out), "--test", *TINY)
    assert result.exit_code == 0, result.output
    assert "precision: float32 (requested)" in result.output
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["epochs"] == 2 and config["variant"] == "paper" and config["milestones"] == [200, 250, 300]
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert json.loads((out / "preprocessing.json").read_text())["method"] == "standardize"
    for weights in ("best.weights.h5", "last.weights.h5"):
        assert (out / weights).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["precision"] == "float32"
    assert 0 <= summary["test_accuracy"] <= 1 and summary["images_per_second"] > 0
    assert summary["best_val_accuracy"] == max(float(r["val_accuracy"]) for r in rows)


def test_backup_marker_names_its_weights(cifar_dir, tmp_path):
    out = tmp_path / "run"
    assert _train("--data-dir", str(cifar_dir), "--out", str(out), *TINY).exit_code == 0
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["weights"] == "epoch-2.weights.h5"
    assert sorted(p.name for p in (out / "backup").glob("*.weights.h5")) == ["epoch-2.weights.h5"]
    # last.weights.h5 is the backup's file under a second name: one weights file written an epoch.
    assert os.path.samefile(out / "last.weights.h5", out / "backup" / "epoch-2.weights.h5")
    # A kill after the next epoch's weights landed but before its marker did: the
    # marker still names epoch 2's file, so resume never reads the newer (here broken) ones.
    for stray in ("epoch-3.weights.h5", "latest.weights.h5"):
        (out / "backup" / stray).write_bytes(b"not weights")
    result = _train("--resume", "--out", str(out), "--data-dir", str(cifar_dir))
    assert result.exit_code == 0, result.output
    # Damaged bookkeeping fails in one line that names the file, and changes nothing.
    for damaged, text in ((out / "distribution.json", "{}"), (out / "backup" / "training_metadata.json", "{no")):
        kept = damaged.read_text()
        damaged.write_text(text)
        result = _train("--resume", "--out", str(out), "--data-dir", str(cifar_dir))
        assert result.exit_code == 1 and f"{damaged}: " in result.output and "damaged" in result.output, result.output
        assert result.output.count("Error: ") == 1 and "Traceback" not in result.output and damaged.read_text() == text
        damaged.write_text(kept)


def test_existing_run_is_refused_and_kept(cifar_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _train("--data-dir", str(cifar_dir), "--out", str(out), *TINY)
    assert result.exit_code == 1 and "already holds a run" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = _train("--resume", "--out", str(tmp_path / "nothing"))
    assert result.exit_code == 1 and "no run in" in result.output


@pytest.mark.parametrize("args, message", [
    (["--epochs", "-3"], "Invalid value for '--epochs'"),
    (["--precision", "fp8"], "Invalid value for '--precision'"),
    (["--lr", "nan"], "lr: must be a finite number, got nan"),
    (["--lr", "inf"], "lr: must be a finite number, got inf"),
    (["--ema-momentum", "nan"], "ema_momentum: must be a finite number, got nan"),
    (["--config", "missing.toml"], "missing.toml: config file not found"),
])
def test_bad_flags_exit_2(args, message, tmp_path):
    result = _train("--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("line, message", [
    ("epoch = 3", "epoch: unknown key"),
    ("epochs = 'ten'", "epochs: expected int, got str"),
    ("epochs = 0", "epochs: must be at least 1"),
    ("cutout = -4", "cutout: must not be negative, got -4"),
    ("schedule = 'linear'", "schedule: 'linear' is not one of"),
    ("milestones = [1.5]", "milestones: expected list"),
    ("lr = 0", "lr: must be positive, got 0.0"),
    ("reparam = true", "reparam: the branches are batch-normed: it needs batch_norm = true"),
    ("weight_decay = nan", "weight_decay: must be a finite number, got nan"),
    ("learning_rate = 1", "learning_rate: unknown key; did you mean lr?"),  # an alias: difflib finds nothing
    ("lr_schedule = 1", "lr_schedule: unknown key; did you mean schedule?"),
    ("ema = 1", "ema: unknown key; did you mean use_ema?"),
    ("validation_split = 1", "validation_split: unknown key; did you mean val_split?"),
    ("decay = 1", "decay: unknown key; did you mean weight_decay, or time_decay (Keras 2's decay)?"),
    ("optimizer = 1", "optimizer: unknown key (known: variant, dataset, "),
])
def test_bad_config_names_the_key(line, message, tmp_path):
    """The same one-line error from a recipe given to the CLI and from a Python override."""
    from allcnn.config import ConfigError, make_config

    recipe = tmp_path / "bad.toml"
    recipe.write_text(line + "\n")
    result = _train("--config", str(recipe), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and message in result.output
    with pytest.raises(ConfigError) as error:
        make_config(**tomllib.loads(line))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("augment, cutout", [(True, 16), (False, 0)])
def test_training_batches_take_the_recipes_cutout(augment, cutout, tmp_path):
    from allcnn.config import make_config
    from allcnn.distribute import Replicas
    from allcnn.run_folder import RunFolder
    from allcnn.training import make_batches

    split = (np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.zeros(8, int))
    train, val = make_batches(make_config(cutout=16, augment=augment), RunFolder(tmp_path), split, split,
                              Replicas("none", ["cpu:0"]), {"global_batch_size": 4}, 10)
    assert (train.cutout, val.cutout) == (cutout, 0)


def test_val_size_override_beats_the_recipes_fraction():
    from allcnn.config import ConfigError, load_config, make_config

    assert load_config("finetune").val_split == 0.2
    assert (load_config("finetune", val_size=100).val_split, load_config("finetune", val_size=100).val_size) == (0, 100)
    assert load_config("finetune", val_size=100, val_split=0.1).val_split == 0.1  # both given: as given
    assert make_config({"val_size": 100, "val_split": 0.1}).val_split == 0.1  # within a recipe: as written
    assert make_config().val_size == 0  # the dataset's default
    with pytest.raises(ConfigError, match="val_size: must not be negative, got -1"):
        make_config(val_size=-1)


def test_plan_states_every_phase():
    from allcnn.config import load_config
    from allcnn.training import plan

    assert plan(load_config("finetune", epochs=1)) == ("plan: 10 epochs of the classifier alone (base frozen, "
                                                       "lr 0.01), then 1 epoch of all layers (cosine, peak lr 0.001)")
    assert plan(load_config(epochs=35, schedule="onecycle")) == "plan: 35 epochs of all layers (onecycle, peak lr 0.05)"
    assert plan(load_config("finetune", head_epochs=0, freeze_base=True, epochs=30, schedule="constant")) == (
        "plan: 30 epochs of the classifier alone (base frozen, lr 0.001)")


def test_resume_takes_the_starting_flags_and_refuses_others(cifar_dir, tmp_path):
    out = tmp_path / "run"
    started = ["--data-dir", str(cifar_dir), "--out", str(out), *TINY]
    assert _train(*started).exit_code == 0
    same = _train(*started, "--resume", "--device", "cpu")
    assert same.exit_code == 0, same.output
    for flags, message in [(["--lr", "0.1"], "these differ from it: --lr 0.1 (run: 0.01)"),
                           (["--config", "paper"], "--epochs 350 (run: 2), --batch-size 128 (run: 16)"),
                           (["--overwrite"], "drop --overwrite")]:
        result = _train("--resume", "--out", str(out), "--data-dir", str(cifar_dir), *flags)
        assert result.exit_code == 2 and message in result.output, result.output


def test_resume_api_checks_flags_against_the_run_without_training(tmp_path):
    from allcnn.config import ConfigError, make_config
    from allcnn.training import resume

    with pytest.raises(RunError, match="no run in"):
        resume(tmp_path / "nothing")
    run, config = RunFolder(tmp_path / "run"), make_config(epochs=2, lr=0.01)
    run.create(config, {"mode": "none", "replicas": 1, "global_batch_size": 128, "lr": 0.01}, overwrite=False,
               class_names=("a", "b"))
    run.check_flags(run.read_config(), None, {"epochs": 2, "lr": 0.01, "seed": None})
    with pytest.raises(ConfigError, match=r"these differ from it: --lr 0.1 \(run: 0.01\)$"):
        run.check_flags(run.read_config(), None, {"lr": 0.1})
    with pytest.raises(ConfigError, match=r"--epochs 350 \(run: 2\)"):
        run.check_flags(run.read_config(), "paper", {})


def test_wrong_data_dir_leaves_no_run_folder(tmp_path):
    result = _train("--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # so the corrected command is not refused


def test_gpu_request_without_gpu(cifar_dir, tmp_path):
    result = _train("--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), "--device", "gpu", *TINY)
    assert result.exit_code == 1 and "sees no GPU" in result.output


def test_auto_precision_with_cpu_flags_faked_both_ways():
    assert choose_precision(None, {"avx2", "avx512_bf16"})[0] == "mixed_bfloat16"
    assert choose_precision(None, {"avx2", "amx_bf16"})[0] == "mixed_bfloat16"
    policy, reason = choose_precision(None, {"avx2", "fma"})
    assert policy == "float32" and "no native bf16" in reason
    assert choose_precision(Accelerator("H100", (9, 0)))[0] == "mixed_bfloat16"
    assert choose_precision(Accelerator("T4", (7, 5)))[0] == "mixed_float16"
    assert "WARNING" in resolve_precision("mixed_bfloat16", None, {"avx2"})[1]
    assert "WARNING" not in resolve_precision("mixed_bfloat16", None, {"avx512_bf16"})[1]


def test_cpu_description_from_cpuinfo():
    # Two processors, as /proc/cpuinfo lists them: the first one's fields count.
    zen5 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\ncpu family\t: 26\n")
    assert cpu_name(zen5) == "AMD EPYC (family 26, model 2)"
    assert cpu_flags(zen5) == {"fpu", "avx2", "avx512_bf16"} and has_native_bf16(cpu_flags(zen5))
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"} and cpu_name("") != ""


def test_learning_rate_schedules():
    lr = lambda schedule, step, **kw: float(LearningRate(0.1, 10, 10, schedule, **kw)(step))  # noqa: E731
    assert lr("step", 0, milestones=[2, 5]) == pytest.approx(0.1)
    assert lr("step", 20, milestones=[2, 5]) == pytest.approx(0.01)
    assert lr("step", 50, milestones=[2, 5]) == pytest.approx(0.001)
    assert lr("cosine", 0) == pytest.approx(0.1)
    assert lr("cosine", 50) == pytest.approx(0.05)
    assert lr("cosine", 100) == pytest.approx(0.0, abs=1e-7)
    assert lr("cosine", 9, warmup_epochs=2) == pytest.approx(0.1 * 10 / 20)
    assert lr("onecycle", 30) == pytest.approx(0.1, rel=0.04)
    assert lr("constant", 1000, time_decay=1e-3) == pytest.approx(0.05)


def _formula_lr(step, lr, steps_per_epoch, epochs, schedule, warmup_epochs=0, milestones=(), decay_factor=0.1,
                time_decay=0.0):
    """LearningRate as it was before Keras' schedules computed it: the values runs were trained with."""
    from keras import ops

    step = ops.cast(step, "float32")
    total = float(epochs * steps_per_epoch)
    warmup = float(warmup_epochs * steps_per_epoch)
    if schedule == "onecycle" and not warmup:
        warmup = 0.3 * total
    progress = ops.clip((step - warmup) / max(total - warmup, 1.0), 0.0, 1.0)
    if schedule == "step":
        epoch = ops.floor(step / steps_per_epoch)
        factor = ops.power(decay_factor, sum(ops.cast(epoch >= m, "float32") for m in milestones))
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + ops.cos(math.pi * progress))
    elif schedule == "onecycle":
        factor = 1.0 - progress
    else:
        factor = ops.ones_like(step)
    if warmup:
        factor = factor * ops.minimum(1.0, (step + 1.0) / warmup)
    return lr * factor / (1.0 + time_decay * step)


@pytest.mark.parametrize("schedule, kwargs", [
    ("cosine", {"warmup_epochs": 2}),  # the release recipes
    ("cosine", {}),
    ("constant", {"time_decay": 1e-3}),  # the tutorial recipe
    ("constant", {"warmup_epochs": 1}),
    ("onecycle", {}),
    ("onecycle", {"warmup_epochs": 3}),
    ("step", {"milestones": [2, 5, 7]}),  # the paper recipe's kind
    ("step", {"milestones": [7, 2, 2], "warmup_epochs": 1, "decay_factor": 0.2}),
    ("step", {}),
    ("cosine", {"warmup_epochs": 2, "time_decay": 1e-2}),
    ("constant", {"warmup_epochs": 1, "time_decay": 1e-3}),
])
def test_learning_rate_equals_the_formulas_it_replaced(schedule, kwargs):
    import keras
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        pytest.skip("compares TensorFlow graphs, as the optimizer's compiled train step runs them")
    args = (0.02, 7, 10, schedule)  # 70 steps: every warm-up and milestone boundary, and 5 steps past the end
    new_schedule = LearningRate(*args, **kwargs)
    iterations = tf.Variable(0, dtype=tf.int64)  # as the optimizer's
    evaluations = {"eager": (lambda: new_schedule(iterations), lambda: _formula_lr(iterations, *args, **kwargs))}
    evaluations["graph"] = tuple(tf.function(f) for f in evaluations["eager"])
    for new_lr, old_lr in evaluations.values():
        new, old = [], []
        for step in range(75):
            iterations.assign(step)
            new.append(float(new_lr()))
            old.append(float(old_lr()))
        if kwargs.get("time_decay") and (schedule != "constant" or kwargs.get("warmup_epochs")):
            # Keras' InverseTimeDecay divides the lr before the schedule's factor multiplies it: a rounding apart.
            np.testing.assert_allclose(new, old, rtol=2.4e-7, atol=0)
        else:  # the same bits: a run resumed with this code goes on with the lr it was trained with
            np.testing.assert_array_equal(new, old)


def test_trim_history_drops_duplicates_and_partial_lines(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n2,0.8\n3,0.")
    assert [r["epoch"] for r in RunFolder(tmp_path).trim_history(3)] == ["0", "1", "2"]
    assert path.read_text() == "epoch,loss\n0,1.0\n1,0.9\n2,0.8\n"


def test_sessions_say_which_machine_trained_which_epochs(tmp_path):
    run = RunFolder(tmp_path)
    for first, device in [(0, "CPU A"), (2, "CPU A"), (4, "CPU A"), (4, "GPU B"), (9, "CPU A")]:
        run.record_session(first, device, "float32", "tensorflow")
    # The session begun at epoch 4 on A was stopped before its first epoch ended; B trained 5-9.
    assert [(m["device"], m["first_epoch"], m["last_epoch"]) for m in run.machines(10)] == [
        ("CPU A", 1, 4), ("GPU B", 5, 9), ("CPU A", 10, 10)]
    assert [m["last_epoch"] for m in run.machines(6)] == [4, 6]  # epochs after a rollback are not counted
    assert [row["first_epoch"] for row in run.read_sessions()] == [0, 2, 4, 4, 9]
    assert RunFolder(tmp_path / "older").machines(3) == []


def _run_cli(args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "allcnn", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _history(run: Path) -> list[dict]:
    rows = list(csv.DictReader(open(run / "history.csv")))
    for row in rows:
        del row["epoch_seconds"]  # wall time differs, everything else must not
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("ema", [[], ["--ema", "--ema-momentum", "0.9"]], ids=["plain", "ema"])
def test_kill_9_during_epoch_2_then_resume_matches_uninterrupted(tmp_path, ema):
    # 1,000 images: an epoch lasts seconds (120 steps), so the kill lands inside one even on a fast machine.
    data = write_cifar_folder(tmp_path / "data", per_batch=200).parent
    args = ["--data-dir", str(data), "--epochs", "3", "--batch-size", "8", "--val-size", "40",
            "--precision", "float32", "--schedule", "cosine", "--warmup-epochs", "1", "--lr", "0.01", *ema]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert _run_cli([*args, "--out", str(reference)]).wait() == 0

    process = _run_cli([*args, "--out", str(killed)])
    deadline = time.time() + 300
    while "Epoch 2/3" not in (line := process.stdout.readline()):
        assert line and time.time() < deadline, "the run never reached epoch 2"
    time.sleep(0.5)  # inside epoch 2: some of its steps trained
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(_history(killed)) == 1

    resumed = _run_cli(["--resume", "--out", str(killed), "--data-dir", str(data), "--device", "cpu"])
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert _history(killed) == _history(reference)
    summary = (killed / "summary.json").read_text()
    assert json.loads(summary)["epochs"] == 3
    assert [(m["first_epoch"], m["last_epoch"]) for m in json.loads(summary)["machines"]] == [(1, 3)]
    # Resuming a finished run trains nothing and keeps the summary of the sessions that trained.
    assert _train("--resume", "--out", str(killed), "--data-dir", str(data)).exit_code == 0
    assert (killed / "summary.json").read_text() == summary
    assert [row["first_epoch"] for row in RunFolder(killed).read_sessions()] == [0, 1]


def test_data_workers_and_steps_per_execution_train_the_same_weights(cifar_dir, tmp_path):
    def run(name, *flags):
        result = _train("--data-dir", str(cifar_dir), "--out", str(tmp_path / name), *TINY, *flags)
        assert result.exit_code == 0, result.output
        return _history(tmp_path / name)

    plain = run("plain")
    fast = run("fast", "--data-workers", "3", "--steps-per-execution", "4")
    assert [row["loss"] for row in fast] == [row["loss"] for row in plain]
    assert fast == plain
    # How a run executes is not part of what it is: a resume may change it.
    resumed = _train("--resume", "--out", str(tmp_path / "fast"), "--data-dir", str(cifar_dir), "--epochs", "2",
                     "--data-workers", "1", "--steps-per-execution", "1")
    assert resumed.exit_code == 0, resumed.output


def test_ema_validates_and_saves_the_averaged_weights(cifar_dir, tmp_path):
    from allcnn.evaluation import evaluate
    from allcnn.model import load_classifier

    def run(name, *flags):
        out = tmp_path / name
        result = _train("--data-dir", str(cifar_dir), "--out", str(out), "--weight-decay", "0", *TINY, *flags)
        assert result.exit_code == 0, result.output
        last = list(csv.DictReader(open(out / "history.csv")))[-1]
        saved = load_classifier(out / "last.weights.h5", precision="float32", device="cpu")
        return float(last["val_loss"]), evaluate(saved, data_dir=cifar_dir, split="val")["loss"]

    plain_logged, plain_saved = run("plain")
    ema_logged, ema_saved = run("ema", "--ema", "--ema-momentum", "0.9")
    assert tomllib.loads((tmp_path / "ema" / "config.toml").read_text())["use_ema"] is True
    # The logged validation loss is that of the weights saved, and the average differs from the plain weights.
    assert ema_saved == pytest.approx(ema_logged, abs=1e-4) and plain_saved == pytest.approx(plain_logged, abs=1e-4)
    assert abs(ema_saved - plain_saved) > 1e-3


def test_nan_loss_stops_with_advice(cifar_dir, tmp_path):
    result = _train("--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), "--epochs", "2",
                    "--batch-size", "16", "--val-size", "40", "--precision", "float32", "--lr", "1e12",
                    "--schedule", "constant")
    assert result.exit_code == 1, result.output
    assert "the loss became NaN; the learning rate (1000000000000.0) is probably too high" in result.output
    assert "(no epoch completed)" in result.output
    # Stopped inside epoch 1: no NaN weights saved, no epoch marked done for --resume.
    assert not (tmp_path / "run" / "last.weights.h5").exists()
    assert not (tmp_path / "run" / "backup" / "training_metadata.json").exists()


def test_initial_weights_start_a_warm_restart(cifar_dir, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    assert _train("--data-dir", str(cifar_dir), "--out", str(first), *TINY).exit_code == 0
    missing = _train("--data-dir", str(cifar_dir), "--out", str(tmp_path / "bad"), "--initial-weights",
                     str(tmp_path / "none.weights.h5"), *TINY)
    assert missing.exit_code == 1 and "initial_weights:" in missing.output and "no such weights file" in missing.output
    assert not (tmp_path / "bad").exists()
    inside = _train("--data-dir", str(cifar_dir), "--out", str(first), "--overwrite", "--initial-weights",
                    str(first / "last.weights.h5"), *TINY)
    assert inside.exit_code == 1 and "which --overwrite would delete" in inside.output
    assert (first / "last.weights.h5").is_file()
    # Another seed holds out other images: some that the first run trained on.
    other = _train("--data-dir", str(cifar_dir), "--out", str(tmp_path / "other"), "--initial-weights",
                   str(first / "last.weights.h5"), "--seed", "1", *TINY)
    assert other.exit_code == 1 and "Traceback" not in other.output
    assert "held out val_size 40, seed 0 for validation" in other.output
    assert "this run's val_size 40, seed 1 would validate on images they were trained on" in other.output
    assert not (tmp_path / "other").exists()

    monkeypatch.chdir(tmp_path)  # a relative path is stored absolute, so the run resumes from anywhere
    result = _train("--data-dir", str(cifar_dir), "--out", str(second), "--initial-weights",
                    "first/last.weights.h5", *TINY)
    assert result.exit_code == 0, result.output
    config = tomllib.loads((second / "config.toml").read_text())
    assert config["initial_weights"] == str(first / "last.weights.h5")
    # Same seed and data: only the starting weights differ from the first run's epoch 1.
    warm = float(next(csv.DictReader(open(second / "history.csv")))["loss"])
    assert warm < float(next(csv.DictReader(open(first / "history.csv")))["loss"])


def test_a_teacher_s_flip_averaged_predictions_are_the_training_targets(cifar_dir, tmp_path):
    from allcnn import data
    from allcnn.model import load_classifier

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert _train("--data-dir", str(cifar_dir), "--out", str(teacher), *TINY).exit_code == 0
    weights = str(teacher / "last.weights.h5")
    missing = _train("--data-dir", str(cifar_dir), "--out", str(student), "--teacher", str(tmp_path / "no.h5"), *TINY)
    assert missing.exit_code == 1 and "teacher: no such weights file" in missing.output
    # A teacher that trained on this run's validation images would tell the student their labels.
    other = _train("--data-dir", str(cifar_dir), "--out", str(student), "--teacher", weights, "--seed", "1", *TINY)
    assert other.exit_code == 1 and "Traceback" not in other.output
    assert "teacher: " in other.output and "would validate on images they were trained on" in other.output
    assert not student.exists()

    result = _train("--data-dir", str(cifar_dir), "--out", str(student), "--teacher", weights, *TINY)
    assert result.exit_code == 0, result.output
    config = RunFolder(student).read_config()
    assert (config.teacher, config.teacher_tta) == (weights, "flip")
    train_images = data.load_splits(config, cifar_dir, None)[1][0]
    expected = load_classifier(weights, precision="float32").probabilities(train_images, tta="flip")
    targets = np.load(student / "teacher_targets.npy")
    np.testing.assert_allclose(targets, expected, atol=1e-6)
    assert not np.allclose(targets, load_classifier(weights, precision="float32").probabilities(train_images))


def test_training_batches_take_a_teacher_s_targets_from_the_run_folder(tmp_path):
    """A resumed run trains on the targets its first session computed, even where the teacher's
    file has changed since (the shipped weights, replaced by the run it taught) or is gone."""
    from allcnn.config import make_config
    from allcnn.distribute import Replicas
    from allcnn.training import make_batches

    rng = np.random.default_rng(0)
    split = (rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.zeros(8, int))
    stored = rng.dirichlet(np.ones(10), 8).astype(np.float32)
    np.save(tmp_path / "teacher_targets.npy", stored)
    config = make_config(teacher=str(tmp_path / "gone.weights.h5"))
    train, val = make_batches(config, RunFolder(tmp_path), split, split, Replicas("none", ["cpu:0"]),
                              {"global_batch_size": 4}, 10)
    np.testing.assert_array_equal(train.y, stored)
    np.testing.assert_array_equal(val.y[:, 0], np.ones(8))  # validation keeps the labels


def test_out_that_is_a_file_is_one_line(cifar_dir, tmp_path):
    (tmp_path / "file").write_text("")
    result = _train("--data-dir", str(cifar_dir), "--out", str(tmp_path / "file" / "run"), *TINY)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr == f"Error: {tmp_path / 'file' / 'run'}: Not a directory\n"


def test_curves_are_redrawn_at_most_every_min_seconds_and_at_the_end(tmp_path, monkeypatch):
    from allcnn import callbacks
    from allcnn.callbacks import CurvesPlotter

    drawn = []
    monkeypatch.setattr(callbacks, "plot_history", lambda history, path: drawn.append(len(history)))
    (tmp_path / "history.csv").write_text("epoch,loss\n" + "".join(f"{e},1.0\n" for e in range(5)))
    plotter = CurvesPlotter(RunFolder(tmp_path), min_seconds=3600)
    for epoch in range(5):
        plotter.on_epoch_end(epoch)
    plotter.on_train_end()
    assert drawn == [1, 5]
    every = CurvesPlotter(RunFolder(tmp_path), min_seconds=0)
    for epoch in range(3):
        every.on_epoch_end(epoch)
    every.on_train_end()
    assert drawn[2:] == [1, 2, 3]


def test_atomic_link_links_or_copies_and_replaces(tmp_path, monkeypatch):
    from allcnn.files import atomic_link

    source, target = tmp_path / "epoch-1.weights.h5", tmp_path / "last.weights.h5"
    source.write_bytes(b"one")
    target.write_bytes(b"older")
    atomic_link(source, target)
    assert os.path.samefile(source, target)
    source.unlink()  # the next epoch's backup removes the previous file: the link keeps its bytes
    assert target.read_bytes() == b"one"

    def no_hard_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    source.write_bytes(b"two")
    atomic_link(source, target)
    assert target.read_bytes() == b"two" and not os.path.samefile(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1.weights.h5", "last.weights.h5"]  # no temp left


def test_a_teacher_network_predicts_each_augmented_batch(cifar_dir, tmp_path):
    """`teacher_augmented` with a teacher folder (scripts/train_teacher.py): checked before the run
    folder is made, then trained on its predictions batch by batch, with no fixed targets."""
    from allcnn import data
    from allcnn.airbench import train_teacher
    from allcnn.config import make_config
    from allcnn.initial_weights import held_out

    def teach(folder, seed):
        config = make_config(val_size=40, seed=seed, dataset="cifar10")
        dataset, train, val = data.load_splits(config, cifar_dir)
        train_teacher(train, val, dataset.class_names, folder, held_out=held_out(config), epochs=1, batch_size=16,
                      seed=seed)
        return str(folder / "teacher.keras")

    teacher, stranger = teach(tmp_path / "teacher", 0), teach(tmp_path / "stranger", 1)
    recipe = tmp_path / "taught.toml"
    recipe.write_text('teacher_augmented = true\nbatch_norm = true\ninput_dropout = 0.0\n')
    student = tmp_path / "student"
    args = ["--data-dir", str(cifar_dir), "--out", str(student), *TINY]
    other = _train("--config", str(recipe), *args, "--teacher", stranger)
    assert other.exit_code == 1 and "would validate on images they were trained on" in other.output
    scaled = tmp_path / "scaled.toml"
    scaled.write_text(recipe.read_text() + 'preprocessing = "scale"\n')
    mismatch = _train("--config", str(scaled), *args, "--teacher", teacher)
    assert mismatch.exit_code == 1 and "preprocesses its inputs otherwise" in mismatch.output
    assert "Traceback" not in other.output + mismatch.output and not student.exists()

    result = _train("--config", str(recipe), *args, "--teacher", teacher)
    assert result.exit_code == 0, result.output
    assert "predictions on each training batch as augmented" in result.output
    config = RunFolder(student).read_config()
    assert config.teacher_augmented and config.teacher == teacher
    assert not (student / "teacher_targets.npy").exists()

    # The same method fitted on other images (another mean) would feed the teacher shifted inputs.
    from dataclasses import replace

    from allcnn.teacher import augmented_teacher

    prep = RunFolder(student).read_preprocessing()
    assert augmented_teacher(config, prep) is not None
    with pytest.raises(RunError, match="was fitted on other training images"):
        augmented_teacher(config, replace(prep, mean=[m + 0.01 for m in prep.mean]))


def test_teacher_augmented_needs_a_teacher(cifar_dir, tmp_path):
    recipe = tmp_path / "taught.toml"
    recipe.write_text("teacher_augmented = true\n")
    result = _train("--config", str(recipe), "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 1 and "teacher_augmented: the recipe names no teacher" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
