"""Weights formats, the manifest and its sha256, mismatch errors, the Keras 2 legacy path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers_weights import make_run


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("w"))


def test_resolve_from_run_folder(weights):
    from allcnn.manifest import resolve_weights
    from allcnn.weights_io import KERAS3

    spec = resolve_weights(weights)
    assert (spec.variant, spec.format, spec.preprocessing.method, spec.val_size) == ("paper", KERAS3, "standardize", 20)


def test_shape_mismatch_names_layer(weights):
    from allcnn.model import build_model
    from allcnn.weights_io import WeightsError, load_weights

    with pytest.raises(WeightsError, match="layer 'conv9'"):
        load_weights(build_model(classes=5), weights)


def test_truncated_file_is_named_as_damaged(weights, tmp_path):
    from allcnn.model import build_model
    from allcnn.weights_io import WeightsError, load_weights

    cut = tmp_path / "cut.weights.h5"
    cut.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match=f"{cut}: damaged weights file, cannot be read"):
        load_weights(build_model("paper"), cut)


def test_keras_model_file(weights, tmp_path):
    from allcnn.model import build_model
    from allcnn.weights_io import load_weights

    source = build_model("tutorial", seed=1)
    source.save(tmp_path / "m.keras")
    target = build_model("tutorial")
    load_weights(target, tmp_path / "m.keras")
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(target(x), source(x), atol=1e-6)


def test_manifest_sha256(weights, tmp_path):
    from allcnn.manifest import resolve_weights, write_manifest_entry
    from allcnn.weights_io import WeightsError

    write_manifest_entry(weights, weights.parent, name="tiny", accuracy={}, produced={"epochs": 0})
    assert resolve_weights(weights_dir=weights.parent).path == weights
    manifest = weights.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    data["weights"][0]["sha256"] = "0" * 64
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps(data))
    (bad / weights.name).write_bytes(weights.read_bytes())
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(weights_dir=bad)
    with pytest.raises(WeightsError, match="--weights"):
        resolve_weights(weights_dir=tmp_path / "nothing")


def test_manifest_records_the_validation_images_a_run_held_out(tmp_path):
    """A fraction (val_split) is written as such, the default count written out: `evaluate --split
    val` and ship_weights' comparison read them back as the run held them out."""
    from allcnn.config import make_config
    from allcnn.manifest import resolve_weights, write_manifest_entry

    weights = make_run(tmp_path)
    config = weights.parent / "config.toml"
    for settings, recorded in [({"val_split": 0.25}, {"val_split": 0.25}), ({}, {"val_size": 5000})]:
        config.write_text(make_config(**settings).to_toml())
        entry = write_manifest_entry(weights, weights.parent, name="tiny", accuracy={}, produced={})
        assert {key: entry[key] for key in ("val_size", "val_split") if key in entry} == recorded
        spec = resolve_weights(weights_dir=weights.parent)
        assert (spec.val_size, spec.val_split) == (recorded.get("val_size", 5000), recorded.get("val_split", 0.0))


@pytest.mark.parametrize("manifest, message", [
    ([], "expected an object"),
    ({"weights": ["x"]}, "expected an object"),
    ({"default": "a", "weights": [{"name": "a", "file": "a.weights.h5"}]}, "lacks sha256, variant, preprocessing"),
])
def test_malformed_manifest_is_one_error(manifest, message, tmp_path):
    from allcnn.manifest import resolve_weights
    from allcnn.weights_io import WeightsError

    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match=message):
        resolve_weights(weights_dir=tmp_path)


def test_preprocessing_json_must_be_an_object(tmp_path):
    from allcnn.preprocessing import Preprocessing

    (tmp_path / "p.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        Preprocessing.load(tmp_path / "p.json")


LEGACY = textwrap.dedent("""
    import sys, numpy as np, tf_keras as k
    L = k.layers
    m = k.Sequential([k.Input((32, 32, 3))])
    for f, s, st, relu in [(96,3,1,1),(96,3,1,1),(96,3,2,0),(192,3,1,1),(192,3,1,1),(192,3,2,0),(192,3,1,1),(192,1,1,1),(10,1,1,0)]:
        m.add(L.Conv2D(f, s, strides=st, padding="same"))
        if relu: m.add(L.Activation("relu"))
        if st == 2: m.add(L.Dropout(0.5))
    m.add(L.GlobalAveragePooling2D()); m.add(L.Activation("softmax"))
    m.save_weights(sys.argv[1])
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    np.save(sys.argv[2], x); np.save(sys.argv[3], m.predict(x / 255.0, verbose=0))
""")


def test_legacy_keras2_hdf5(tmp_path):
    from allcnn.model import load_classifier
    from allcnn.weights_io import LEGACY_H5, weights_format

    pytest.importorskip("tf_keras")
    path, images, expected = tmp_path / "all_cnn_weights.hdf5", tmp_path / "x.npy", tmp_path / "p.npy"
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    subprocess.run([sys.executable, "-c", LEGACY, str(path), str(images), str(expected)], check=True, env=env)
    assert weights_format(path) == LEGACY_H5
    classifier = load_classifier(path, device="cpu", precision="float32")
    assert classifier.spec.variant == "tutorial"
    np.testing.assert_allclose(classifier.probabilities(np.load(images)), np.load(expected), atol=1e-6)

    from PIL import Image

    from allcnn.cli import main

    Image.fromarray(np.load(images)[0]).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "a.png"), "--weights", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["top"][0]["class"]
