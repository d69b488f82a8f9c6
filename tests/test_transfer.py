"""Your own images and CIFAR-100: image-folder datasets, transfer from our weights, two-phase runs."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from allcnn.cli import main
from allcnn.config import tomllib
from allcnn.data import CIFAR100_CLASS_NAMES, DatasetError, load_cifar100, load_dataset, load_image_folder

CLASSES = ("cat", "dog", "fox")
FAST = ["--batch-size", "8", "--val-split", "0.25", "--precision", "float32", "--lr", "0.01"]


def write_image_folder(root: Path, per_class: int = 8, classes=CLASSES, bad_files: bool = True) -> Path:
    """DIR/CLASS/IMAGE with class-dependent colours (so a few epochs learn something), PNG and
    JPEG of several sizes; with `bad_files` also a text file and a broken JPEG, and a hidden file."""
    rng = np.random.default_rng(len(str(root)))
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.integers(0, 60, (40 + i, 48, 3)) + 90 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    if bad_files:
        (root / classes[0] / "notes.txt").write_text("not an image")
        (root / classes[1] / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
        (root / classes[1] / ".DS_Store").write_bytes(b"\0")
        (root / classes[1] / ".ipynb_checkpoints").mkdir()  # a hidden folder's copies are not more images
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / classes[1] / ".ipynb_checkpoints" / "0.png")
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "photos")


def _train(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_image_folder_classes_images_and_skipped_files(photos):
    x, y, names, skipped = load_image_folder(photos)
    assert names == CLASSES and x.shape == (24, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [8, 8, 8]
    assert len(skipped) == 2 and any("notes.txt" in s for s in skipped) and any("broken.jpg" in s for s in skipped)
    assert not any(".DS_Store" in s for s in skipped)
    assert load_image_folder(photos, size=48)[0].shape == (24, 48, 48, 3)
    dataset = load_dataset("auto", photos)  # class sub-folders and no CIFAR: an image folder
    assert dataset.name == "folder" and dataset.test is None and len(dataset.skipped) == 2


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "cat").mkdir(parents=True), "at least two class sub-folders (DIR/CLASS/IMAGE), found only 'cat'"),
    (lambda root: [(root / c).mkdir(parents=True) for c in ("cat", "dog")], "class 'cat' has no usable image"),
    (lambda root: write_image_folder(root, classes=("cat",), bad_files=False), "found only 'cat'"),
])
def test_a_folder_nothing_can_be_trained_on_exits_2_in_one_line(tmp_path, make, message):
    data = tmp_path / "data"
    make(data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = tmp_path / "run"
    result = _train("--dataset", "folder", "--data-dir", data, "--out", out, "--epochs", "1", *FAST)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("Error: ") == 1 and "Traceback" not in result.output
    assert not out.exists() and sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_test_dir_with_other_classes_exits_2(photos, tmp_path):
    other = write_image_folder(tmp_path / "other", per_class=2, classes=("cat", "dog", "owl"), bad_files=False)
    result = _train("--data-dir", photos, "--test-dir", other, "--out", tmp_path / "run", "--epochs", "1", *FAST)
    assert result.exit_code == 2 and "missing: fox; extra: owl" in result.output, result.output
    assert not (tmp_path / "run").exists()
    for image in (photos / "fox").iterdir():  # a class whose files are none of them images
        image.write_text("not an image")
    with pytest.raises(DatasetError, match="class 'fox' has no usable image"):
        load_image_folder(photos)


def test_train_evaluate_predict_with_the_folder_class_names(photos, tmp_path):
    tests = write_image_folder(tmp_path / "tests", per_class=3, bad_files=False)
    out = tmp_path / "run"
    result = _train("--data-dir", photos, "--test-dir", tests, "--test", "--out", out, "--initial-weights", "shipped",
                    "--head-epochs", "1", "--epochs", "1", *FAST)
    assert result.exit_code == 0, result.output
    assert "2 files skipped" in result.output and "notes.txt" in result.output
    assert "every layer but the classifier, new for 3 classes" in result.output
    assert json.loads((out / "classes.json").read_text())["class_names"] == list(CLASSES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_files"] == 2 and summary["classes"] == 3 and summary["epochs"] == 2
    assert 0 <= summary["test_accuracy"] <= 1

    weights = out / "best.weights.h5"
    result = CliRunner().invoke(main, ["evaluate", "--weights", str(weights), "--data-dir", str(tests), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 9 and list(report["per_class"]) == list(CLASSES)
    assert report["top1"] == pytest.approx(summary["test_accuracy"])
    result = CliRunner().invoke(main, ["predict", "--weights", str(weights), str(tests / "fox"), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert len(lines) == 3 and all({t["class"] for t in line["top"]} == set(CLASSES) for line in lines)
    # The run records what it trained on: resuming it, or evaluating its weights, without the folder says so.
    assert tomllib.loads((out / "config.toml").read_text())["dataset"] == "folder"
    for command in (["train", "--resume", "--out", str(out)], ["evaluate", "--weights", str(weights)]):
        result = CliRunner().invoke(main, command, env={"ALLCNN_DATA_DIR": ""})
        assert result.exit_code == 2 and "needs --data-dir DIR" in result.output, result.output
        assert result.output.count("Error: ") == 1 and "Traceback" not in result.output


def test_initial_weights_of_another_network_are_refused_before_anything_is_written(photos, tmp_path):
    out = tmp_path / "run"
    result = _train("--data-dir", photos, "--out", out, "--initial-weights", "shipped", "--variant", "tutorial",
                    "--epochs", "1", *FAST)
    assert result.exit_code == 1 and "are the paper network; this run trains tutorial" in result.output, result.output
    assert not out.exists()
    from allcnn.model import build_model  # a bare file (no run folder tells its network) of another architecture

    build_model("paper", batch_norm=True).save_weights(tmp_path / "other.weights.h5")
    result = _train("--data-dir", photos, "--out", out, "--initial-weights", tmp_path / "other.weights.h5",
                    "--epochs", "1", *FAST)
    assert result.exit_code == 1 and "initial_weights: " in result.output and "another architecture" in result.output
    assert result.output.count("Error: ") == 1 and not out.exists(), result.output


def test_a_teacher_of_other_classes_is_refused_before_anything_is_written(photos, tmp_path):
    out = tmp_path / "run"
    result = _train("--data-dir", photos, "--out", out, "--teacher", "shipped", "--epochs", "1", *FAST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "teacher: shipped predicts the classes airplane, automobile" in result.output
    assert "this run trains on " in result.output and not out.exists()


def test_freeze_base_trains_the_classifier_alone(photos, tmp_path):
    import keras

    from allcnn.manifest import resolve_weights
    from allcnn.model import build_model
    from allcnn.weights_io import load_weights

    out = tmp_path / "run"
    result = _train("--data-dir", photos, "--out", out, "--initial-weights", "shipped", "--freeze-base",
                    "--epochs", "1", *FAST)
    assert result.exit_code == 0, result.output
    shipped, trained = build_model("paper"), build_model("paper", classes=3)
    load_weights(shipped, resolve_weights().path)
    load_weights(trained, out / "last.weights.h5")
    for a, b in zip(shipped.layers, trained.layers):
        if a.name == "conv9":  # the new classifier: 3 outputs, trained
            assert b.get_weights()[0].shape == (1, 1, 192, 3)
            continue
        for u, v in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(u, v)  # the base: the shipped weights, bit for bit
    fresh = build_model("paper", classes=3, seed=0)
    keras.utils.set_random_seed(0)
    assert not np.array_equal(trained.get_layer("conv9").get_weights()[0], fresh.get_layer("conv9").get_weights()[0])


def test_image_folder_holds_out_one_image_a_class_by_default(tmp_path):
    """21 images of 3 classes, no --val-size: 10% is 2, so one of each class (3), also in evaluate --split val."""
    photos = write_image_folder(tmp_path / "photos", per_class=7, bad_files=False)
    out = tmp_path / "run"
    result = _train("--data-dir", photos, "--out", out, "--initial-weights", "shipped", "--freeze-base",
                    "--epochs", "1", "--batch-size", "8", "--precision", "float32")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("plan: 1 epoch of the classifier alone (base frozen, step, peak lr 0.01)\n")
    assert ("validation: 3 of 21 training images held out (10% of the image folder, at least one a class)"
            in result.output)
    assert tomllib.loads((out / "config.toml").read_text())["val_size"] == 0
    result = CliRunner().invoke(main, ["evaluate", "--weights", str(out / "best.weights.h5"), "--data-dir",
                                       str(photos), "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 3 and [sum(row) for row in report["confusion"]] == [1, 1, 1]


def _history(out: Path) -> list[dict]:
    rows = list(csv.DictReader(open(out / "history.csv")))
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]


@pytest.mark.parametrize("stop_after", [1, 2], ids=["at-the-phase-boundary", "inside-phase-2"])
def test_two_phase_run_resumed_matches_uninterrupted(photos, tmp_path, monkeypatch, stop_after):
    """head_epochs 1 + epochs 2, with EMA: stopped after epoch `stop_after` and resumed, the
    history and the weights are those of the uninterrupted run."""
    from allcnn import callbacks
    from allcnn.config import load_config
    from allcnn.training import resume, train

    config = load_config("finetune", head_epochs=1, epochs=2, batch_size=8, precision="float32", use_ema=True,
                         ema_momentum=0.9)
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(config, whole, data_dir=photos)

    original = callbacks.RunBackup.on_epoch_end

    def stop(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch + 1 == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.RunBackup, "on_epoch_end", stop)
    with pytest.raises(KeyboardInterrupt):
        train(config, split, data_dir=photos)
    monkeypatch.setattr(callbacks.RunBackup, "on_epoch_end", original)
    assert resume(split, data_dir=photos)["epochs"] == 3
    assert _history(split) == _history(whole) and len(_history(whole)) == 3
    assert (split / "last.weights.h5").read_bytes() != b"" and _same_weights(whole, split)


def _same_weights(a: Path, b: Path) -> bool:
    import h5py

    with h5py.File(a / "last.weights.h5") as fa, h5py.File(b / "last.weights.h5") as fb:
        arrays = []
        fa["layers"].visititems(lambda name, obj: arrays.append(name) if isinstance(obj, h5py.Dataset) else None)
        return all(np.array_equal(fa["layers"][n][()], fb["layers"][n][()]) for n in arrays)


def write_cifar100_folder(root: Path, per_split: int = 30) -> Path:
    """cifar-100-python/{train,test,meta} as the official pickles: fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", per_split * 2), ("test", per_split)):
        fine = rng.integers(0, 100, n)
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": b"synthetic", b"fine_labels": fine.tolist(),
                 b"coarse_labels": (fine // 5).tolist(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=4)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in CIFAR100_CLASS_NAMES],
                     b"coarse_label_names": [b"c%d" % i for i in range(20)]}, f, protocol=4)
    return root


def test_cifar100_loads_fine_labels_and_trains_with_100_classes(tmp_path):
    data = write_cifar100_folder(tmp_path / "data")
    (x, y), (xt, yt) = load_cifar100(data)
    assert x.shape == (60, 32, 32, 3) and xt.shape == (30, 32, 32, 3) and y.max() < 100
    with open(data / "cifar-100-python" / "train", "rb") as f:
        assert y.tolist() == pickle.load(f, encoding="bytes")[b"fine_labels"]
    assert load_dataset("cifar100", data).class_names == CIFAR100_CLASS_NAMES
    assert load_dataset("auto", data).name == "cifar100"  # CIFAR-100 and no CIFAR-10 in the folder
    out = tmp_path / "run"
    result = _train("--config", "paper-cifar100", "--data-dir", data, "--out", out, "--epochs", "1",
                    "--batch-size", "16", "--val-size", "10", "--precision", "float32")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "classes.json").read_text())["class_names"] == list(CIFAR100_CLASS_NAMES)
    result = CliRunner().invoke(main, ["evaluate", "--weights", str(out / "best.weights.h5"), "--data-dir", str(data),
                                       "--dataset", "cifar100", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 30 and len(json.loads(result.output)["per_class"]) == 100


def test_cifar100_meta_with_other_names_is_refused(tmp_path):
    data = write_cifar100_folder(tmp_path / "data")
    with open(data / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"x"] * 100}, f)
    with pytest.raises(Exception, match="are not CIFAR-100's"):
        load_cifar100(data)


def test_auto_dataset_resolution(tmp_path, photos, cifar_dir):
    from allcnn.config import ConfigError
    from allcnn.data import resolve_dataset

    assert resolve_dataset("auto", photos) == "folder"
    assert resolve_dataset("auto", cifar_dir) == resolve_dataset("auto", None) == "cifar10"
    # A CIFAR copy given one folder too high is not a folder of classes: the CIFAR error says where to look.
    nested = tmp_path / "datasets"
    nested.mkdir()
    cifar_dir.rename(nested / "cifar")
    assert resolve_dataset("auto", nested) == "cifar10"
    with pytest.raises(ConfigError, match="dataset: 'imagenet' is not one of"):
        resolve_dataset("imagenet", photos)
