"""The release scripts: which recipe each stage is named by, and how stages chain."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from allcnn.config import load_config
from allcnn.data import CLASS_NAMES
from allcnn.manifest import sha256
from allcnn.run_folder import RunFolder
from conftest import SCRIPTS, load_script, write_cifar_folder


def _shipping(tmp_path: Path, monkeypatch) -> tuple:
    """scripts/ship_weights.py as a module, shipping into a weights folder of its own in tmp_path."""
    ship = load_script("ship_weights")
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(ship, "WEIGHTS", weights)
    return ship, weights


def _run_folder(root: Path, name: str, recipe: str, **overrides) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.toml").write_text(load_config(recipe, **overrides).to_toml())
    return run


def test_stages_are_named_by_the_recipe_they_were_trained_with(tmp_path):
    ship = load_script("ship_weights")
    stage1 = _run_folder(tmp_path, "release", "release-stage1")
    stage2 = _run_folder(tmp_path, "release-stage2", "release",
                         initial_weights=str(stage1 / "last.weights.h5"))
    stage3 = _run_folder(tmp_path, "release-stage3", "release-stage3", initial_weights=str(stage2 / "last.weights.h5"))
    assert ship.stages(stage3) == [stage1, stage2, stage3]
    assert [ship.recipe_of(run, load_config(run / "config.toml")) for run in ship.stages(stage3)] == [
        "configs/release-stage1.toml", "configs/release.toml", "configs/release-stage3.toml"]


def test_a_run_that_matches_no_recipe_is_refused(tmp_path):
    run = _run_folder(tmp_path, "other", "release", epochs=7)
    with pytest.raises(SystemExit, match="no configs/release"):
        load_script("ship_weights").recipe_of(run, load_config(run / "config.toml"))


def test_a_later_stage_ships_only_if_it_beats_the_earlier_ones_on_validation(capsys):
    ship = load_script("ship_weights")
    runs = [Path("s1"), Path("s2"), Path("s3")]
    histories = [[{"epoch": "0", "val_accuracy": "0.80"}],
                 [{"epoch": "0", "val_accuracy": "0.84"}, {"epoch": "1", "val_accuracy": "0.86"}],
                 [{"epoch": "0", "val_accuracy": "0.85"}]]
    assert ship.shipped_stages(runs, histories) == runs[:2]
    assert "not shipping s3: its best val_accuracy 0.8500 does not beat 0.8600 of s2" in capsys.readouterr().err
    histories[2].append({"epoch": "1", "val_accuracy": "0.87"})
    assert ship.shipped_stages(runs, histories) == runs
    assert [row["epoch"] for row in ship.joined_history(histories)] == ["0", "1", "2", "3", "4"]


def test_hours_and_epochs_to_a_validation_accuracy():
    rows = [{"epoch_seconds": "1800", "val_accuracy": v} for v in ("0.85", "0.90", "0.91")]
    time_to = load_script("ship_weights").time_to
    assert time_to(rows, 0.90) == (1.0, 2) and time_to(rows, 0.95) == (None, None)


def test_the_hardware_and_precision_name_each_change_once():
    stage_joined = load_script("ship_weights").stage_joined
    assert stage_joined("", "CPU B") == "CPU B"
    assert stage_joined("CPU A", "CPU B") == "CPU A; then CPU B"
    assert stage_joined("CPU A; then CPU B", "CPU B") == "CPU A; then CPU B"
    assert stage_joined("CPU A; then CPU B", "CPU A") == "CPU A; then CPU B; then CPU A"


def _trained_stage(root: Path, name: str, recipe: str, val_accuracies: list[float], **overrides) -> Path:
    """A finished stage: config, preprocessing, best weights, history and backup marker."""
    from allcnn.model import build_model
    from allcnn.preprocessing import Preprocessing

    run = _run_folder(root, name, recipe, **overrides)
    Preprocessing("standardize", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]).save(run / "preprocessing.json")
    config = load_config(recipe)
    build_model("paper", batch_norm=config.batch_norm, reparam=config.reparam,
                seed=len(name)).save_weights(run / "best.weights.h5")
    rows = "".join(f"{epoch},0.9,60.0,1.0,0.01,{val},1.0\n" for epoch, val in enumerate(val_accuracies))
    (run / "history.csv").write_text("epoch,accuracy,epoch_seconds,loss,lr,val_accuracy,val_loss\n" + rows)
    RunFolder(run).backup_dir.mkdir()
    RunFolder(run).backup_marker.write_text(json.dumps({"epoch": len(val_accuracies)}))
    (run / "summary.json").write_text(json.dumps({"device": "CPU test", "precision": "float32",
                                                  "backend": "tensorflow"}))
    return run


def test_ship_weights_ships_the_best_stage_with_the_stages_before_it(tmp_path, cifar_dir, monkeypatch):
    ship, weights = _shipping(tmp_path, monkeypatch)
    (weights / "allcnn-c.stage2.config.toml").write_text("stale")
    stage1 = _trained_stage(tmp_path, "release", "release-stage1", [0.5, 0.6])
    stage2 = _trained_stage(tmp_path, "release-stage2", "release", [0.55, 0.7, 0.65],
                            initial_weights=str(stage1 / "last.weights.h5"))
    stage3 = _trained_stage(tmp_path, "release-stage3", "release-stage3", [0.68],
                            initial_weights=str(stage2 / "last.weights.h5"))
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(stage3), "--data-dir", str(cifar_dir)])
    ship.main()

    entry = json.loads((weights / "manifest.json").read_text())["weights"][0]
    assert entry["produced"]["recipe"] == ["configs/release-stage1.toml", "configs/release.toml"]
    assert entry["produced"]["command"].startswith("allcnn train --config RECIPE, each stage with --initial-weights")
    assert (entry["produced"]["epochs_trained"], entry["produced"]["planned_epochs"]) == (5, 180)
    assert (entry["produced"]["best_epoch"], entry["accuracy"]["val_top1"]) == (4, 0.7)
    assert entry["sha256"] == sha256(weights / "allcnn-c.weights.h5")
    assert load_config(weights / "allcnn-c.config.toml") == load_config(stage2 / "config.toml")
    assert sorted(path.name for path in weights.glob("*.toml")) == ["allcnn-c.config.toml",
                                                                    "allcnn-c.stage1.config.toml"]
    assert len((weights / "allcnn-c.history.csv").read_text().splitlines()) == 1 + 5
    assert (weights / "allcnn-c.curves.png").read_bytes()[:4] == b"\x89PNG"


def test_ship_weights_refuses_a_run_that_does_not_beat_the_shipped_weights(tmp_path, cifar_dir, monkeypatch):
    ship, weights = _shipping(tmp_path, monkeypatch)
    first = _trained_stage(tmp_path, "first", "release-v2", [0.5, 0.6])
    worse = _trained_stage(tmp_path, "worse", "release-v2", [0.55])
    better = _trained_stage(tmp_path, "better", "release-v2", [0.61])
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(first), "--data-dir", str(cifar_dir)])
    ship.main()
    entry = json.loads((weights / "manifest.json").read_text())["weights"][0]
    assert entry["produced"]["command"] == "scripts/train_release.sh DATA_DIR RUN_DIR release-v2"
    before = {path.name: path.read_bytes() for path in weights.iterdir()}
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(worse), "--data-dir", str(cifar_dir)])
    with pytest.raises(SystemExit, match="not shipping: best val_accuracy 0.5500 does not beat 0.6000"):
        ship.main()
    assert {path.name: path.read_bytes() for path in weights.iterdir()} == before
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(better), "--data-dir", str(cifar_dir)])
    ship.main()
    assert json.loads((weights / "manifest.json").read_text())["weights"][0]["accuracy"]["val_top1"] == 0.61


def test_ship_weights_names_the_gpu_recipe_and_its_command_however_the_run_executed(tmp_path, cifar_dir,
                                                                                    monkeypatch):
    ship, weights = _shipping(tmp_path, monkeypatch)
    run = _trained_stage(tmp_path, "gpu", "release-gpu", [0.5, 0.6, 0.7], data_workers=2, steps_per_execution=1)
    # Begun on a CPU, moved to a GPU: the manifest names both, with their epochs.
    RunFolder(run).record_session(0, "CPU test", "float32", "tensorflow")
    RunFolder(run).record_session(1, "GPU test", "mixed_bfloat16", "jax")
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(run), "--data-dir", str(cifar_dir)])
    ship.main()
    produced = json.loads((weights / "manifest.json").read_text())["weights"][0]["produced"]
    assert produced["recipe"] == "configs/release-gpu.toml"
    assert produced["command"].startswith("scripts/gpu_train.sh train release-gpu SECONDS")
    assert produced["hardware"] == "CPU test (epochs 1-1); GPU test (epochs 2-3)"
    assert (produced["precision"], produced["backend"]) == ("float32; mixed_bfloat16", "tensorflow; jax")


@pytest.mark.parametrize("recipe, training", [("release-bn", "batch norm during training, folded"),
                                              ("release-bn-rep", "batch norm and RepVGG's branches (")])
def test_ship_weights_folds_a_batch_norm_run_into_the_plain_network(recipe, training, tmp_path, cifar_dir, monkeypatch):
    from allcnn.model import build_model
    from allcnn.weights_io import load_weights

    ship, weights = _shipping(tmp_path, monkeypatch)
    run = _trained_stage(tmp_path, "bn", recipe, [0.7, 0.91, 0.9])
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(run), "--data-dir", str(cifar_dir)])
    ship.main()
    entry = json.loads((weights / "manifest.json").read_text())["weights"][0]
    assert entry["batch_norm"] is False and entry["produced"]["training"].startswith(training)
    assert entry["produced"]["fold_max_difference"] <= ship.FOLD_TOLERANCE
    assert entry["produced"]["command"] == f"scripts/train_release.sh DATA_DIR RUN_DIR {recipe}"
    assert (entry["produced"]["epochs_to_90_val"], entry["produced"]["hours_to_90_val"]) == (2, 0.03)
    load_weights(build_model("paper"), weights / "allcnn-c.weights.h5")  # the plain network: no batch norm


def test_a_run_taught_by_a_teacher_network_ships_with_the_teacher_s_record(tmp_path, cifar_dir, monkeypatch):
    """release-bn-kd: the run names its teacher with --teacher (a file of its machine), so the recipe
    is found without it, and the teacher's training counts in the manifest beside the run's."""
    ship, weights = _shipping(tmp_path, monkeypatch)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "teacher.json").write_text(json.dumps({
        "network": "airbench-style teacher (allcnn.airbench)", "class_names": list(CLASS_NAMES),
        "held_out": {"val_size": 5000, "seed": 0}, "epochs": 15, "train_seconds": 1800.0, "val_accuracy": 0.93,
        "precision": "mixed_bfloat16", "machine": "CPU test"}))
    run = _trained_stage(tmp_path, "kd", "release-bn-kd", [0.7, 0.91], teacher=str(teacher / "teacher.keras"))
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(run), "--data-dir", str(cifar_dir)])
    ship.main()
    produced = json.loads((weights / "manifest.json").read_text())["weights"][0]["produced"]
    assert produced["recipe"] == "configs/release-bn-kd.toml"
    assert produced["teachers"] == [{"network": "airbench-style teacher (allcnn.airbench)", "epochs": 15,
                                     "train_hours": 0.5, "val_top1": 0.93, "machine": "CPU test"}]


def test_a_run_from_the_shipped_weights_ships_as_their_next_stage(tmp_path, cifar_dir, monkeypatch):
    ship, weights = _shipping(tmp_path, monkeypatch)
    first = _trained_stage(tmp_path, "v3", "release-v3", [0.5, 0.6])
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(first), "--data-dir", str(cifar_dir)])
    ship.main()
    # The next session has only the shipped weights: a batch-norm cycle goes on from them.
    later = _trained_stage(tmp_path, "bn", "release-bn-stage2", [0.62, 0.65, 0.64], initial_weights="shipped")
    (later / "summary.json").write_text(json.dumps({"device": "CPU test", "precision": "mixed_bfloat16",
                                                    "backend": "tensorflow"}))
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(later), "--data-dir", str(cifar_dir)])
    ship.main()
    produced = json.loads((weights / "manifest.json").read_text())["weights"][0]["produced"]
    assert produced["recipe"] == ["configs/release-v3.toml", "configs/release-bn-stage2.toml"]
    planned = load_config("release-v3").epochs + load_config("release-bn-stage2").epochs
    assert (produced["epochs_trained"], produced["planned_epochs"], produced["best_epoch"]) == (5, planned, 4)
    assert produced["hardware"] == "CPU test"  # one machine for both stages: named once
    assert produced["precision"] == "float32; then mixed_bfloat16"  # each stage's, not only the last's
    assert load_config(weights / "allcnn-c.stage1.config.toml") == load_config(first / "config.toml")
    assert load_config(weights / "allcnn-c.config.toml") == load_config(later / "config.toml")
    assert len((weights / "allcnn-c.history.csv").read_text().splitlines()) == 1 + 5


def test_a_next_stage_that_does_not_beat_the_shipped_weights_or_holds_out_other_images_is_refused(tmp_path, cifar_dir,
                                                                                                   monkeypatch):
    ship, weights = _shipping(tmp_path, monkeypatch)
    first = _trained_stage(tmp_path, "v3", "release-v3", [0.5, 0.6])
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(first), "--data-dir", str(cifar_dir)])
    ship.main()
    before = {path.name: path.read_bytes() for path in weights.iterdir()}
    # Its history joins the shipped one's, whose best (0.6) is no result of this run.
    later = _trained_stage(tmp_path, "bn", "release-bn-stage2", [0.58, 0.59], initial_weights="shipped")
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(later), "--data-dir", str(cifar_dir)])
    with pytest.raises(SystemExit, match="not shipping: best val_accuracy 0.5900 does not beat 0.6000"):
        ship.main()
    assert {path.name: path.read_bytes() for path in weights.iterdir()} == before
    # Another seed validates on images the shipped weights were trained on: no comparison, whatever it scored.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "release-bn-seed1.toml").write_text(load_config("release-bn-stage2", seed=1).to_toml())
    monkeypatch.setattr(ship, "configs_dir", lambda: tmp_path / "configs")
    other = _trained_stage(tmp_path, "bn-seed1", "release-bn-stage2", [0.99], initial_weights="shipped", seed=1)
    monkeypatch.setattr("sys.argv", ["ship_weights.py", str(other), "--data-dir", str(cifar_dir)])
    with pytest.raises(SystemExit, match="validated on other images than they held out"):
        ship.main()
    assert {path.name: path.read_bytes() for path in weights.iterdir()} == before


def test_ship_weights_fails_in_one_line_and_leaves_weights_as_they_were(tmp_path, cifar_dir, monkeypatch, capsys):
    ship, weights = _shipping(tmp_path, monkeypatch)
    run = _trained_stage(tmp_path, "release", "release-stage1", [0.5, 0.6])

    def fails(*args: str) -> str:
        monkeypatch.setattr("sys.argv", ["ship_weights.py", *args])
        with pytest.raises(SystemExit) as exit_info:
            ship.main()
        assert list(weights.iterdir()) == []
        return str(exit_info.value.code)

    assert fails(str(tmp_path / "nowhere")) == f"error: {tmp_path / 'nowhere'} is not a run folder (no config.toml)"
    assert fails(str(run), "--data-dir", str(tmp_path / "nodata")).startswith("error: ")
    summary = (run / "summary.json").read_text()
    (run / "summary.json").write_text("{}")
    assert fails(str(run), "--data-dir", str(cifar_dir)) == (
        f"error: {run / 'summary.json'}: missing device, precision, backend; the run folder is damaged")
    (run / "summary.json").write_text(summary)
    with open(run / "history.csv", "a") as history:  # an epoch logged, its backup not yet written
        history.write("2,0.9,60.0,1.0,0.01,0.7,1.0\n")
    assert "is between epochs" in fails(str(run), "--data-dir", str(cifar_dir))
    assert "Traceback" not in capsys.readouterr().err


def _fake_tools(bin_dir: Path, log: Path) -> None:
    """`allcnn` and `python` stand-ins that log their arguments; `allcnn train`
    creates the run folder's config.toml, as the real one does."""
    bin_dir.mkdir()
    scripts = {
        "allcnn": 'echo "allcnn $*" >> "$LOG"\n'
                  'while [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2" && touch "$2/config.toml"; shift; done\n',
        "python": 'echo "python ${1##*/} ${*:2}" >> "$LOG"\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _train_release(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    log = tmp_path / "calls.log"
    if not (tmp_path / "bin").exists():
        _fake_tools(tmp_path / "bin", log)
    env = os.environ | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "LOG": str(log)}
    return subprocess.run(["bash", str(SCRIPTS / "train_release.sh"), *args], env=env,
                          capture_output=True, text=True)


def test_train_release_trains_then_resumes_one_schedule(tmp_path):
    run = tmp_path / "r"
    assert _train_release(tmp_path, "DATA", str(run)).returncode == 0
    assert _train_release(tmp_path, "DATA", str(run)).returncode == 0
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        f"allcnn train --config release-bn --out {run} --data-dir DATA",
        f"python ship_weights.py {run} --data-dir DATA",
        # Run again: the run folder exists, so it resumes (and a finished run trains nothing).
        f"allcnn train --resume --out {run} --data-dir DATA",
        f"python ship_weights.py {run} --data-dir DATA",
    ]


def test_train_release_starts_a_later_stage_from_the_weights_given(tmp_path):
    run = tmp_path / "r2"
    assert _train_release(tmp_path, "DATA", str(run), "release-bn-stage2", "r1/last.weights.h5").returncode == 0
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        f"allcnn train --config release-bn-stage2 --out {run} --data-dir DATA --initial-weights r1/last.weights.h5",
        f"python ship_weights.py {run} --data-dir DATA",
    ]


def test_train_release_trains_the_teacher_first_where_its_folder_has_none(tmp_path):
    run, teacher = tmp_path / "kd", tmp_path / "t" / "teacher.keras"
    assert _train_release(tmp_path, "DATA", str(run), "release-bn-kd", "shipped", str(teacher)).returncode == 0
    teacher.parent.mkdir()
    teacher.touch()  # what train_teacher.py writes; the fake one writes nothing
    assert _train_release(tmp_path, "DATA", str(run), "release-bn-kd", "shipped", str(teacher)).returncode == 0
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        f"python train_teacher.py {teacher.parent} --data-dir DATA",
        f"allcnn train --config release-bn-kd --out {run} --data-dir DATA --initial-weights shipped "
        f"--teacher {teacher}",
        f"python ship_weights.py {run} --data-dir DATA",
        f"allcnn train --resume --out {run} --data-dir DATA",
        f"python ship_weights.py {run} --data-dir DATA",
    ]


def _pack_cifar(*args) -> None:
    subprocess.run([sys.executable, str(SCRIPTS / "pack_cifar.py"), *map(str, args)], check=True)


def test_pack_cifar_round_trips_the_batches_it_is_given(tmp_path, cifar_dir):
    folder = cifar_dir / "cifar-10-batches-py"
    packed, unpacked = tmp_path / "packed", tmp_path / "unpacked"
    _pack_cifar("pack", folder, packed, "data_batch_2", "test_batch")
    assert sorted(path.name for path in packed.glob("*.webp")) == ["data_batch_2.webp", "test_batch.webp"]
    _pack_cifar("unpack", packed, unpacked)
    for name in ("data_batch_2", "test_batch", "batches.meta"):
        with open(folder / name, "rb") as f, open(unpacked / name, "rb") as g:
            original, copy = pickle.load(f, encoding="bytes"), pickle.load(g, encoding="bytes")
        for key in (b"data", b"labels", b"label_names"):
            if key in original:
                np.testing.assert_array_equal(copy[key], original[key])


# As on the GPU machines: `import tensorflow` fails and importlib finds no such module.
NO_TENSORFLOW = "import sys\nsys.modules.update(tensorflow=None, tf_keras=None)\n"


def _gpu_train(tmp_path: Path, bundle: Path, work: str, out: str, *args: str) -> subprocess.CompletedProcess:
    """scripts/gpu_train.sh as a device call runs it: from the repo root, $OUT set, no TensorFlow."""
    site = tmp_path / "no-tensorflow"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_TENSORFLOW)
    (tmp_path / out).mkdir()
    env = os.environ | {"ALLCNN_GPU_BUNDLE": str(bundle), "ALLCNN_GPU_WORK": str(tmp_path / work),
                        "OUT": str(tmp_path / out), "PYTHON": sys.executable, "PYTHONPATH": str(site)}
    return subprocess.run(["bash", str(SCRIPTS / "gpu_train.sh"), *args], cwd=SCRIPTS.parent, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_gpu_train_trains_from_two_parts_under_jax_without_tensorflow_and_resumes_elsewhere(tmp_path):
    folder = write_cifar_folder(tmp_path / "data", per_batch=40)
    bundle = tmp_path / "bundle"
    for part, names in (("part1", ["data_batch_1", "data_batch_2", "data_batch_3"]),
                        ("part2", ["data_batch_4", "data_batch_5", "test_batch"])):
        _pack_cifar("pack", folder, bundle / part / "data", *names)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(load_config(epochs=2, batch_size=16, val_size=40, lr=0.01, precision="float32",
                                  data_workers=2, steps_per_execution=2).to_toml())

    first = _gpu_train(tmp_path, bundle, "machine1", "out1", "train", str(recipe), "600")
    assert first.returncode == 0, first.stdout + first.stderr
    with tarfile.open(tmp_path / "out1" / "run.tar.gz") as tar:
        names = {Path(name).name for name in tar.getnames()}
        summary = json.load(tar.extractfile("./summary.json"))
    assert {"best.weights.h5", "history.csv", "config.toml", "preprocessing.json"} <= names
    assert "last.weights.h5" not in names and summary["epochs"] == 2 and summary["backend"] == "jax"
    with tarfile.open(tmp_path / "out1" / "backup.tar.gz") as tar:
        assert any(name.endswith(".weights.h5") for name in tar.getnames())
    # A device call brings back files under 16 MiB: each weights file holds weights, momentum and average.
    assert all((tmp_path / "out1" / name).stat().st_size < 16 * 2**20 for name in ("run.tar.gz", "backup.tar.gz"))

    # A fresh machine, the run carried back as .gpu/run: it resumes (here: finished, it trains nothing).
    (bundle / "run").mkdir()
    for name in ("run.tar.gz", "backup.tar.gz"):
        (bundle / "run" / name).write_bytes((tmp_path / "out1" / name).read_bytes())
    again = _gpu_train(tmp_path, bundle, "machine2", "out2", "train", str(recipe), "600")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (tmp_path / "machine2" / "run" / "config.toml").is_file()
    with tarfile.open(tmp_path / "out2" / "run.tar.gz") as tar:
        assert json.load(tar.extractfile("./summary.json")) == summary


def test_gpu_train_without_part1_says_to_run_setup_first(tmp_path):
    (tmp_path / "bundle").mkdir()
    result = _gpu_train(tmp_path, tmp_path / "bundle", "machine", "out", "train", "release-gpu", "60")
    assert result.returncode == 2 and result.stderr.startswith("error: this machine lacks data_batch_1 ")


def test_compare_networks_trains_each_network_with_one_recipe_then_tabulates(tmp_path, cifar_dir):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(load_config("release-bn", epochs=1, warmup_epochs=0, batch_size=16, val_size=40,
                                  precision="float32").to_toml())
    command = [sys.executable, str(SCRIPTS / "compare_networks.py"), "model-c", "all-cnn-c", "--recipe",
               str(recipe), "--data-dir", str(cifar_dir), "--root", str(tmp_path / "runs")]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0:2] for line in rows] == [["| model-c", "1"], ["| all-cnn-c", "1"]]
    assert [load_config(tmp_path / "runs" / name / "config.toml").variant for name in ("model-c", "all-cnn-c")] == [
        "model-c", "paper"]
