"""Distillation (`teacher`): a run trains on another network's predictions instead of the labels.

A network's predictions averaged over each image and its mirror (`--tta flip`) score higher
than its own: +0.77 points on test_batch for the shipped weights. Trained on those averages as
soft targets, a network (the same one, in a "born-again" run: Furlanello et al., 2018) learns
what the average knows, and how sure it is of each image, where one-hot labels say "certain"
everywhere. The targets are the teacher's on the training images as they are, not augmented:
computed once, kept in the run folder, so that a resumed run trains on the same targets even
after the teacher's file changed (a run from the shipped weights may ship new ones).
"""

from __future__ import annotations

import numpy as np

from allcnn.config import SHIPPED, TrainConfig
from allcnn.files import atomic_write
from allcnn.initial_weights import check_held_out, check_weights_file, weights_source
from allcnn.model import load_classifier
from allcnn.run_folder import RunError, RunFolder


def check_teacher(run: RunFolder, config: TrainConfig, overwrite: bool, class_names: tuple[str, ...]) -> None:
    """Before a new run's folder is made, once the data has told its classes: the teacher exists,
    predicts these classes, and did not train on this run's validation images (its predictions
    would tell the student their labels). A resumed run has its targets and needs no teacher."""
    if not config.teacher:
        return
    check_weights_file(run, config.teacher, "teacher", overwrite)
    source = weights_source(config.teacher, "teacher")
    if tuple(source.class_names) != tuple(class_names):
        raise RunError(f"teacher: {config.teacher} predicts the classes {', '.join(source.class_names)}; "
                       f"this run trains on {', '.join(class_names)}")
    check_held_out(source, config, "teacher")


def teacher_targets(run: RunFolder, config: TrainConfig, images: np.ndarray, classes: int,
                    write: bool = True) -> np.ndarray:
    """float32 (N, classes): the teacher's probabilities for the training `images`, from the run
    folder where an earlier session kept them (written there, if `write`, the first time)."""
    path = run.path / "teacher_targets.npy"
    if path.exists():
        targets = np.load(path)
        if targets.shape == (len(images), classes):
            return targets
    classifier = load_classifier(None if config.teacher == SHIPPED else config.teacher, precision="float32")
    print(f"teacher: {classifier.spec.path} ({'flip-averaged ' * (config.teacher_tta == 'flip')}"
          f"predictions on {len(images)} training images)")
    targets = classifier.probabilities(images, tta=config.teacher_tta)
    if write:
        with atomic_write(path, ".npy") as tmp:
            np.save(tmp, targets)
    return targets
