"""A run trained with batch norm works with every command: its weights are folded on loading."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from allcnn.cli import main
from allcnn.config import load_config
from allcnn.data import CLASS_NAMES
from allcnn.inference import Classifier
from allcnn.initial_weights import StartingWeights, load_initial_weights
from allcnn.model import build_model, load_classifier, unfold_batch_norm
from allcnn.optim import compile_model
from allcnn.pipeline import CifarBatches
from allcnn.preprocessing import Preprocessing
from allcnn.run_folder import RunFolder
from allcnn.weights_io import load_weights
from tests.helpers_weights import make_run


@pytest.fixture(scope="module", params=[False, True], ids=["batch_norm", "reparam"])
def weights(tmp_path_factory, request):
    return make_run(tmp_path_factory.mktemp("bn"), batch_norm=True, reparam=request.param)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_loading_folds_the_batch_norm_and_keeps_the_probabilities(weights):
    classifier = load_classifier(weights, precision="float32")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in classifier.model.layers)
    assert [layer.name for layer in classifier.model.layers] == [layer.name for layer in build_model().layers]
    normed = build_model(batch_norm=True, reparam=RunFolder(weights.parent).read_config().reparam)
    load_weights(normed, weights)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    expected = Classifier(normed, classifier.preprocessing, precision="float32").probabilities(images)
    np.testing.assert_allclose(classifier.probabilities(images), expected, atol=1e-5)


def test_evaluate(weights, cifar_dir):
    result = CliRunner().invoke(main, ["evaluate", "--weights", str(weights), "--data-dir", str(cifar_dir),
                                       "--precision", "float32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 40


def test_predict(weights, photo):
    result = CliRunner().invoke(main, ["predict", str(photo), "--weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert "photo.png" in result.output


@pytest.mark.parametrize("method", ["guided", "gradcam"])
def test_explain(weights, photo, tmp_path, method):
    result = CliRunner().invoke(main, ["explain", str(photo), "--weights", str(weights), "--method", method,
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"photo.{method}.png").read_bytes()[:4] == b"\x89PNG"


def test_export_has_no_batch_norm_and_matches_keras(weights, tmp_path):
    out = tmp_path / "m_saved_model"
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", "saved_model",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    graph = (out / "saved_model.pb").read_bytes()
    assert b"FusedBatchNorm" not in graph and b"batch_normalization" not in graph
    assert json.loads((tmp_path / "m_saved_model.json").read_text())["check"]["max_abs_difference"] <= 1e-4


def test_a_batch_norm_run_starts_from_plain_weights_equal_to_them(tmp_path, cifar_dir, monkeypatch):
    from allcnn import initial_weights

    plain_weights = make_run(tmp_path / "plain")
    pixels = np.random.default_rng(2).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    preprocessing = Preprocessing("standardize", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    images = preprocessing(pixels)
    batches = CifarBatches(pixels, np.eye(10, dtype=np.float32)[np.arange(40) % 10], preprocessing, 16,
                           flip=True, translate=4, cutout=16)
    unfolded_on = []
    monkeypatch.setattr(initial_weights, "unfold_batch_norm",
                        lambda plain, normed, x: (unfolded_on.append(x), unfold_batch_norm(plain, normed, x)))
    model = compile_model(load_config("release-bn"), steps_per_epoch=10)
    load_initial_weights(model, StartingWeights(plain_weights, CLASS_NAMES, "paper", False), CLASS_NAMES, batches)
    # The statistics are those of augmented images, as training's batches and a refresh give them.
    np.testing.assert_array_equal(unfolded_on[0], batches.sample(initial_weights.UNFOLD_IMAGES))
    assert not np.allclose(unfolded_on[0], images)
    plain = build_model()
    load_weights(plain, plain_weights)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images, training=False)),
                               keras.ops.convert_to_numpy(plain(images, training=False)), atol=1e-5)
    # The command: a batch-norm recipe from a plain run's weights trains (the reverse is refused).
    recipe = tmp_path / "bn.toml"
    recipe.write_text(load_config("release-bn", epochs=1, warmup_epochs=0, batch_size=16, val_size=20).to_toml())
    result = CliRunner().invoke(main, ["train", "--config", str(recipe), "--data-dir", str(cifar_dir), "--out",
                                       str(tmp_path / "bn"), "--initial-weights", str(plain_weights)])
    assert result.exit_code == 0, result.output
    assert "batch norm started from the statistics of 180 training images" in result.output
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "p"),
                                       "--initial-weights", str(tmp_path / "bn" / "best.weights.h5"), "--epochs", "1"])
    assert result.exit_code == 1 and "are the paper (batch norm) network; this run trains paper" in result.output
    # RepVGG's branches start from plain weights too (switched off but for the conv), not from batch-norm ones.
    recipe.write_text(load_config("release-bn-rep2", epochs=1, batch_size=16, val_size=20).to_toml())
    result = CliRunner().invoke(main, ["train", "--config", str(recipe), "--data-dir", str(cifar_dir), "--out",
                                       str(tmp_path / "rep"), "--initial-weights", str(plain_weights)])
    assert result.exit_code == 0, result.output
    assert "batch norm started from the statistics of 180 training images" in result.output
    result = CliRunner().invoke(main, ["train", "--config", str(recipe), "--data-dir", str(cifar_dir), "--out",
                                       str(tmp_path / "rep-bn"), "--initial-weights",
                                       str(tmp_path / "bn" / "best.weights.h5")])
    assert result.exit_code == 1 and "a reparam run starts from plain weights whose run" in result.output
    assert not (tmp_path / "rep-bn").exists()


def test_ema_validates_and_saves_the_averaged_weights_with_their_own_statistics(tmp_path, cifar_dir, monkeypatch):
    from allcnn import callbacks

    refreshed = []

    def spy(model, images, batch_size):
        callbacks_refresh(model, images, batch_size)
        refreshed.append(model.get_weights())

    callbacks_refresh = callbacks.refresh_batch_norm
    monkeypatch.setattr(callbacks, "refresh_batch_norm", spy)
    recipe = tmp_path / "bn.toml"
    recipe.write_text(load_config("release-bn", epochs=2, warmup_epochs=0, batch_size=16, val_size=40, use_ema=True,
                                  ema_momentum=0.5, precision="float32").to_toml())
    result = CliRunner().invoke(main, ["train", "--config", str(recipe), "--data-dir", str(cifar_dir),
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    # Once before each validation, with the average swapped in: the checkpoint keeps what was validated,
    # the averaged kernels and the statistics recomputed for them.
    assert len(refreshed) == 2
    saved = build_model(batch_norm=True, input_dropout=0.0, dropout=0.25)
    load_weights(saved, tmp_path / "run" / "last.weights.h5")
    for mine, kept in zip(refreshed[-1], saved.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, kept)
