"""An ensemble teacher (allcnn.teacher.write_ensemble_teacher, scripts/ensemble_teacher.py): one
teacher.keras averaging an airbench teacher's and an All-CNN-C's probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allcnn.data import CLASS_NAMES, held_out_record
from allcnn.preprocessing import Preprocessing
from allcnn.run_folder import RunError
from allcnn.teacher import load_teacher, write_ensemble_teacher
from conftest import SCRIPTS, load_script
from tests.helpers_weights import make_run

# What make_run's run folder records: its validation images and its preprocessing.
HELD_OUT = held_out_record(20)
PREPROCESSING = Preprocessing("standardize", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def _airbench_folder(root: Path, preprocessing: Preprocessing = PREPROCESSING) -> Path:
    """An untrained airbench teacher folder, as scripts/train_teacher.py writes one."""
    from allcnn.airbench import build_teacher, whitening_kernel

    root.mkdir(parents=True)
    images = np.random.default_rng(1).normal(size=(200, 32, 32, 3)).astype("float32")
    build_teacher(whitening_kernel(images)).save(root / "teacher.keras")
    (root / "teacher.json").write_text(json.dumps({
        "network": "airbench-style teacher (allcnn.airbench)", "class_names": list(CLASS_NAMES),
        "held_out": HELD_OUT, "epochs": 3, "train_seconds": 3600.0, "val_accuracy": 0.5, "machine": "CPU test"}))
    preprocessing.save(root / "preprocessing.json")
    return root / "teacher.keras"


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[str]:
    """An airbench teacher and batch-norm All-CNN-C weights (folded when loaded), both untrained."""
    root = tmp_path_factory.mktemp("members")
    return [str(_airbench_folder(root / "airbench")), str(make_run(root / "allcnn", batch_norm=True))]


def _val(count: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=count)


def test_the_ensemble_teacher_predicts_its_members_average(members, tmp_path):
    images, labels = _val()
    record = write_ensemble_teacher(members, tmp_path / "ensemble", (images, labels), held_out=HELD_OUT)
    teacher = load_teacher(str(tmp_path / "ensemble" / "teacher.keras"))
    probabilities = teacher.probabilities(images)
    alone = [load_teacher(member).probabilities(images) for member in members]
    assert not np.allclose(alone[0], alone[1], atol=0.01)  # two different networks
    np.testing.assert_allclose(probabilities, np.mean(alone, axis=0), atol=1e-6)
    assert record["val_accuracy"] == round(float(np.mean(probabilities.argmax(axis=1) == labels)), 4)
    assert record["network"] == ("average of airbench-style teacher (allcnn.airbench) "
                                 f"and All-CNN-C ({members[1]})")
    # The airbench teacher's training counts as the ensemble's; the All-CNN-C's is in its own records.
    assert (record["epochs"], record["train_seconds"], record["machine"]) == (3, 3600.0, "CPU test")
    assert record["held_out"] == HELD_OUT and record["members"] == members and record["precision"] == "float32"
    assert json.loads((tmp_path / "ensemble" / "teacher.json").read_text()) == record
    # ship_weights reads it as any teacher network's record.
    summary = load_script("ship_weights").teacher_summary(str(tmp_path / "ensemble" / "teacher.keras"))
    assert summary["train_hours"] == 1.0 and summary["val_top1"] == record["val_accuracy"]
    assert record["tta"] == "none" and record["val_accuracy_tta"] is not None


def test_a_flip_averaged_ensemble_teacher_predicts_each_member_s_flip_average(members, tmp_path):
    """`tta="flip"`: the mirror inside the teacher, so that a run's augmented batches get flip averages."""
    images, labels = _val()
    record = write_ensemble_teacher(members, tmp_path / "ensemble", (images, labels), held_out=HELD_OUT, tta="flip")
    probabilities = load_teacher(str(tmp_path / "ensemble" / "teacher.keras")).probabilities(images)
    flip_averages = [load_teacher(member).probabilities(images, tta="flip") for member in members]
    np.testing.assert_allclose(probabilities, np.mean(flip_averages, axis=0), atol=1e-6)
    plain = np.mean([load_teacher(member).probabilities(images) for member in members], axis=0)
    assert not np.allclose(probabilities, plain, atol=1e-3)  # the mirror counts
    assert record["network"].endswith(", each on the image and its mirror") and record["tta"] == "flip"
    assert record["val_accuracy_tta"] is None


def test_a_flip_average_of_zca_whitened_inputs_is_refused(tmp_path):
    zca = Preprocessing("zca", [0.0] * 3072, whiten=np.eye(3072, dtype=np.float32))
    chosen = [str(_airbench_folder(tmp_path / name, zca)) for name in ("a", "b")]
    with pytest.raises(RunError, match="mirror of a zca-whitened image"):
        write_ensemble_teacher(chosen, tmp_path / "ensemble", _val(), held_out=HELD_OUT, tta="flip")


def test_the_record_names_each_member_s_precision(members, tmp_path):
    """A teacher network saved in bf16 computes in bf16 inside the ensemble too."""
    from allcnn.hardware import dtype_policy

    with dtype_policy("mixed_bfloat16"):
        bf16 = str(_airbench_folder(tmp_path / "bf16"))
    record = write_ensemble_teacher([bf16, members[1]], tmp_path / "ensemble", _val(4), held_out=HELD_OUT)
    assert record["precision"] == "float32, mixed_bfloat16"


def test_an_ensemble_of_networks_that_cannot_be_averaged_is_refused(members, tmp_path):
    other = str(_airbench_folder(tmp_path / "other", Preprocessing("standardize", [0.4] * 3, [0.25] * 3)))
    cases = [([members[0]], HELD_OUT, "two or more networks"),
             ([members[0], str(tmp_path / "none.keras")], HELD_OUT, "no such file"),
             ([members[1], other], HELD_OUT, "preprocesses its inputs otherwise"),
             (members, held_out_record(5000), "trained on some of these validation images")]
    for chosen, held_out, message in cases:
        with pytest.raises(RunError, match=message):
            write_ensemble_teacher(chosen, tmp_path / "ensemble", _val(), held_out=held_out)
    assert not (tmp_path / "ensemble").exists()


def test_the_script_scores_the_ensemble_on_the_held_out_images(members, cifar_dir, tmp_path):
    out = tmp_path / "ensemble"
    command = [sys.executable, str(SCRIPTS / "ensemble_teacher.py"), str(out), *members, "--val-size", "20",
               "--tta", "flip"]
    result = subprocess.run([*command, "--data-dir", str(cifar_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "val_accuracy" in result.stdout and (out / "teacher.keras").is_file()
    record = json.loads((out / "teacher.json").read_text())
    assert record["held_out"] == HELD_OUT and record["tta"] == "flip"
    missing = subprocess.run([*command, "--data-dir", str(tmp_path / "none")], capture_output=True, text=True)
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error: ")]
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and len(errors) == 1
