"""`allcnn evaluate`: the Python API, text, JSON and --plot outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from allcnn.cli import main
from allcnn.data import CLASS_NAMES
from conftest import SHARED_DATA
from tests.helpers_weights import make_run


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("w"))


def test_metrics_on_known_probabilities():
    from allcnn.evaluation import metrics

    probabilities = np.eye(10, dtype=np.float32)[[0, 1, 2, 2]]
    result = metrics(probabilities, np.array([0, 1, 2, 3]), CLASS_NAMES)
    assert result["top1"] == 0.75 and result["per_class"]["cat"] == 0.0 and result["confusion"][3][2] == 1


def test_evaluate_api_val_split(weights, cifar_dir):
    from allcnn.evaluation import evaluate

    result = evaluate(weights, data_dir=cifar_dir, split="val", batch_size=16, device="cpu")
    assert result["images"] == 20 and 0 <= result["top1"] <= result["top5"] <= 1


def test_cli_text_json_and_plot(weights, cifar_dir, tmp_path):
    args = ["evaluate", "--weights", str(weights), "--data-dir", str(cifar_dir), "--batch-size", "16"]
    text = CliRunner().invoke(main, args + ["--plot", str(tmp_path / "c.png")])
    assert text.exit_code == 0, text.output
    assert "top-5" in text.output and "airplane" in text.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    as_json = CliRunner().invoke(main, args + ["--json"])
    result = json.loads(as_json.output)
    assert result["images"] == 40 and {"loss", "top1", "top5", "seconds", "images_per_second"} <= set(result)


def test_indices_and_flip_tta(weights, cifar_dir):
    from allcnn.data import load_cifar10
    from allcnn.evaluation import evaluate, metrics
    from allcnn.inference import load_classifier

    part = evaluate(weights, data_dir=cifar_dir, indices=slice(5, 15), batch_size=4, precision="float32")
    assert part["images"] == 10 and part["indices"] == "5:15" and part["tta"] == "none"
    flipped = evaluate(weights, data_dir=cifar_dir, indices=slice(5, 15), batch_size=4, precision="float32",
                       tta="flip")
    classifier = load_classifier(weights, precision="float32")
    x, y = (a[5:15] for a in load_cifar10(cifar_dir)[1])
    by_hand = (classifier.probabilities(x) + classifier.probabilities(x[:, :, ::-1])) / 2
    assert flipped["loss"] == pytest.approx(metrics(by_hand, y, CLASS_NAMES)["loss"], rel=1e-5)
    assert flipped["loss"] != pytest.approx(part["loss"], rel=1e-5)


@pytest.mark.parametrize("indices", ["5", "a:b", "1:2:3", "40:50"])
def test_bad_indices_one_line(weights, cifar_dir, indices):
    result = CliRunner().invoke(main, ["evaluate", "--weights", str(weights), "--data-dir", str(cifar_dir),
                                       "--indices", indices])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert result.output.count("Error") == 1 and ("A:B" in result.output or "select no images" in result.output)


def test_cli_missing_default_weights(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLCNN_WEIGHTS_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["evaluate", "--data-dir", str(cifar_dir)])
    assert result.exit_code == 1 and "--weights" in result.output and "Traceback" not in result.output


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="../shared/data absent")
def test_shipped_weights_score_what_their_manifest_says():
    from allcnn.evaluation import evaluate
    from allcnn.manifest import manifest_entry

    result = evaluate(data_dir=SHARED_DATA, precision="float32", device="cpu")
    recorded = manifest_entry()["accuracy"]
    assert (result["top1"], result["top5"]) == (recorded["test_top1"], recorded["test_top5"])


def test_only_user_errors_become_one_line(weights, cifar_dir, tmp_path, monkeypatch):
    missing = ["evaluate", "--weights", str(tmp_path / "none.weights.h5"), "--data-dir", str(cifar_dir)]
    plain = CliRunner().invoke(main, missing)
    assert plain.exit_code == 1 and plain.output == f"Error: {tmp_path / 'none.weights.h5'}: no such weights file\n"
    from allcnn.weights_io import WeightsError

    debug = CliRunner().invoke(main, ["--debug", *missing])  # --debug: the exception itself, with its traceback
    assert isinstance(debug.exception, WeightsError) and "Error:" not in debug.output

    def bug(*args, **kwargs):
        raise ValueError("a bug, not the user's doing")

    monkeypatch.setattr("allcnn.evaluation.evaluate", bug)
    result = CliRunner().invoke(main, ["evaluate", "--weights", str(weights), "--data-dir", str(cifar_dir)])
    assert isinstance(result.exception, ValueError) and "Error:" not in result.output
