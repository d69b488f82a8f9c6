"""`allcnn explain`: guided backpropagation and the deconvnet against a hand computation, the maps, the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from allcnn.cli import main
from conftest import load_script, needs_jax

# A network shaped like All-CNN-C's end (1x1 conv, ReLU, 1x1 conv to the classes, ReLU, global
# average pooling, softmax) on 2x2x2 inputs, with weights chosen so that the gradient reaching
# the first ReLU has both signs, also where that ReLU's input is negative: there guided
# backpropagation, the deconvnet and the plain gradient all differ.
W1 = np.array([[1.0, -2.0, 0.5], [0.5, 1.0, -1.0]], np.float32)  # 2 -> 3 channels
W2 = np.array([[1.0, -1.0], [-2.0, 1.0], [0.5, 0.5]], np.float32)  # 3 -> 2 classes
B1 = np.array([0.1, -0.2, 0.3], np.float32)
B2 = np.array([8.0, 5.0], np.float32)
X = np.array([[[[1.0, 0.5], [-1.0, 2.0]], [[0.3, -0.4], [2.0, 1.0]]]], np.float32)  # (1, 2, 2, 2)

TINY_NETWORK = """
import keras
model = keras.Sequential([keras.Input((2, 2, 2)), keras.layers.Conv2D(3, 1), keras.layers.ReLU(),
                          keras.layers.Dropout(0.5), keras.layers.Conv2D(2, 1), keras.layers.ReLU(),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Activation("softmax")])
model.layers[0].set_weights([W1[None, None], B1])
model.layers[3].set_weights([W2[None, None], B2])
"""


def tiny_network():
    namespace = {"W1": W1, "W2": W2, "B1": B1, "B2": B2}
    exec(TINY_NETWORK, namespace)
    return namespace["model"]


# What of the gradient R coming back lets a ReLU with input h pass it (the paper's Figure 3).
RELU_BACKWARD = {
    "gradient": lambda h, r: h > 0,
    "guided": lambda h, r: (h > 0) & (r > 0),
    "deconvnet": lambda h, r: r > 0,  # no forward mask
}


def by_hand(x: np.ndarray, c: int, method: str) -> np.ndarray:
    """The backward pass of the tiny network's class-c pre-softmax score, written out in numpy."""
    passes = RELU_BACKWARD[method]
    h = x @ W1 + B1
    z = np.maximum(h, 0) @ W2 + B2
    pixels = x.shape[1] * x.shape[2]
    dz = np.zeros_like(z)
    dz[..., c] = 1.0 / pixels  # d mean / d z
    dz *= passes(z, dz)  # the second ReLU: z and dz are positive, every method passes it
    dr = dz @ W2.T
    return (dr * passes(h, dr)) @ W1.T


@pytest.mark.parametrize("c", [0, 1])
def test_backward_passes_match_the_hand_computation(c):
    from allcnn.explain import backpropagate, deconvnet, guided_gradient, saliency

    model, classes = tiny_network(), np.array([c])
    computed = {"gradient": backpropagate(model, X, classes), "guided": guided_gradient(model, X, classes),
                "deconvnet": deconvnet(model, X, classes)}
    for method, gradient in computed.items():
        np.testing.assert_allclose(gradient, by_hand(X, c, method), atol=1e-6, err_msg=method)
    # The weights make the three differ: at some first-ReLU input h <= 0 the gradient coming back is
    # positive, so a deconvnet that applied the forward mask would fail here.
    for a, b in (("guided", "gradient"), ("deconvnet", "guided"), ("deconvnet", "gradient")):
        assert not np.allclose(computed[a], computed[b], atol=1e-3), (a, b)
    np.testing.assert_allclose(saliency(model, X, classes), np.abs(computed["gradient"]).max(axis=-1), atol=1e-6)


@needs_jax
def test_guided_and_deconvnet_under_jax_match_the_hand_computation():
    script = textwrap.dedent(f"""
        import json, numpy as np
        W1, W2, B1, B2 = (np.array(v, np.float32) for v in {[W1.tolist(), W2.tolist(), B1.tolist(), B2.tolist()]})
        {textwrap.indent(TINY_NETWORK, '        ').strip()}
        from allcnn.explain import deconvnet, guided_gradient
        x, classes = np.array({X.tolist()}, np.float32), np.array([1])
        print(json.dumps([guided_gradient(model, x, classes).tolist(), deconvnet(model, x, classes).tolist()]))
        """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    guided, deconvnet = json.loads(run.stdout.splitlines()[-1])
    np.testing.assert_allclose(guided, by_hand(X, 1, "guided"), atol=1e-6)
    np.testing.assert_allclose(deconvnet, by_hand(X, 1, "deconvnet"), atol=1e-6)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def test_maps_of_the_four_methods(weights, pixels):
    from allcnn.explain import explain_arrays
    from allcnn.model import load_classifier

    classifier = load_classifier(weights, precision="float32")
    guided, classes, probabilities = explain_arrays(classifier, pixels, method="guided")
    assert guided.shape == (3, 32, 32, 3) and guided.dtype == np.float32
    assert (classes == probabilities.argmax(axis=1)).all()
    plain, _, _ = explain_arrays(classifier, pixels, method="saliency")
    assert plain.shape == (3, 32, 32) and not np.allclose(np.abs(guided).max(axis=-1), plain, rtol=0.05)
    deconvnet, _, _ = explain_arrays(classifier, pixels, method="deconvnet")
    assert deconvnet.shape == guided.shape and not np.allclose(deconvnet, guided, rtol=0.05)
    cam, dogs, _ = explain_arrays(classifier, pixels, method="gradcam", class_name="dog")
    assert cam.shape == (3, 32, 32) and cam.min() >= 0 and cam.max() <= 1 and (dogs == 5).all()


def test_display_centres_a_guided_gradient_on_grey():
    from allcnn.explain import to_display

    gradient = np.zeros((4, 4, 3), np.float32)
    gradient[0, 0] = [1.0, -1.0, 0.0]
    shown = to_display(gradient)
    assert shown[1, 1].tolist() == [0.5, 0.5, 0.5] and shown[0, 0, 0] > 0.5 > shown[0, 0, 1]


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_cli_writes_a_png_per_image_and_a_grid(weights, photos, tmp_path):
    out = tmp_path / "maps"
    result = CliRunner().invoke(main, ["explain", str(photos / "a.png"), str(photos / "b.jpg"), "--weights",
                                       str(weights), "--method", "gradcam", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a.gradcam.png", "b.gradcam.png", "grid.gradcam.png"]
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in written)
    assert "a.png" in result.output and "grid: " in result.output


def test_cli_bad_images_one_line_each_others_explained(weights, photos, tmp_path):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    result = runner.invoke(main, ["explain", str(photos / "broken.jpg"), str(photos / "a.png"),
                                  str(tmp_path / "gone.png"), "--weights", str(weights), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 2 and result.stderr.count("Error: ") == 2
    assert "broken.jpg" in result.stderr and "gone.png" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "m" / "a.guided.png").is_file() and not (tmp_path / "m" / "grid.guided.png").exists()


def test_cli_unknown_class_is_one_line(weights, photos, tmp_path):
    result = CliRunner().invoke(main, ["explain", str(photos / "a.png"), "--weights", str(weights),
                                       "--class", "unicorn", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "unicorn" in result.output and "Traceback" not in result.output
    typo = CliRunner().invoke(main, ["explain", str(photos / "a.png"), "--weights", str(weights),
                                     "--class", "dgo", "--out", str(tmp_path / "m")])
    assert typo.exit_code == 2 and "did you mean dog?" in typo.output and not (tmp_path / "m").exists()


def test_same_names_do_not_overwrite(tmp_path):
    from allcnn.explain import Explanation, save_explanations

    image = np.zeros((32, 32, 3), np.uint8)
    explanations = [Explanation(path, image, "saliency", "cat", "cat", 0.5, np.zeros((32, 32), np.float32))
                    for path in ("x/cat.png", "y/cat.png", "grid.png")]
    assert [p.name for p in save_explanations(explanations, tmp_path)] == [
        "cat.saliency.png", "cat-2.saliency.png", "grid-2.saliency.png", "grid.saliency.png"]


@pytest.mark.parametrize("method, bars", [("gradcam", 1), ("saliency", 1), ("guided", 0), ("deconvnet", 0)])
def test_map_panels_have_a_colorbar_but_rgb_guided_has_none(method, bars):
    from allcnn.explain import Explanation, panels
    from allcnn.plots import panel_figure

    shape = (32, 32, 3) if method in ("guided", "deconvnet") else (32, 32)
    e = Explanation("x/cat.png", np.zeros((32, 32, 3), np.uint8), method, "cat", "cat", 0.5,
                    np.random.default_rng(0).random(shape, dtype=np.float32))
    for fig, images in ((panel_figure(panels(e), columns=2), 1), (panel_figure(panels(e) * 3, columns=4), 3)):
        colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(colorbars) == bars * images
        assert all("÷ its max" in bar.get_ylabel() for bar in colorbars)


def test_a_layer_with_its_own_activation_is_refused():
    import keras

    from allcnn.explain import ExplainError, guided_gradient

    model = keras.Sequential([keras.Input((2, 2, 2)), keras.layers.Conv2D(2, 1, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Activation("softmax")])
    with pytest.raises(ExplainError, match="own activation"):
        guided_gradient(model, X, np.array([0]))


def test_explain_figure_script_draws_a_row_per_network(weights, cifar_dir, tmp_path, capsys):
    script = load_script("explain_figure")
    out = tmp_path / "figure.png"
    script.main([str(weights), str(weights), "--data-dir", str(cifar_dir), "--index", "3", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG" and f"figure: {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as missing:
        script.main([str(tmp_path / "gone.weights.h5"), "--data-dir", str(cifar_dir), "--out", str(out)])
    assert missing.value.code == 1 and "gone.weights.h5: no such weights file" in capsys.readouterr().err
