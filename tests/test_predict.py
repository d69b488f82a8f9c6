"""`allcnn predict`: image formats and modes, folders, bad files, output formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from allcnn.cli import main


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    folder = tmp_path / "images"
    folder.mkdir()
    rgb.save(folder / "a.png")
    rgb.convert("L").save(folder / "b_gray.jpg")
    rgb.convert("P").save(folder / "c_palette.gif")
    rgb.convert("RGBA").save(folder / "d_rgba.webp")
    rgb.save(folder / "e.bmp")
    rgb.convert("CMYK").save(folder / "f_cmyk.jpg")
    Image.fromarray((rng.integers(0, 65536, (40, 40))).astype(np.uint16)).save(folder / "g_16bit.png")
    return folder


def test_load_image_modes(images):
    from allcnn.images import load_image

    for path in sorted(images.iterdir()):
        array = load_image(path)
        assert array.shape == (32, 32, 3) and array.dtype == np.uint8, path


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    from allcnn.images import load_image

    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "mid.png")
    assert abs(int(load_image(tmp_path / "mid.png")[0, 0, 0]) - 128) <= 1


def test_transparent_is_white(tmp_path):
    from allcnn.images import load_image

    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()


def test_bad_files(tmp_path, monkeypatch):
    from allcnn import images
    from allcnn.images import ImageError, load_image

    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    for name, reason in [("empty.png", "empty"), ("text.png", "not an image"), ("cut.png", "unreadable"), ("none.png", "no such")]:
        with pytest.raises(ImageError, match=reason):
            load_image(tmp_path / name)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "full.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1 << 26)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "full.png")


def test_folders_expand_to_decodable_images_only(weights, images):
    from allcnn.images import expand_inputs

    (images / "notes.txt").write_text("not an image")
    (images / "best.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # Pillow names HDF5 but cannot decode it
    (images / "page.pdf").write_bytes(b"%PDF-1.4")  # Pillow writes PDF, never reads it
    assert [p.name for p in expand_inputs([images])] == sorted(p.name for p in images.iterdir()
                                                               if p.suffix not in (".txt", ".h5", ".pdf"))


def test_cli_table_and_json_lines(weights, images):
    files = sorted(images.iterdir())
    text = CliRunner().invoke(main, ["predict", str(images), "--weights", str(weights), "--batch-size", "3"])
    assert text.exit_code == 0, text.output
    assert [line.split()[0] for line in text.output.splitlines()] == [str(p) for p in files]
    lines = CliRunner().invoke(main, ["predict", str(images / "*.png"), "--weights", str(weights), "--json", "--top-k", "2"])
    rows = [json.loads(line) for line in lines.output.splitlines()]
    assert [r["path"] for r in rows] == [str(images / "a.png"), str(images / "g_16bit.png")]
    assert len(rows[0]["top"]) == 2 and rows[0]["top"][0]["probability"] >= rows[0]["top"][1]["probability"]


def test_cli_bad_files_exit_1_good_still_predicted(weights, images, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    result = runner.invoke(main, ["predict", str(tmp_path / "junk.jpg"), str(images / "a.png"), str(tmp_path / "gone.png"),
                                  "--weights", str(weights)])
    assert result.exit_code == 1
    assert result.stdout.startswith(str(images / "a.png"))
    assert "junk.jpg" in result.stderr and "gone.png" in result.stderr and "Traceback" not in result.stderr


def test_flip_tta_averages_the_image_and_its_mirror(weights, tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[:, ::-1]).save(tmp_path / "mirror.png")

    def probabilities(path, tta):
        result = CliRunner().invoke(main, ["predict", str(path), "--weights", str(weights), "--json", "--top-k", "10",
                                           "--precision", "float32", "--tta", tta])
        assert result.exit_code == 0, result.output
        return {t["class"]: t["probability"] for t in json.loads(result.output)["top"]}

    plain, mirror, both = probabilities(tmp_path / "a.png", "none"), probabilities(tmp_path / "mirror.png", "none"), \
        probabilities(tmp_path / "a.png", "flip")
    assert plain != mirror
    assert both == pytest.approx({c: (plain[c] + mirror[c]) / 2 for c in plain}, abs=2e-6)


def test_top_k_above_the_class_count_says_so(weights, images):
    result = CliRunner().invoke(main, ["predict", str(images / "a.png"), "--weights", str(weights), "--top-k", "11"])
    assert result.exit_code == 2 and "--top-k 11: the weights classify 10 classes; pass 1..10" in result.output
