"""Distillation (`teacher`): a run trains on another network's predictions instead of the labels.

A network's predictions averaged over each image and its mirror (`--tta flip`) score higher
than its own: +0.77 points on test_batch for the shipped weights. Trained on those averages as
soft targets, a network (the same one, in a "born-again" run: Furlanello et al., 2018) learns
what the average knows, and how sure it is of each image, where one-hot labels say "certain"
everywhere. The targets are the teacher's on the training images as they are, not augmented:
computed once, kept in the run folder, so that a resumed run trains on the same targets even
after the teacher's file changed (a run from the shipped weights may ship new ones).

A teacher can also be another network (`allcnn.airbench`'s teacher folder: its `teacher.keras`),
and with `teacher_augmented` it predicts each training batch as augmented, the view the student
sees ("consistent teaching", Beyer et al., 2022, "Knowledge distillation: a good teacher is
patient and consistent"): fixed targets would say "cat" for a crop that cutout has emptied.

A teacher must be better than the student, and a lone airbench teacher is not (89.6% validation
against the shipped network's 91.3%). Two networks of different families err on different images:
`write_ensemble_teacher` averages several teachers' probabilities in one `teacher.keras`, which a
recipe names as it names any teacher network; with `tta="flip"` it averages each one's on the image
and on its mirror too, so that a `teacher_augmented` run is taught by the flip averages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
from keras import ops

from allcnn.config import SHIPPED, TTA_MODES, ConfigError, TrainConfig
from allcnn.data import Dataset, load_splits
from allcnn.files import atomic_write, atomic_write_text
from allcnn.inference import Classifier
from allcnn.initial_weights import StartingWeights, check_held_out, check_weights_file, held_out, weights_source
from allcnn.manifest import resolve_weights
from allcnn.model import load_classifier
from allcnn.preprocessing import Preprocessing
from allcnn.run_folder import RunError, RunFolder
from allcnn.weights_io import WeightsError

# A teacher network of another family (`allcnn.airbench`): the whole model, with its record beside it.
KERAS_SUFFIX = ".keras"


def is_teacher_network(teacher: str) -> bool:
    """Whether a recipe's `teacher` is a teacher network's `.keras` file, not weights of ours."""
    return teacher.endswith(KERAS_SUFFIX)


def teacher_record(path: Path) -> dict:
    """The `teacher.json` beside a teacher's `.keras` file."""
    try:
        return json.loads((path.parent / "teacher.json").read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"teacher: {path} has no readable teacher.json beside it ({e}); "
                       "scripts/train_teacher.py writes both") from None


def teacher_splits(data_dir, val_size: int = 0, seed: int = 0) -> tuple[Dataset, tuple, tuple, dict]:
    """The dataset, training and validation images that `allcnn train` splits with this `--val-size`
    and `--seed`, and their `held_out` record: a teacher holds out what its students will."""
    config = TrainConfig(val_size=val_size, seed=seed).validate()
    dataset, train, val = load_splits(config, data_dir)
    config.dataset = dataset.name
    return dataset, train, val, held_out(config)


def teacher_source(teacher: str) -> StartingWeights:
    """The teacher a recipe names: weights (see `weights_source`), or a `.keras` teacher and its record."""
    if not is_teacher_network(teacher):
        return weights_source(teacher, "teacher")
    path = Path(teacher)
    record = teacher_record(path)
    return StartingWeights(path, tuple(record["class_names"]), held_out=record["held_out"])


def check_teacher(run: RunFolder, config: TrainConfig, overwrite: bool, class_names: tuple[str, ...]) -> None:
    """Before a new run's folder is made, once the data has told its classes: the teacher exists,
    predicts these classes, and did not train on this run's validation images (its predictions
    would tell the student their labels). A resumed run is not checked again: it has its targets,
    or (`teacher_augmented`) loads its teacher again."""
    if not config.teacher:
        if config.teacher_augmented:  # a recipe's teacher may be a file of this machine: given by --teacher
            raise RunError("teacher_augmented: the recipe names no teacher; give one with --teacher PATH")
        return
    check_weights_file(run, config.teacher, "teacher", overwrite)
    source = teacher_source(config.teacher)
    if tuple(source.class_names) != tuple(class_names):
        raise RunError(f"teacher: {config.teacher} predicts the classes {', '.join(source.class_names)}; "
                       f"this run trains on {', '.join(class_names)}")
    check_held_out(source, config, "teacher")
    if config.teacher_augmented and _preprocessing(config.teacher).method != config.preprocessing:
        raise RunError(f"teacher: {config.teacher} preprocesses its inputs otherwise than this run's "
                       f"{config.preprocessing}, so it cannot predict the run's augmented batches")


def _preprocessing(teacher: str) -> Preprocessing:
    """The teacher's preprocessing, read without building the network."""
    if not is_teacher_network(teacher):
        try:
            return resolve_weights(None if teacher == SHIPPED else teacher).preprocessing
        except WeightsError as e:
            raise RunError(f"teacher: {e}") from None
    return Preprocessing.load(Path(teacher).parent / "preprocessing.json")


def _fitted_alike(a: Preprocessing, b: Preprocessing) -> bool:
    """The same mean and std, to float rounding: fitted on the same training images."""
    return np.allclose(a.mean, b.mean) and np.allclose(a.std, b.std)


@keras.saving.register_keras_serializable(package="allcnn")
class Mirror(keras.layers.Layer):
    """Images (N, H, W, C) mirrored left to right: a flip-averaging ensemble's second view."""

    def call(self, inputs):
        return ops.flip(inputs, axis=2)


def load_teacher(teacher: str) -> Classifier:
    """The teacher as a float32 classifier (a `.keras` teacher in the precision it was saved in)."""
    if not is_teacher_network(teacher):
        return load_classifier(None if teacher == SHIPPED else teacher, precision="float32")
    path = Path(teacher)
    if not path.is_file():
        raise RunError(f"teacher: no such file {teacher}")
    teacher_record(path)
    return Classifier(keras.saving.load_model(path, compile=False), _preprocessing(teacher))


def augmented_teacher(config: TrainConfig, preprocessing: Preprocessing) -> Callable[[np.ndarray], np.ndarray]:
    """`teacher_augmented`'s teacher: preprocessed training batches (as augmented) to its
    probabilities. It sees the run's inputs, so it must preprocess as the run does: the same
    method (`check_teacher`), fitted on the same training images (the same held-out ones)."""
    classifier = load_teacher(config.teacher)
    theirs = classifier.preprocessing
    if not _fitted_alike(theirs, preprocessing):
        raise RunError(f"teacher: {config.teacher} was fitted on other training images (mean {theirs.mean}, "
                       f"this run's {preprocessing.mean}), so it cannot predict the run's augmented batches")
    print(f"teacher: {config.teacher} (predictions on each training batch as augmented)")
    return classifier.forward


def teacher_targets(run: RunFolder, config: TrainConfig, images: np.ndarray, classes: int,
                    write: bool = True) -> np.ndarray:
    """float32 (N, classes): the teacher's probabilities for the training `images`, from the run
    folder where an earlier session kept them (written there, if `write`, the first time)."""
    path = run.path / "teacher_targets.npy"
    if path.exists():
        targets = np.load(path)
        if targets.shape == (len(images), classes):
            return targets
    classifier = load_teacher(config.teacher)
    print(f"teacher: {config.teacher} ({'flip-averaged ' * (config.teacher_tta == 'flip')}"
          f"predictions on {len(images)} training images)")
    targets = classifier.probabilities(images, tta=config.teacher_tta)
    if write:
        with atomic_write(path, ".npy") as tmp:
            np.save(tmp, targets)
    return targets


def write_ensemble_teacher(members: list[str], out, val: tuple, *, held_out: dict, tta: str = "none") -> dict:
    """Writes the teacher folder `out`: a `teacher.keras` whose probabilities are the average of
    the `members`' (each as a recipe's `teacher` names it: `shipped`, a weights file, a teacher
    network's `.keras`), with `tta="flip"` on each image and its mirror, with its `teacher.json`
    and `preprocessing.json`; returns the record.

    The members must predict the same classes from the same preprocessed inputs (one
    `preprocessing.json` serves them all) and not have trained on the validation images `val`
    (uint8 images, int labels), which `held_out` names (a `data.held_out_record`, where a
    member's record names any); the record gives the average's accuracy on them, and counts the teacher
    networks' own training (epochs, hours) as the teacher's: weights of ours have theirs in the manifest.
    """
    if len(members) < 2:
        raise RunError(f"an ensemble teacher averages two or more networks; got {len(members)}")
    if tta not in TTA_MODES:
        raise ConfigError(f"tta {tta!r} is not one of {', '.join(TTA_MODES)}")
    for member in members:
        if member != SHIPPED and not Path(member).is_file():
            raise RunError(f"teacher: no such file {member}")
    sources = [teacher_source(member) for member in members]
    preprocessing = [_preprocessing(member) for member in members]
    for member, source, prep in zip(members[1:], sources[1:], preprocessing[1:]):
        if tuple(source.class_names) != tuple(sources[0].class_names):
            raise RunError(f"teacher: {member} predicts other classes than {members[0]}")
        if prep.method != preprocessing[0].method or not _fitted_alike(prep, preprocessing[0]):
            raise RunError(f"teacher: {member} preprocesses its inputs otherwise than {members[0]}")
    if tta == "flip" and preprocessing[0].method == "zca":  # its whitening mixes pixels across the image
        raise RunError("tta flip: the mirror of a zca-whitened image is not the whitened mirror; "
                       "the members must standardize or scale their inputs")
    for member, source in zip(members, sources):
        if source.held_out not in (None, held_out):
            raise RunError(f"teacher: {member} held out {source.held_out} for validation, not {held_out}: "
                           "it was trained on some of these validation images")
    networks = [load_teacher(member).model for member in members]
    inputs = keras.Input(networks[0].input_shape[1:])
    for index, network in enumerate(networks):
        network.name = f"member_{index}"  # unique within the ensemble: two of ours share a name
    views = [inputs, Mirror()(inputs)] if tta == "flip" else [inputs]
    outputs = keras.layers.Average(dtype="float32")([network(view) for network in networks for view in views])
    model = keras.Model(inputs, outputs, name="teacher_ensemble")
    classifier = Classifier(model, preprocessing[0])
    accuracy = lambda mode: round(float(np.mean(  # noqa: E731
        classifier.probabilities(val[0], tta=mode).argmax(axis=1) == val[1])), 4)
    trained = [teacher_record(Path(member)) for member in members if is_teacher_network(member)]
    names = iter(r["network"] for r in trained)
    averaged = " and ".join(next(names) if is_teacher_network(member) else f"All-CNN-C ({member})"
                            for member in members)
    record = {
        "network": f"average of {averaged}" + ", each on the image and its mirror" * (tta == "flip"),
        "tta": tta,
        "members": members,
        "class_names": list(sources[0].class_names),
        "held_out": held_out,
        "epochs": sum(r["epochs"] for r in trained),
        "train_seconds": sum(r["train_seconds"] for r in trained),
        "val_accuracy": accuracy("none"),
        # Flipped again, a flip-averaged ensemble predicts the same.
        "val_accuracy_tta": accuracy("flip") if tta == "none" else None,
        # Each member computes as it was saved (`load_teacher`): a teacher network trained in bf16 stays so.
        "precision": ", ".join(sorted({layer.dtype_policy.name for network in networks
                                       for layer in network.layers if layer.weights})),
        "machine": ", ".join(sorted({r["machine"] for r in trained})),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocessing[0].save(out / "preprocessing.json")
    with atomic_write(out / "teacher.keras", ".keras") as tmp:
        model.save(tmp)
    atomic_write_text(out / "teacher.json", json.dumps(record, indent=2) + "\n")
    return record
