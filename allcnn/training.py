"""`allcnn train`: SGD-Nesterov training of All-CNN-C into a run folder.

A run folder holds everything a user looks for afterwards (see `RUN_FILES`)
and can be resumed exactly after any interruption, kill -9 included.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import keras
from keras import ops

from allcnn import data, distribute, hardware
from allcnn.config import TrainConfig
from allcnn.distribute import Replicas, WorkerLost, is_worker_loss
from allcnn.errors import AllcnnError
from allcnn.files import atomic_save_weights, atomic_write_text
from allcnn.model import build_model
from allcnn.pipeline import CifarBatches, EpochSeeder
from allcnn.preprocessing import Preprocessing, fit_preprocessing

BACKUP = "backup"
DISTRIBUTION = "distribution.json"
VAL_BATCH = 500
RUN_FILES = (
    "config.toml",
    "history.csv",
    "preprocessing.json",
    "best.weights.h5",
    "last.weights.h5",
    "curves.png",
    "summary.json",
    DISTRIBUTION,
)


class RunError(AllcnnError, RuntimeError):
    """The run folder is not in a state that allows what was asked."""


def read_run_json(path: Path, *keys: str) -> dict:
    """A JSON file the run folder keeps, checked for `keys`, so a damaged one fails in one line."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e}); the run folder is damaged") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)}; the run folder is damaged")
    return data


@keras.saving.register_keras_serializable("allcnn")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The lr per step: linear warm-up, then `step`, `cosine`, `onecycle` or `constant`.

    `step` multiplies by `decay_factor` at each epoch in `milestones` (the
    paper's x0.1 at 200, 250, 300); `cosine` anneals to 0 at the last step;
    `onecycle` rises linearly for the warm-up (30% of the run if none is
    given) and falls linearly to 0. `time_decay` is Keras 2's `decay`:
    lr / (1 + time_decay * step).
    """

    def __init__(self, lr, steps_per_epoch, epochs, schedule="step", warmup_epochs=0,
                 milestones=(), decay_factor=0.1, time_decay=0.0):
        self.lr, self.steps_per_epoch, self.epochs = lr, steps_per_epoch, epochs
        self.schedule, self.warmup_epochs = schedule, warmup_epochs
        self.milestones, self.decay_factor, self.time_decay = list(milestones), decay_factor, time_decay

    def __call__(self, step):
        step = ops.cast(step, "float32")
        total = float(self.epochs * self.steps_per_epoch)
        warmup = float(self.warmup_epochs * self.steps_per_epoch)
        if self.schedule == "onecycle" and not warmup:
            warmup = 0.3 * total
        progress = ops.clip((step - warmup) / max(total - warmup, 1.0), 0.0, 1.0)
        if self.schedule == "step":
            epoch = ops.floor(step / self.steps_per_epoch)
            passed = sum(ops.cast(epoch >= m, "float32") for m in self.milestones)
            factor = ops.power(self.decay_factor, passed)
        elif self.schedule == "cosine":
            factor = 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.schedule == "onecycle":
            factor = 1.0 - progress
        else:
            factor = ops.ones_like(step)
        if warmup:
            factor = factor * ops.minimum(1.0, (step + 1.0) / warmup)
        return self.lr * factor / (1.0 + self.time_decay * step)

    def get_config(self):
        return {"lr": self.lr, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
                "schedule": self.schedule, "warmup_epochs": self.warmup_epochs,
                "milestones": self.milestones, "decay_factor": self.decay_factor,
                "time_decay": self.time_decay}


class EpochStats(keras.callbacks.Callback):
    """Adds the epoch's learning rate and wall time to the logs (so to history.csv)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._lr = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["lr"] = self._lr
        logs["epoch_seconds"] = time.perf_counter() - self._start


class CurvesPlotter(keras.callbacks.Callback):
    """Redraws curves.png from history.csv after each epoch, so a running run shows its progress."""

    def __init__(self, run: Path):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        from allcnn.plots import plot_history

        # Read only: CSVLogger keeps history.csv open for appending.
        plot_history(read_history(self.run / "history.csv", epoch + 1), self.run / "curves.png")


class NanStop(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that stops at once (`raise_error`) and remembers it fired.

    Stopping gracefully would still end the epoch: its callbacks would save the
    NaN weights as last.weights.h5 and mark the epoch done in the backup, so
    `--resume` would go on from them. Raising keeps both at the last good epoch.
    """

    fired = False

    def __init__(self):
        super().__init__(raise_error=True)

    def on_batch_end(self, batch, logs=None):
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError:
            self.fired = True
            raise


class SwapEMAWeights(keras.callbacks.SwapEMAWeights):
    """Keras' SwapEMAWeights(swap_on_epoch=True), made to survive a resume.

    With swap_on_epoch the averaged weights are in the model at each epoch end, so
    validation, both checkpoints and the backup see them (the optimizer's average
    slots then hold the trained weights), and the next epoch swaps back. A run
    restored from that backup therefore starts swapped, which Keras' callback
    never expects: it would train on from the average. `resumed` tells it.
    """

    def __init__(self, resumed: bool):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed


class AtomicCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint whose weight files are replaced atomically."""

    def _save_model(self, epoch, batch, logs):
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            atomic_save_weights(self.model, filepath)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose epoch marker names the weights it goes with.

    Keras writes `latest.weights.h5` and the marker in place, so a kill mid-write
    leaves a truncated file, and one between the two writes pairs epoch k's marker
    with epoch k+1's weights (and optimizer step). Here each epoch's weights land
    by rename under their own name, then the marker, naming them, lands the same
    way; the previous epoch's file goes only after that. A marker without a name
    (an older backup) means `latest.weights.h5`, as in Keras.
    """

    def _load_model(self):
        marker = Path(self._training_metadata_path)
        if marker.exists():
            named = read_run_json(marker, "epoch").get("weights")
            self._weights_path = str(marker.parent / named) if named else self._weights_path
        super()._load_model()

    def _save_model(self):
        backup = Path(self._training_metadata_path).parent
        name = f"epoch-{self._current_epoch}.weights.h5"
        atomic_save_weights(self.model, backup / name)
        atomic_write_text(self._training_metadata_path,
                          json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name}))
        for old in [*backup.glob("epoch-*.weights.h5"), backup / "latest.weights.h5"]:
            if old.name != name and old.exists():
                old.unlink()


class RestoreOnly(AtomicBackupAndRestore):
    """For processes other than 0: restore the backup on resume, never write it."""

    def _save_model(self):
        pass


def tensorboard(logdir: Path) -> list[keras.callbacks.Callback]:
    """Keras' TensorBoard callback writes through TensorFlow; skip it where there is none (JAX-only GPU hosts)."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        print("note: TensorFlow is not installed, so no TensorBoard logs are written")
        return []
    return [keras.callbacks.TensorBoard(str(logdir))]


def restored_epoch(run: Path) -> int:
    """How many epochs the backup in `run` holds (0 when there is none)."""
    marker = run / BACKUP / "training_metadata.json"
    return read_run_json(marker, "epoch")["epoch"] if marker.exists() else 0


def _history_rows(path: Path, epochs: int) -> tuple[str, list[str], list[dict]]:
    """The header, then one complete line and row for each of the first `epochs` epochs."""
    if not path.exists():
        return "", [], []
    header, *lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")] or [""]
    kept_lines, kept = [], []
    for line, row in zip(lines, csv.DictReader(io.StringIO(header + "".join(lines)))):
        if int(row["epoch"]) == len(kept) < epochs:
            kept_lines.append(line)
            kept.append(row)
    return header, kept_lines, kept


def read_history(path: Path, epochs: int) -> list[dict]:
    """history.csv's rows for the first `epochs` epochs, without touching the file."""
    return _history_rows(path, epochs)[2]


def trim_history(path: Path, epochs: int) -> list[dict]:
    """Rewrites history.csv to one complete row for each of the first `epochs` epochs.

    An interrupted run may have logged an epoch whose backup never landed, or
    a partial last line; without trimming, the resumed run duplicates it.
    """
    header, lines, rows = _history_rows(path, epochs)
    if path.exists():
        atomic_write_text(path, header + "".join(lines) if rows else "")
    return rows


def read_run_config(out: Path, config: TrainConfig | None, resume: bool, device: str | None) -> TrainConfig:
    """The run's config: the one given, or for `resume` the one in the run folder,
    on `device` if given (a run may move, e.g. from a GPU to a CPU)."""
    from allcnn.config import load_config

    if not resume:
        return config
    if not (out / "config.toml").exists():
        raise RunError(f"--resume: no run in {out} (no config.toml); start one without --resume")
    return load_config(out / "config.toml", device=device)


def check_initial_weights(out: Path, config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Before the run folder is made or replaced: the starting weights exist and
    survive --overwrite (one inside the folder would be deleted with it)."""
    if resume or not config.initial_weights:
        return
    path = Path(config.initial_weights).resolve()
    if not path.is_file():
        raise RunError(f"initial_weights: no such weights file {config.initial_weights}")
    if overwrite and out.resolve() in path.parents:
        raise RunError(f"initial_weights: {path} is inside {out}, which --overwrite would delete; copy it out first")


def prepare_run(out: Path, config: TrainConfig, resume: bool, overwrite: bool, layout: dict) -> None:
    """Creates, reuses or refuses the run folder (process 0 only).

    `layout` is how this session runs (replicas, global batch, lr); a run is
    only resumed on as many replicas as it started with, so that it follows
    the same global batches.
    """
    if resume:
        path = out / DISTRIBUTION
        started = read_run_json(path, "replicas", "global_batch_size") if path.exists() else None
        if started and started["replicas"] != layout["replicas"]:
            raise RunError(f"{out} was started on {started['replicas']} replicas (global batch "
                           f"{started['global_batch_size']}); resume it on as many, not {layout['replicas']}")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"{out} already holds a run; use --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    note = (f"# {layout['mode']} on {layout['replicas']} replica(s): global batch {layout['global_batch_size']}, "
            f"lr {layout['lr']:g} ({config.lr_scaling} lr scaling)\n")
    atomic_write_text(out / "config.toml", config.to_toml() + note)
    atomic_write_text(out / DISTRIBUTION, json.dumps(layout, indent=2))


def run_layout(config: TrainConfig, replicas: Replicas) -> dict:
    """Global batch and lr for these replicas: batch_size is per replica."""
    scale = replicas.count if config.lr_scaling == "linear" else 1
    return {"mode": replicas.mode, "replicas": replicas.count, "processes": replicas.processes,
            "devices": replicas.devices, "global_batch_size": config.batch_size * replicas.count,
            "lr": config.lr * scale}


def load_splits(config: TrainConfig, data_dir) -> tuple[tuple, tuple, tuple]:
    """Train, validation and test splits of CIFAR-10 (uint8 images, int labels)."""
    (x, y), test = data.load_cifar10(data_dir)
    train, val = data.train_val_split(x, y, config.val_size, config.seed)
    return train, val, test


def _configure(config: TrainConfig):
    """Seeds, device and precision: must happen before the model is built."""
    keras.utils.set_random_seed(config.seed)
    gpu = hardware.select_device(config.device)
    if keras.backend.backend() == "tensorflow" and gpu is None:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    policy, reason = hardware.resolve_precision(config.precision, gpu)
    keras.config.set_dtype_policy(policy)
    print(f"device: {hardware.describe(gpu)} ({keras.backend.backend()} backend)")
    print(f"precision: {policy} ({reason})")
    return gpu, policy


def compile_model(config: TrainConfig, steps_per_epoch: int, lr: float | None = None) -> keras.Model:
    """The model with its optimizer; `lr` overrides the config's (scaled for data parallelism)."""
    model = build_model(
        config.variant,
        input_dropout=config.input_dropout,
        dropout=config.dropout,
        weight_decay=config.weight_decay,
        kernel_initializer=config.kernel_initializer,
        batch_norm=config.batch_norm,
        seed=config.seed,
    )
    schedule = LearningRate(config.lr if lr is None else lr, steps_per_epoch, config.epochs, config.schedule,
                            config.warmup_epochs, config.milestones, config.lr_decay_factor, config.time_decay)
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum, nesterov=config.nesterov,
                                     use_ema=config.use_ema, ema_momentum=config.ema_momentum)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def load_initial_weights(model: keras.Model, path: Path) -> None:
    """Starts a run from earlier weights; a resumed run restores its own instead."""
    from allcnn.weights_io import WeightsError, load_weights

    try:
        load_weights(model, path)
    except WeightsError as e:
        raise RunError(f"initial_weights: {e}") from None


def train(config: TrainConfig | None, out, *, data_dir=None, resume: bool = False,
          overwrite: bool = False, test: bool = False, device: str | None = None) -> dict:
    """Trains (or resumes) a run in `out`; returns its summary. `device` moves a
    resumed run to another device; a new run takes its device from `config`.

    Under data parallelism every process calls this with the same arguments;
    process 0 alone writes `out` (a folder all processes can read, to resume).

    Raises:
        RunError, data.DataError, hardware.DeviceError, distribute.DistributeError:
            with a one-line message.
    """
    out = Path(out)
    config = read_run_config(out, config, resume, device)
    check_initial_weights(out, config, resume, overwrite)
    gpu, policy = _configure(config)
    replicas = distribute.setup(config.distribute, gpu is not None)
    layout = run_layout(config, replicas)
    print(f"distribute: {replicas.describe()}; global batch {layout['global_batch_size']}, lr {layout['lr']:g}")
    # The data first: a wrong --data-dir must not leave a run folder behind.
    train_split, val_split, test_split = load_splits(config, data_dir)
    if replicas.is_chief:
        prepare_run(out, config, resume, overwrite, layout)
    train_batches, val_batches = make_batches(config, out, train_split, val_split, replicas, layout)
    with replicas.scope():
        model = compile_model(config, len(train_batches), layout["lr"])

    start_epoch = restored_epoch(out)
    if start_epoch == 0 and config.initial_weights:
        load_initial_weights(model, Path(config.initial_weights))
    nan_stop = NanStop()
    callbacks = [EpochSeeder(train_batches, config.seed), EpochStats(), nan_stop]
    if config.use_ema:  # before the writers, so that they see the averaged weights
        callbacks.append(SwapEMAWeights(resumed=start_epoch > 0))
    if replicas.is_chief:
        callbacks += writer_callbacks(out, start_epoch)
    else:
        callbacks.append(RestoreOnly(str(out / BACKUP), delete_checkpoint=False))
    started = time.perf_counter()
    try:
        # shuffle=False: CifarBatches shuffles itself, keyed by (seed, epoch); Keras would
        # reorder batches with Python's global random state, which no resume restores.
        model.fit(train_batches, validation_data=val_batches, epochs=config.epochs, callbacks=callbacks,
                  shuffle=False, verbose=(1 if sys.stdout.isatty() else 2) if replicas.is_chief else 0)
    except Exception as e:
        if nan_stop.fired:
            last = out / "last.weights.h5"
            kept = f"the last completed epoch's weights are in {last}" if last.exists() else "no epoch completed"
            raise RunError(f"the loss became NaN; the learning rate ({layout['lr']}) is probably too high: try a "
                           f"smaller --lr or more --warmup-epochs ({kept})") from None
        if replicas.processes > 1 and is_worker_loss(e):
            raise WorkerLost(f"process {replicas.process_id}: another process of the run stopped "
                             f"({str(e).splitlines()[0]}); restart every process with --resume") from None
        raise
    elapsed = time.perf_counter() - started
    if not replicas.is_chief:
        return {"process_id": replicas.process_id, "epochs": config.epochs}

    history = trim_history(out / "history.csv", restored_epoch(out))
    summary = write_summary(out, config, history, policy, gpu, len(train_split[0]), start_epoch, elapsed)
    if test:
        with distribute.outside_distribution():  # evaluate here alone, not across processes
            summary["test_accuracy"] = evaluate_test(out, test_split)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def make_batches(config: TrainConfig, out: Path, train_split: tuple, val_split: tuple, replicas: Replicas,
                 layout: dict) -> tuple[CifarBatches, CifarBatches]:
    """This process's training and validation batches, preprocessed as in the run folder."""
    prep_path = out / "preprocessing.json"
    if prep_path.exists():
        prep = Preprocessing.load(prep_path)
    else:
        prep = fit_preprocessing(config.preprocessing, train_split[0])
        if replicas.is_chief:
            prep.save(prep_path)
    one_hot = lambda y: keras.utils.to_categorical(y, len(data.CLASS_NAMES))  # noqa: E731
    # JAX splits every batch evenly over the devices: drop a ragged last training
    # batch, and validate in batches that divide over the replicas.
    even = replicas.mode == "data-parallel"
    if even and len(val_split[0]) % replicas.count:
        raise RunError(f"val_size {len(val_split[0])} does not split evenly over {replicas.count} replicas; "
                       f"choose a --val-size divisible by {replicas.count}")
    shard = (replicas.process_id, replicas.processes)
    augment = config.augment
    train_batches = CifarBatches(train_split[0], one_hot(train_split[1]), prep, layout["global_batch_size"],
                                 shuffle=True, flip=augment and config.flip,
                                 translate=config.translate if augment else 0, seed=config.seed,
                                 shard=shard, drop_remainder=even)
    val_batch = replicas.count * max(1, VAL_BATCH // replicas.count)
    val_batches = CifarBatches(val_split[0], one_hot(val_split[1]), prep, val_batch, shard=shard)
    return train_batches, val_batches


def writer_callbacks(out: Path, start_epoch: int) -> list[keras.callbacks.Callback]:
    """What writes the run folder: history, checkpoints, curves, logs, the backup."""
    history = trim_history(out / "history.csv", start_epoch)
    best = max((float(row["val_accuracy"]) for row in history), default=None)
    return [
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        AtomicCheckpoint(str(out / "best.weights.h5"), monitor="val_accuracy", mode="max",
                         save_best_only=True, save_weights_only=True, initial_value_threshold=best),
        AtomicCheckpoint(str(out / "last.weights.h5"), save_weights_only=True),
        CurvesPlotter(out),
        *tensorboard(out / "logs"),
        # Last, so that an epoch is only marked done once everything above is written.
        AtomicBackupAndRestore(str(out / BACKUP), delete_checkpoint=False),
    ]


def write_summary(out: Path, config: TrainConfig, history: list[dict], policy: str, gpu, n_train: int,
                  start_epoch: int, elapsed: float) -> dict:
    """summary.json: totals over all sessions of the run, plus this session's speed.

    A resume that trains no epoch (the run had finished) keeps the summary as it
    was: this session's device and precision did not produce the weights.
    """
    new_epochs = len(history) - start_epoch
    if not new_epochs and (out / "summary.json").exists():
        return read_run_json(out / "summary.json")
    seconds = sum(float(row["epoch_seconds"]) for row in history)
    summary = {
        "epochs": len(history),
        "planned_epochs": config.epochs,
        "train_seconds": round(seconds, 1),
        "images_per_second": round(n_train * new_epochs / elapsed, 1) if new_epochs else None,
        "precision": policy,
        "device": hardware.describe(gpu),
        "backend": keras.backend.backend(),
        "best_val_accuracy": max((float(row["val_accuracy"]) for row in history), default=None),
        "last_val_accuracy": float(history[-1]["val_accuracy"]) if history else None,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def evaluate_test(out: Path, test_split: tuple) -> float:
    """Top-1 accuracy of `best.weights.h5` on the test split (only when asked)."""
    from allcnn.evaluation import metrics
    from allcnn.inference import load_classifier

    x, y = test_split
    return metrics(load_classifier(out / "best.weights.h5").probabilities(x), y)["top1"]
