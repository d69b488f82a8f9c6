"""Image grids: `predict --plot` and `evaluate --plot-samples`."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from allcnn.cli import main


def _is_png(path) -> bool:
    return path.read_bytes()[:4] == b"\x89PNG"


def test_predict_plot_draws_the_classified_images(weights, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.png").write_text("not an image")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "a.png"), str(tmp_path / "bad.png"),
                                       str(tmp_path / "b.jpg"), "--weights", str(weights),
                                       "--plot", str(tmp_path / "out" / "grid.png")])
    assert result.exit_code == 1 and f"grid: {tmp_path / 'out' / 'grid.png'}" in result.output
    assert _is_png(tmp_path / "out" / "grid.png")


def test_evaluate_plot_samples_marks_the_misclassified(weights, cifar_dir, tmp_path, monkeypatch):
    from allcnn import evaluation

    drawn = {}
    original = evaluation.plot_labelled_images

    def spy(images, captions, path, **kwargs):
        drawn.update(images=images, captions=captions, **kwargs)
        original(images, captions, path, **kwargs)

    monkeypatch.setattr(evaluation, "plot_labelled_images", spy)
    out = tmp_path / "samples.png"
    result = CliRunner().invoke(main, ["evaluate", "--weights", str(weights), "--data-dir", str(cifar_dir),
                                       "--plot-samples", "12", "--samples-out", str(out), "--precision", "float32"])
    assert result.exit_code == 0, result.output
    assert _is_png(out) and f"samples: {out}" in result.output
    assert len(drawn["images"]) == 12 and drawn["images"].dtype == np.uint8
    wrong = [caption.split()[0] != caption.split("true: ")[1] for caption in drawn["captions"]]
    assert drawn["colors"] == ["red" if w else "black" for w in wrong]
    assert f"{sum(wrong)} of 12 misclassified" in drawn["title"]


def test_a_grid_says_when_it_shows_only_the_first_images(tmp_path, monkeypatch):
    from allcnn import plots

    titles = []
    monkeypatch.setattr(plots, "plot_panels", lambda panels, path, columns, title=None: titles.append(
        (len(panels), columns, title)))
    images = np.zeros((70, 32, 32, 3), np.uint8)
    plots.plot_labelled_images(images, ["x"] * 70, tmp_path / "g.png", total=100)
    assert titles == [(plots.GRID_LIMIT, 8, f"the first {plots.GRID_LIMIT} of 100 images")]
