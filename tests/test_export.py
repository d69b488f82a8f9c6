"""`allcnn export`: round trips through each runtime that installs, the JSON beside, refusals."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from allcnn.cli import main

ONNX_EXAMPLE_DOC = Path(__file__).resolve().parents[1] / "docs" / "commands.md"


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


ROUND_TRIPS = [
    pytest.param("onnx", "m.onnx", marks=pytest.mark.skipif(
        not _installed("tf2onnx", "onnx", "onnxruntime"), reason="tf2onnx, onnx, onnxruntime: allcnn[export]")),
    pytest.param("tflite", "m.tflite", marks=pytest.mark.skipif(
        not _installed("ai_edge_litert"), reason="ai-edge-litert: allcnn[export]")),
    pytest.param("saved_model", "m_saved_model"),
]


def test_formats_match_the_cli_choices():
    from allcnn.config import EXPORT_FORMATS
    from allcnn.export import FORMATS

    assert tuple(FORMATS) == EXPORT_FORMATS


@pytest.mark.parametrize("format_, name", ROUND_TRIPS)
def test_round_trip_matches_keras(weights, tmp_path, format_, name):
    from allcnn.export import FORMATS, TOLERANCE, check_images
    from allcnn.model import load_classifier

    out = tmp_path / name
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", format_, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(r"within \S+ of Keras' \(tolerance 0.0001\)", result.output)
    spec = json.loads(Path(f"{out}.json").read_text())
    assert spec["classes"][0] == "airplane" and spec["input"]["shape"] == [None, 32, 32, 3]
    assert spec["input"]["range"] == [0, 255] and spec["preprocessing"]["method"] == "standardize"
    assert spec["check"]["max_abs_difference"] <= TOLERANCE and spec["source_weights"]["path"] == str(weights)
    # Independently of the command's own check: other images, through the runtime, against Keras.
    images = np.random.default_rng(7).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    run = FORMATS[format_].load(str(out))
    expected = load_classifier(weights, precision="float32").probabilities(images)
    np.testing.assert_allclose(run(images.astype(np.float32)), expected, atol=TOLERANCE)
    assert not np.array_equal(check_images()[:5], images)


def test_mismatch_is_an_error_and_nothing_is_written(weights, tmp_path, monkeypatch):
    from allcnn import export

    broken = dataclasses.replace(export.FORMATS["saved_model"], load=lambda path: lambda x: np.zeros((len(x), 10)))
    monkeypatch.setitem(export.FORMATS, "saved_model", broken)
    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", "saved_model", "--out", str(out)])
    assert result.exit_code == 1 and "differ from Keras'" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_package_is_named_in_one_line(weights, tmp_path, monkeypatch):
    from allcnn import export

    missing = dataclasses.replace(export.FORMATS["onnx"], converters=("tf2onnx_not_installed",))
    monkeypatch.setitem(export.FORMATS, "onnx", missing)
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", "onnx",
                                       "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert result.output == "Error: export to onnx needs tf2onnx_not_installed: pip install 'allcnn[export]'\n"


def test_refuses_an_existing_out_and_a_wrong_suffix(weights, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"keep me")
    for out, format_, reason in [("m.onnx", "onnx", "--overwrite"), ("m.onnx", "tflite", "end in .tflite")]:
        result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", format_,
                                           "--out", str(tmp_path / out)])
        assert result.exit_code == 2 and reason in result.output and "Traceback" not in result.output
    assert (tmp_path / "m.onnx").read_bytes() == b"keep me"


def test_atomic_write_directory_replaces_or_keeps(tmp_path):
    from allcnn.files import atomic_write_directory

    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write_directory(target) as tmp:
            (Path(tmp) / "new").write_text("half")
            raise RuntimeError("the export failed")
    assert [p.name for p in target.iterdir()] == ["old"]
    with atomic_write_directory(target) as tmp:
        (Path(tmp) / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.skipif(not _installed("tf2onnx", "onnx", "onnxruntime"), reason="tf2onnx, onnx, onnxruntime: allcnn[export]")
def test_docs_onnx_example_runs_without_allcnn(weights, tmp_path):
    """The three lines of docs/commands.md, in a process that imports neither allcnn nor TensorFlow."""
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", "onnx",
                                       "--out", str(tmp_path / "allcnn.onnx")])
    assert result.exit_code == 0, result.output
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "cat.jpg")
    example = ONNX_EXAMPLE_DOC.read_text().split("<!-- onnx-example -->")[1].split("```python\n")[1].split("```")[0]
    check = "\nimport sys; assert 'tensorflow' not in sys.modules and 'allcnn' not in sys.modules\n"
    run = subprocess.run([sys.executable, "-c", example + check], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() in json.loads((tmp_path / "allcnn.onnx.json").read_text())["classes"]


@pytest.mark.parametrize("format_, name", [ROUND_TRIPS[0], ROUND_TRIPS[2]])
def test_zca_preprocessing_in_the_graph_matches_numpy(weights, tmp_path, format_, name):
    """A ZCA run (random statistics of the right shapes: the layer must only match numpy)."""
    import shutil

    from allcnn.export import TOLERANCE, export
    from allcnn.model import load_classifier
    from allcnn.preprocessing import Preprocessing

    run = tmp_path / "zca_run"
    shutil.copytree(weights.parent, run)
    rng = np.random.default_rng(3)
    Preprocessing("zca", rng.normal(0, 1, 3072).tolist(), [],
                  rng.normal(0, 0.02, (3072, 3072)).astype(np.float32)).save(run / "preprocessing.json")
    spec = export(load_classifier(run / weights.name, precision="float32"), format=format_, out=tmp_path / name)
    assert spec["preprocessing"]["method"] == "zca" and spec["check"]["max_abs_difference"] <= TOLERANCE


def test_a_global_mixed_precision_policy_does_not_leak_into_the_export(weights, tmp_path):
    """A training run (or a notebook) may leave a mixed policy set; the export stays float32."""
    import keras

    from allcnn.export import export
    from allcnn.model import load_classifier

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        spec = export(load_classifier(weights, precision="float32"), format="saved_model", out=tmp_path / "m")
    finally:
        keras.config.set_dtype_policy(previous)
    assert spec["check"]["max_abs_difference"] <= 1e-4
