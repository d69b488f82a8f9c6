"""scripts/jpeg_gap.py: a network's accuracy on exact test images as they are and as JPEGs."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from allcnn.data import load_dataset
from allcnn.model import load_classifier
from conftest import SCRIPTS, load_script


def test_jpeg_changes_images_less_the_higher_the_quality():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    low, high = (np.abs(load_script("jpeg_gap").jpeg(images, q).astype(int) - images).mean() for q in (10, 95))
    assert 0 < high < low


def test_jpeg_gap_scores_the_exact_images_their_jpegs_and_the_rest(weights, cifar_dir):
    classifier = load_classifier(weights, precision="float32")
    images, labels = load_dataset("cifar10", cifar_dir).test
    accuracy = lambda x, y: float(np.mean(classifier.probabilities(x).argmax(axis=1) == y))  # noqa: E731
    script = load_script("jpeg_gap")
    rows = script.jpeg_gap(classifier, images, labels, exact=10, quality=50)
    assert [what.split(" as ")[0] for what, _ in rows] == ["images 0..9", "images 0..9", "images 10..39"]
    assert [top1 for _, top1 in rows] == pytest.approx([
        accuracy(images[:10], labels[:10]), accuracy(script.jpeg(images[:10], 50), labels[:10]),
        accuracy(images[10:], labels[10:])])
    assert float(re.search(r"difference\| ([0-9.]+) grey", rows[1][0]).group(1)) > 0


def test_jpeg_gap_without_data_is_one_line(weights, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "jpeg_gap.py"), str(weights), "--data-dir",
                             str(tmp_path / "none")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cifar-10-batches-py" in errors[0]
