"""Turns a finished run into the shipped weights: weights/allcnn-c.weights.h5 + manifest.

Saves the best weights without optimizer state, evaluates them with the code
of `allcnn evaluate` (full test set, and test images 0..999, which are
exact CIFAR-10 pixels in ../shared/data), and records how they were produced.
A run started with `initial_weights` (a warm restart) is shipped with the runs it
started from: one history (epochs numbered on), the total time, every recipe; if
an earlier stage's best epoch scored higher on validation, that stage is shipped.
Weights are only replaced by better ones: a run whose best validation accuracy does
not beat that of the weights shipped now (same held-out split) is refused.
A run started from the shipped weights themselves (`initial_weights = "shipped"`, the same
classes: a new cycle on the one thing that survives between our machines) is shipped as one
more stage of them: their history, recipes and stage configs come first.
A run trained with batch norm ships folded (`allcnn.model.fold_batch_norm`): the plain
All-CNN-C, checked to give the batch-norm network's probabilities on 1,000 test images.

    python scripts/ship_weights.py RUN_DIR [--data-dir ../shared/data]
"""

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from allcnn import hardware
from allcnn.config import EXECUTION_KEYS, SHIPPED, TrainConfig, load_config
from allcnn.data import CLASS_NAMES, DataError, held_out_record, load_cifar10, recorded_split
from allcnn.evaluation import metrics
from allcnn.files import atomic_write, atomic_write_csv, atomic_write_text
from allcnn.inference import Classifier
from allcnn.model import build_model, load_classifier
from allcnn.plots import plot_history
from allcnn.resources import configs_dir
from allcnn.run_folder import MACHINE_FIELDS, RunError, RunFolder, best_val_accuracy
from allcnn.teacher import is_teacher_network, teacher_record
from allcnn.manifest import manifest_entry, resolve_weights, write_manifest_entry
from allcnn.weights_io import WeightsError, load_weights

NAME = "allcnn-c"
# The recipes of one schedule from a random init, and the command that trains each.
ONE_SCHEDULE_RECIPES = {
    **{f"configs/{recipe}.toml": f"scripts/train_release.sh DATA_DIR RUN_DIR {recipe}"
       for recipe in ("release-bn", "release-bn-long", "release-bn-rep", "release-v3", "release-v2")},
    "configs/release-gpu.toml": "scripts/gpu_train.sh train release-gpu SECONDS (on a GPU machine, from "
                                "scripts/gpu_bundle.sh's parts; README 'Training on a borrowed GPU')",
}
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
# How far the folded network's float32 probabilities may lie from the batch-norm network's.
FOLD_TOLERANCE = 1e-5
FOLDED = "batch norm during training, folded into the convolutions (the shipped network has none)"
REPARAM_FOLDED = ("batch norm and RepVGG's branches (a 1x1 conv and the identity beside each conv) during "
                  "training, folded into the convolutions (the shipped network has neither)")


def machines_of(run: Path) -> list[dict]:
    """Which machines trained which epochs of `run`: its sessions.csv; for a run made before
    sessions were recorded, summary.json's device, or this machine's while it still trains here."""
    folder = RunFolder(run)
    epochs = folder.restored_epoch()
    recorded = folder.machines(epochs)
    if recorded:
        return recorded
    summary = folder.read_summary(*MACHINE_FIELDS)
    if summary is None:
        import keras

        summary = {"device": hardware.describe(None), "backend": keras.backend.backend(),
                   "precision": hardware.resolve_precision(folder.read_config().precision, None)[0]}
    return [{key: summary[key] for key in MACHINE_FIELDS} | {"first_epoch": 1, "last_epoch": epochs}]


def describe_machines(machines: list[dict]) -> dict:
    """The manifest's hardware, precision and backend; with the epochs of each where several machines trained."""
    def joined(key: str) -> str:
        return "; ".join(dict.fromkeys(machine[key] for machine in machines))

    hardware_text = (joined("device") if len(machines) == 1 else "; ".join(
        f"{m['device']} (epochs {m['first_epoch']}-{m['last_epoch']})" for m in machines))
    return {"hardware": hardware_text, "precision": joined("precision"), "backend": joined("backend")}


def stage_joined(earlier: str, latest: str) -> str:
    """The hardware (or precision) of every stage, oldest first: a stage like the one before adds nothing."""
    if not earlier or earlier.rsplit("; then ", 1)[-1] == latest:
        return earlier or latest
    return f"{earlier}; then {latest}"


def stages(run: Path) -> list[Path]:
    """The run and, for a warm restart, the runs it started from, oldest first."""
    runs = [run]
    while True:
        first = RunFolder(runs[0])
        if not first.has_run():
            sys.exit(f"error: {runs[0]} is not a run folder (no config.toml)")
        initial = first.read_config().initial_weights
        if initial in ("", SHIPPED):  # a random init, or transfer from weights that are not a stage of ours
            return runs
        runs.insert(0, Path(initial).parent)


def recipe_of(run: Path, config: TrainConfig) -> str:
    """The file in configs/ that run was trained with: the one whose settings it
    has (the starting weights and teacher aside), so the manifest names stages by content."""
    # How the run executed (data workers, steps per execution, device) is no part of its recipe.
    kept = {key: getattr(config, key) for key in ("initial_weights", "teacher", *EXECUTION_KEYS)}
    for path in sorted(configs_dir().glob("release*.toml")):
        recipe = load_config(path, **kept)
        if recipe.dataset == "auto":  # a run records the dataset `auto` resolved to
            recipe = replace(recipe, dataset=config.dataset)
        if recorded_split(recipe.val_size, recipe.val_split) == recorded_split(config.val_size, config.val_split):
            recipe = replace(recipe, val_size=config.val_size)  # a run may record CIFAR's default count
        if recipe == config:
            return f"configs/{path.name}"
    sys.exit(f"error: no configs/release*.toml has the settings of {RunFolder(run).config_path}")


def completed_epochs(run: Path) -> tuple[int, int]:
    """Epochs the backup holds and complete rows history.csv has: they differ
    while an epoch is being written, or where a run was stopped just then."""
    folder = RunFolder(run)
    return folder.restored_epoch(), len(folder.read_history())


def time_to(rows: list[dict], val_accuracy: float) -> tuple[float | None, int | None]:
    """Training hours and epochs until the first epoch that reached `val_accuracy` (None if none did)."""
    seconds = 0.0
    for epoch, row in enumerate(rows, 1):
        seconds += float(row["epoch_seconds"])
        if float(row["val_accuracy"]) >= val_accuracy:
            return round(seconds / 3600, 2), epoch
    return None, None


def shipped_stages(runs: list[Path], histories: list[list[dict]]) -> list[Path]:
    """The stages up to the one whose best epoch scores highest on validation:
    a later stage that never beats an earlier one is not shipped."""
    best = max(range(len(runs)), key=lambda stage: best_val_accuracy(histories[stage], -1.0))
    if not histories[best]:
        sys.exit(f"error: no completed epoch in {', '.join(map(str, runs))}")
    for run, rows in zip(runs[best + 1:], histories[best + 1:]):
        reason = f"its best val_accuracy {best_val_accuracy(rows):.4f} does not beat" if rows else "no completed epoch yet; best is"
        print(f"not shipping {run}: {reason} {best_val_accuracy(histories[best], -1.0):.4f} of {runs[best]}", file=sys.stderr)
    return runs[:best + 1]


@dataclass
class Before:
    """The shipped stages a run went on from: their history rows, recipes, configs and hardware."""

    history: list[dict] = field(default_factory=list)
    recipes: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    planned_epochs: int = 0
    hardware: str = ""
    precision: str = ""


def shipped_before(run: Path, config: TrainConfig) -> Before:
    """What the shipped weights were, when `run` went on from them (empty for any other start)."""
    if config.initial_weights != SHIPPED:
        return Before()
    try:
        shipped = manifest_entry(NAME, WEIGHTS)
    except WeightsError:
        return Before()
    if tuple(shipped.get("classes", CLASS_NAMES)) != (RunFolder(run).read_class_names() or CLASS_NAMES):
        return Before()  # transfer to other classes: a new network, not a stage
    produced = shipped["produced"]
    recipes = produced["recipe"] if isinstance(produced["recipe"], list) else [produced["recipe"]]
    stage_files = sorted(WEIGHTS.glob(f"{NAME}.stage*.config.toml"), key=lambda path: int(path.name.split(".")[1][5:]))
    with open(WEIGHTS / f"{NAME}.history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    return Before(history, recipes, [path.read_text() for path in [*stage_files, WEIGHTS / f"{NAME}.config.toml"]],
                  int(produced["planned_epochs"]), produced["hardware"], produced["precision"])


def joined_history(histories: list[list[dict]]) -> list[dict]:
    """The stages' completed epochs as one history, numbered on from one stage to the next."""
    return [row | {"epoch": str(epoch)} for epoch, row in enumerate(row for rows in histories for row in rows)]


def check_beats_shipped(val_top1: float, config: TrainConfig, next_stage: bool) -> None:
    """Refuses weights that score no higher on validation than the shipped ones,
    compared on the same held-out images (the same val_size and seed), and a `next_stage` of
    the shipped weights that held out others (`allcnn train` refuses to start one)."""
    try:
        shipped = manifest_entry(NAME, WEIGHTS)
    except WeightsError:  # nothing shipped yet
        return
    same_split = (held_out_record(shipped.get("val_size", 0), shipped.get("val_split", 0.0), shipped.get("seed")) ==
                  held_out_record(config.val_size, config.val_split, config.seed, config.dataset))
    if not same_split and next_stage:
        sys.exit("error: not shipping: the run went on from the shipped weights but validated on other images than "
                 "they held out, images they were trained on, so its val_accuracy measures nothing; "
                 f"{WEIGHTS} is unchanged")
    shipped_val = shipped.get("accuracy", {}).get("val_top1")
    if same_split and shipped_val is not None and val_top1 <= shipped_val:
        sys.exit(f"error: not shipping: best val_accuracy {val_top1:.4f} does not beat {shipped_val:.4f} of the "
                 f"weights shipped now; {WEIGHTS} is unchanged")


def load_best(run: Path):
    """The run's best weights, refused while the run is between epochs (the file
    could then be newer than the history that describes it)."""
    best = RunFolder(run).best_weights
    if not best.is_file():
        sys.exit(f"error: {run} has no {best.name}")
    before = completed_epochs(run)
    classifier = load_classifier(best, precision="float32")
    if before[0] != before[1] or completed_epochs(run) != before:
        sys.exit(f"error: {run} is between epochs (history.csv and its backup disagree): wait for the epoch "
                 "to end, or resume a stopped run, then ship")
    return classifier


def check_fold(run: Path, folded: Classifier, images: np.ndarray) -> float:
    """The largest difference between the folded network's float32 probabilities on `images`
    and those of the batch-norm network it was folded from; exits above `FOLD_TOLERANCE`."""
    spec = resolve_weights(RunFolder(run).best_weights)  # the network the run trained, from its config
    with hardware.dtype_policy("float32"):
        normed = build_model(spec.variant, **spec.architecture)
    load_weights(normed, spec.path)
    expected = Classifier(normed, folded.preprocessing, precision="float32").probabilities(images)
    difference = float(np.abs(folded.probabilities(images) - expected).max())
    if difference > FOLD_TOLERANCE:
        sys.exit(f"error: not shipping: the folded network's probabilities differ from the batch-norm "
                 f"network's by {difference:.2e} (> {FOLD_TOLERANCE:g}); {WEIGHTS} is unchanged")
    return difference


def teacher_summary(teacher: str) -> dict:
    """A teacher network's record (`teacher.json`), for the manifest: its hours are part of the
    stage's, beside `train_hours` (All-CNN-C's own)."""
    record = teacher_record(Path(teacher))
    return {"network": record["network"], "epochs": record["epochs"],
            "train_hours": round(record["train_seconds"] / 3600, 2), "val_top1": record["val_accuracy"],
            "machine": record["machine"]}


def ship(last_stage: Path, data_dir: str) -> dict:
    """Ships `last_stage` (or the earlier stage that scored best) into weights/; returns its manifest entry."""
    # Everything that can fail comes before the first file in weights/ is replaced.
    runs = stages(last_stage)
    folders = [RunFolder(run) for run in runs]
    histories = [folder.read_history(folder.restored_epoch()) for folder in folders]
    runs = shipped_stages(runs, histories)
    configs = [folder.read_config() for folder in folders[:len(runs)]]
    before = shipped_before(runs[0], configs[0])
    history = joined_history([before.history, *histories[:len(runs)]])
    recipes = before.recipes + [recipe_of(run, config) for run, config in zip(runs, configs)]
    shipped = runs[-1]
    _, (x_test, y_test) = load_cifar10(data_dir)
    # The last stage's best epoch: the one whose weights ship, at the tail of the joined history.
    best = max(history[-len(histories[len(runs) - 1]):], key=lambda row: float(row["val_accuracy"]))
    check_beats_shipped(float(best["val_accuracy"]), configs[-1], next_stage=bool(before.history))
    one_schedule = len(recipes) == 1 and recipes[0] in ONE_SCHEDULE_RECIPES
    command = (ONE_SCHEDULE_RECIPES[recipes[0]] if one_schedule else
               "allcnn train --config RECIPE, each stage with --initial-weights PREVIOUS_STAGE/last.weights.h5 "
               "(or best.weights.h5: each stage's config names its file)")
    hours_to_90, epochs_to_90 = time_to(history, 0.90)
    produced = {"recipe": recipes if len(recipes) > 1 else recipes[0],
                "command": command,
                "epochs_trained": len(history),
                "planned_epochs": before.planned_epochs + sum(config.epochs for config in configs),
                "best_epoch": int(best["epoch"]) + 1,
                "train_hours": round(sum(float(r["epoch_seconds"]) for r in history) / 3600, 2),
                "hours_to_90_val": hours_to_90,
                "epochs_to_90_val": epochs_to_90,
                **describe_machines(machines_of(shipped))}
    for key in ("hardware", "precision"):
        produced[key] = stage_joined(getattr(before, key), produced[key])
    teachers = [teacher_summary(config.teacher) for config in configs if is_teacher_network(config.teacher)]
    if teachers:
        produced["teachers"] = teachers

    target = WEIGHTS / f"{NAME}.weights.h5"
    with atomic_write(target, suffix=".weights.h5") as pending:
        load_best(shipped).model.save_weights(pending, overwrite=True)  # weights only: no optimizer state
        # The file to ship, through evaluate's own code: one pass over the test set,
        # whose first 1,000 images (exact CIFAR-10 pixels) are scored again alone.
        classifier = load_classifier(pending, variant=configs[-1].variant,
                                     preprocessing_json=RunFolder(shipped).preprocessing_path, precision="float32")
        probabilities = classifier.probabilities(x_test)
        if configs[-1].batch_norm:
            produced["training"] = REPARAM_FOLDED if configs[-1].reparam else FOLDED
            produced["fold_max_difference"] = check_fold(shipped, classifier, x_test[:1000])
    full = metrics(probabilities, y_test, CLASS_NAMES)
    exact = metrics(probabilities[:1000], y_test[:1000], CLASS_NAMES)
    accuracy = {"test_top1": full["top1"], "test_top5": full["top5"], "test_loss": full["loss"],
                "test_0_999_top1": exact["top1"], "val_top1": float(best["val_accuracy"]),
                "measured_with": "allcnn evaluate's code (Classifier + metrics), float32, ../shared/data test_batch"}
    produced["evaluated_on"] = classifier.device
    entry = write_manifest_entry(target, shipped, name=NAME, accuracy=accuracy, produced=produced,
                                 batch_norm=False)  # folded, if the run had any

    atomic_write_text(WEIGHTS / f"{NAME}.config.toml", RunFolder(shipped).config_path.read_text())
    earlier = before.configs + [RunFolder(run).config_path.read_text() for run in runs[:-1]]
    stage_configs = {WEIGHTS / f"{NAME}.stage{number}.config.toml": text for number, text in enumerate(earlier, 1)}
    for path, text in stage_configs.items():
        atomic_write_text(path, text)
    for stale in set(WEIGHTS.glob(f"{NAME}.stage*.config.toml")) - set(stage_configs):
        stale.unlink()
    # Stages shipped before may have logged other columns: every column of any stage, blank where absent.
    atomic_write_csv(WEIGHTS / f"{NAME}.history.csv", history)
    plot_history(history, WEIGHTS / f"{NAME}.curves.png")
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    try:
        entry = ship(args.run, args.data_dir)
    except (DataError, RunError) as e:  # a wrong --data-dir, a damaged run folder
        sys.exit(f"error: {e}")
    json.dump(entry["accuracy"] | {"produced": entry["produced"]}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
