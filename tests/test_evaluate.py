"""`allcnn evaluate`: the Python API, text, JSON and --plot outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from allcnn.cli import main
from allcnn.data import CLASS_NAMES
from conftest import SHARED_DATA


def test_metrics_on_known_probabilities():
    from allcnn.evaluation import metrics

    probabilities = np.eye(10, dtype=np.float32)[[0, 1, 2, 2]]
    result = metrics(probabilities, np.array([0, 1, 2, 3]), CLASS_NAMES)
    assert result["top1"] == 0.75 and result["per_class"]["cat"] == 0.0 and result["confusion"][3][2] == 1
    assert result["per_class"]["deer"] is None  # no deer among the labels: n/a, not 0%


def test_no_top5_for_five_classes_or_fewer():
    from allcnn.evaluation import metrics

    probabilities = np.eye(5, dtype=np.float32)[[0, 1, 2]]
    assert "top5" not in metrics(probabilities, np.array([0, 1, 3]), tuple("abcde"))
    assert "top5" in metrics(np.eye(6, dtype=np.float32)[[0]], np.array([0]), tuple("abcdef"))


def _classifier(weights, **kwargs):
    from allcnn.model import load_classifier

    return load_classifier(weights, **kwargs)


def test_evaluate_api_val_split(weights, cifar_dir):
    from allcnn.evaluation import evaluate

    result = evaluate(_classifier(weights, device="cpu"), data_dir=cifar_dir, split="val", batch_size=16)
    assert result["images"] == 20 and 0 <= result["top1"] <= result["top5"] <= 1


def test_cli_text_json_and_plot(weights, cifar_dir, tmp_path):
    args = ["evaluate", "--weights", str(weights), "--data-dir", str(cifar_dir), "--batch-size", "16"]
    text = CliRunner().invoke(main, args + ["--plot", str(tmp_path / "c.png")])
    assert text.exit_code == 0, text.output
    assert "top-5" in text.output and "airplane" in text.output
    first = text.output.splitlines()[0]  # what is measured comes first, and in float32 by default
    assert first == f"weights: {weights} (paper, float32)" and "float32" in text.output.splitlines()[1]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    as_json = CliRunner().invoke(main, args + ["--json"])
    result = json.loads(as_json.output)
    assert result["images"] == 40 and {"loss", "top1", "top5", "seconds", "images_per_second"} <= set(result)


def test_indices_and_flip_tta(weights, cifar_dir):
    from allcnn.data import load_cifar10
    from allcnn.evaluation import evaluate, metrics

    classifier = _classifier(weights, precision="float32")
    part = evaluate(classifier, data_dir=cifar_dir, indices=slice(5, 15), batch_size=4)
    assert part["images"] == 10 and part["indices"] == "5:15" and part["tta"] == "none"
    flipped = evaluate(classifier, data_dir=cifar_dir, indices=slice(5, 15), batch_size=4, tta="flip")
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

    result = evaluate(_classifier(None, precision="float32", device="cpu"), data_dir=SHARED_DATA)
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


def test_bad_weights_refused_before_tensorflow_starts(tmp_path):
    """A text file as --weights is refused by h5py alone: TensorFlow's seconds of start-up are not spent."""
    text = tmp_path / "notes.weights.h5"
    text.write_text("not weights")
    script = ("import sys\nfrom allcnn.cli import main\n"
              f"try:\n    main(['evaluate', '--weights', {str(text)!r}])\n"
              "except SystemExit as e:\n    print(e.code, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["1", "False", "False"] and "not a Keras weights file" in done.stderr


def test_progress_bar_on_a_terminal_only(monkeypatch, capsys):
    from allcnn.inference import Progress

    Progress(500).add(500)  # stderr is no terminal under pytest: nothing
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    Progress(50).add(50)  # too few images to be worth a bar
    bar = Progress(500)
    bar.add(256)
    bar.add(244)
    out, err = capsys.readouterr()
    assert out == "" and "500/500" in err
