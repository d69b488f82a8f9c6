"""The weights a run starts from (`initial_weights`): checked before the run folder is made, loaded after the data.

Kept apart from the loop: both ends are about weights files, their records and
their fit to this run's network, not about training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras

from allcnn import data
from allcnn.config import SHIPPED, TrainConfig
from allcnn.manifest import resolve_weights
from allcnn.model import base_layers, batch_norms, build_model, unfold_batch_norm
from allcnn.pipeline import CifarBatches
from allcnn.run_folder import RunError, RunFolder
from allcnn.weights_io import WeightsError, load_weights

# Training images whose conv outputs give a batch-norm run started from plain weights its statistics.
UNFOLD_IMAGES = 5000


@dataclass(frozen=True)
class StartingWeights:
    """The weights `initial_weights` (or a `teacher`) names: the file, the classes it was trained on, and its
    network (variant, batch norm) and the CIFAR validation images its run held out (`held_out`,
    a `data.held_out_record`) where its run folder or the manifest records them."""

    path: Path
    class_names: tuple[str, ...]
    variant: str | None = None
    batch_norm: bool | None = None
    held_out: dict | None = None


def held_out(config: TrainConfig) -> dict:
    """The validation images `config` holds out (`data.held_out_record`)."""
    return data.held_out_record(config.val_size, config.val_split, config.seed, config.dataset)


def starting_weights(config: TrainConfig) -> StartingWeights:
    """Resolves `initial_weights` (see `weights_source`)."""
    return weights_source(config.initial_weights, "initial_weights")


def weights_source(weights: str, key: str) -> StartingWeights:
    """Resolves the weights a recipe's `key` names: `SHIPPED` through the manifest
    (sha256-checked), a file with its run folder."""
    if weights == SHIPPED:
        try:
            spec = resolve_weights()
        except WeightsError as e:
            raise RunError(f"{key}: {e}") from None
        return StartingWeights(spec.path, spec.class_names, spec.variant, spec.architecture.get("batch_norm", False),
                               data.held_out_record(spec.val_size, spec.val_split, spec.seed))
    path = Path(weights)
    source = RunFolder(path.parent)
    trained = source.read_config() if source.has_run() else None
    return StartingWeights(path, source.read_class_names() or data.CLASS_NAMES,
                           trained.variant if trained else None, trained.batch_norm if trained else None,
                           held_out(trained) if trained and trained.dataset != "folder" else None)


def check_initial_weights(run: RunFolder, config: TrainConfig, overwrite: bool) -> None:
    """Before the run folder is made or replaced: the starting weights exist, are this
    run's network, and survive --overwrite (one inside the folder would be deleted with it)."""
    if not config.initial_weights:
        return
    check_weights_file(run, config.initial_weights, "initial_weights", overwrite)
    source = starting_weights(config)
    if config.reparam and source.batch_norm is not False:
        # Plain weights start its branches (`RepConv.start_from`); no other file records them.
        raise RunError(f"initial_weights: a reparam run starts from plain weights whose run or manifest says so "
                       f"(the shipped ones, a plain run's); {source.path} are not")
    # Some variants have the same weight shapes (paper, tutorial, convpool-cnn-c): only the record
    # tells them apart. Plain weights start a batch-norm run (see `load_initial_weights`); batch-norm
    # weights start no plain one.
    if source.variant not in (None, config.variant) or (source.batch_norm and not config.batch_norm):
        described = lambda variant, bn: f"{variant}{' (batch norm)' if bn else ''}"  # noqa: E731
        raise RunError(f"initial_weights: {source.path} are the {described(source.variant, source.batch_norm)} "
                       f"network; this run trains {described(config.variant, config.batch_norm)}")
    check_held_out(source, config)
    # A file without records: its base must fit this network (the classifier depends on the classes,
    # which the data, loaded later, tells).
    try:
        batch_norm = config.batch_norm if source.batch_norm is None else source.batch_norm
        model = build_model(config.variant, batch_norm=batch_norm)
        load_weights(model, source.path, only=base_layers(model))
    except WeightsError as e:
        raise RunError(f"initial_weights: {e}") from None


def check_weights_file(run: RunFolder, weights: str, key: str, overwrite: bool) -> None:
    """The file a recipe's `key` names (unless `SHIPPED`) exists and survives --overwrite of `run`."""
    if weights == SHIPPED:
        return
    path = Path(weights).resolve()
    if not path.is_file():
        raise RunError(f"{key}: no such weights file {weights}")
    if overwrite and run.path.resolve() in path.parents:
        raise RunError(f"{key}: {path} is inside {run}, which --overwrite would delete; copy it out first")


def check_held_out(source: StartingWeights, config: TrainConfig, key: str = "initial_weights") -> None:
    """A warm restart (or a teacher, `key`) on the same CIFAR images must validate on the images
    its weights held out: any other split holds out images they were trained on, and its
    val_accuracy (which picks the best epoch, and decides whether weights ship) would
    measure memory, not generalization."""
    layout = data.CIFAR_LAYOUTS.get(config.dataset)
    if layout is None or source.held_out is None or source.class_names != layout.class_names:
        return  # an image folder, no record, or transfer to other classes: other images
    ours = held_out(config)
    if ours != source.held_out:
        theirs, ours = (", ".join(f"{key} {value}" for key, value in split.items()) for split in (source.held_out, ours))
        raise RunError(f"{key}: {source.path} held out {theirs} for validation and were trained on every "
                       f"other image; this run's {ours} would validate on images they were trained on: train it "
                       f"with their {theirs}")


def load_initial_weights(model: keras.Model, source: StartingWeights, class_names: tuple[str, ...],
                         train_batches: CifarBatches) -> None:
    """Starts a run from earlier weights; a resumed run restores its own instead.

    Weights trained on `class_names` load whole (a warm restart); weights trained
    on other classes load into every layer but the classifier, which keeps its
    random init (transfer learning). Plain weights (the shipped ones) start a batch-norm
    run through `unfold_batch_norm`, so that the run starts equal to the plain network, its
    statistics taken on `UNFOLD_IMAGES` of `train_batches` augmented as training augments them:
    the statistics that training's batches give it, and that a weight average's refresh
    (`BatchNormRefresh`) computes for the same weights, so that its average starts equal too.
    """
    whole = tuple(source.class_names) == tuple(class_names)
    unfold = source.batch_norm is False and bool(batch_norms(model))
    target = build_model(source.variant, classes=len(class_names), input_shape=model.input_shape[1:]) if unfold else model
    try:
        load_weights(target, source.path, only=None if whole else base_layers(target))
    except WeightsError as e:
        raise RunError(f"initial_weights: {e}") from None
    if unfold:
        images = train_batches.sample(UNFOLD_IMAGES)
        unfold_batch_norm(target, model, images)
    print(f"initial weights: {source.path}: " + ("every layer" if whole else
          f"every layer but the classifier, new for {len(class_names)} classes "
          f"(trained on {len(source.class_names)} others)") +
          (f"; batch norm started from the statistics of {len(images)} training images" if unfold else ""))
