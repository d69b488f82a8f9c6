"""`allcnn train`: SGD-Nesterov training of All-CNN-C into a run folder.

`train` starts a run, `resume` continues one from its last completed epoch,
exactly, after any interruption (kill -9 included). The run folder's files are
`allcnn.run_folder`'s business and the callbacks that write them
`allcnn.callbacks`', the optimizer and lr schedule `allcnn.optim`'s, the
starting weights `allcnn.initial_weights`'; here is the run itself: its phases,
data, batches, training loop and summary.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable

import keras

from allcnn import data, distribute, hardware
from allcnn.callbacks import BatchNormRefresh, EpochStats, NanStop, RunBackup, SwapEMAWeights, writer_callbacks
from allcnn.config import EXECUTION_KEYS, ConfigError, TrainConfig
from allcnn.distribute import Replicas, WorkerLost, is_worker_loss
from allcnn.evaluation import metrics
from allcnn.hardware import dtype_policy
from allcnn.initial_weights import check_initial_weights, load_initial_weights, starting_weights
from allcnn.model import load_classifier
from allcnn.optim import compile_model
from allcnn.pipeline import CifarBatches, EpochSeeder
from allcnn.preprocessing import fit_preprocessing
from allcnn.run_folder import RunError, RunFolder, best_val_accuracy
from allcnn.sam import check_sharpness_aware
from allcnn.teacher import augmented_teacher, check_teacher, teacher_targets
from allcnn.weights_io import load_weights

VAL_BATCH = 500
# Training images (augmented) whose statistics the batch norms get for the averaged weights
# (use_ema): 100 batches of 128, a forward pass before each validation (~10% of an epoch's FLOPs).
REFRESH_IMAGES = 12_800


def train(config: TrainConfig, out, *, data_dir=None, test_dir=None, overwrite: bool = False,
          test: bool = False) -> dict:
    """Trains a new run of `config` in the folder `out`; returns its summary.

    Args:
        config: the recipe (see `allcnn.config.load_config`).
        out: the run folder; one that holds a run is refused unless `overwrite`.
        data_dir: CIFAR-10, CIFAR-100 or an image folder, as `config.dataset` says
            (see `allcnn.data.load_dataset`).
        test_dir: an image folder's test split (the same class folders).
        test: evaluate the best weights on the test set at the end.

    Under data parallelism every process calls this with the same arguments;
    process 0 alone writes `out` (a folder all processes can read, to resume).

    Raises:
        AllcnnError (RunError, data.DataError, hardware.DeviceError, ...): with a one-line message.
    """
    run = RunFolder(out)
    # Recorded as resolved, so that the run folder says what it trained on (resume and evaluate read it).
    config = dataclasses.replace(config, dataset=data.resolve_dataset(config.dataset, data_dir))
    check_initial_weights(run, config, overwrite)

    def prepare(layout: dict, names: tuple[str, ...]) -> None:
        check_teacher(run, config, overwrite, names)
        run.create(config, layout, overwrite, names)

    return _fit(run, config, data_dir, test_dir, test, prepare=prepare)


def resume(out, *, data_dir=None, test_dir=None, test: bool = False, recipe: str | None = None, **flags) -> dict:
    """Continues the run in the folder `out` from its last completed epoch; returns its summary.

    The run goes on with its own config.toml. `flags` (recipe keys, e.g. `lr=0.01`)
    and `recipe` (a recipe name or path) are what the caller believes the run
    is: accepted where they agree with it, so the command that started a run
    also resumes it, and refused by name where they differ; but those of
    `config.EXECUTION_KEYS` apply (`device` moves the run, e.g. from a GPU to a
    CPU). `data_dir`, `test_dir` and `test` as for `train`.

    Raises:
        AllcnnError: as `train`; config.ConfigError for a flag that differs from the run's.
    """
    run = RunFolder(out)
    if not run.has_run():
        raise RunError(f"--resume: no run in {run} (no config.toml); start one without --resume")
    config = run.read_config(**{key: flags.pop(key, None) for key in EXECUTION_KEYS})
    run.check_flags(config, recipe, flags)

    def prepare(layout: dict, names: tuple[str, ...]) -> None:
        run.check_replicas(layout)
        trained = run.read_class_names() or data.CLASS_NAMES
        if names != trained:
            raise RunError(f"{run} trains on the classes {', '.join(trained)}; this data has {', '.join(names)}")

    return _fit(run, config, data_dir, test_dir, test, prepare=prepare)


def _configure(config: TrainConfig):
    """Seeds, device and the precision policy to build the model under."""
    keras.utils.set_random_seed(config.seed)
    gpu = hardware.select_device(config.device)
    # Op determinism makes a resumed run byte-identical on a CPU, but under it TensorFlow's fused
    # batch norm falls back to a slow kernel: 75 images/s against 381 without it (Intel Xeon AMX,
    # bf16). A batch-norm run gives up byte-identical resume (it still resumes at the right epoch,
    # batch order and augmentation) for that speed; TensorFlow cannot turn determinism off again
    # within a process, so one that enabled it before keeps it.
    if keras.backend.backend() == "tensorflow" and gpu is None and not config.batch_norm:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    policy, reason = hardware.resolve_precision(config.precision, gpu)
    print(f"device: {hardware.describe(gpu)} ({keras.backend.backend()} backend)")
    print(f"precision: {policy} ({reason})")
    return gpu, policy


@dataclass(frozen=True)
class Phase:
    """Epochs `first` .. `first + config.epochs - 1` of a run, compiled as `config` says."""

    first: int
    config: TrainConfig

    @property
    def end(self) -> int:
        return self.first + self.config.epochs


def phases(config: TrainConfig) -> list[Phase]:
    """The run's phases: one, or with `head_epochs` two, as in Keras' transfer-learning guide:
    the classifier alone (base frozen, constant `head_lr`), then every layer, recompiled."""
    if not config.head_epochs:
        return [Phase(0, config)]
    head = dataclasses.replace(config, epochs=config.head_epochs, lr=config.head_lr, schedule="constant",
                               warmup_epochs=0, freeze_base=True, head_epochs=0)
    return [Phase(0, head), Phase(config.head_epochs, dataclasses.replace(config, head_epochs=0))]


def plan(config: TrainConfig) -> str:
    """The run's phases in one line, the first a run prints: `epochs` counts the last phase
    alone, so a recipe with `head_epochs` (finetune) trains more epochs than --epochs says."""
    def describe(c: TrainConfig) -> str:
        lr = f"lr {c.lr:g}" if c.schedule == "constant" else f"{c.schedule}, peak lr {c.lr:g}"
        layers = "the classifier alone (base frozen, " if c.freeze_base else "all layers ("
        return f"{c.epochs} epoch{'s' * (c.epochs != 1)} of {layers}{lr})"

    return "plan: " + ", then ".join(describe(phase.config) for phase in phases(config))


def _fit(run: RunFolder, config: TrainConfig, data_dir, test_dir, test: bool,
         prepare: Callable[[dict, tuple], None]) -> dict:
    """The training loop of `train` and `resume`, from the run's restored epoch on.

    `prepare(layout, class_names)` readies the run folder on process 0 (creates
    it, or checks that a resumed run keeps its replicas and classes) once the
    data has loaded. Each phase (see `phases`) compiles its own model; the next
    one starts from the weights the previous one ended with.
    """
    print(plan(config))
    gpu, policy = _configure(config)
    replicas = distribute.setup(config.distribute, gpu is not None)
    layout = replicas.layout(config)
    print(f"distribute: {replicas.describe()}; global batch {layout['global_batch_size']}, lr {layout['lr']:g}")
    if config.sam_rho:
        check_sharpness_aware(replicas.count)
    # The data first: a wrong --data-dir must not leave a run folder behind.
    dataset, train_split, val_split = data.load_splits(config, data_dir, test_dir)
    if test and dataset.test is None:
        raise ConfigError("--test: this image folder has no test split; pass --test-dir DIR (same class folders)")
    names = dataset.class_names
    if replicas.is_chief:
        prepare(layout, names)
    train_batches, val_batches = make_batches(config, run, train_split, val_split, replicas, layout, len(names))
    start_epoch = run.restored_epoch()
    if replicas.is_chief and start_epoch < config.total_epochs:
        run.record_session(start_epoch, hardware.describe(gpu), policy, keras.backend.backend())
    elapsed, model = 0.0, None
    for phase in phases(config):
        if phase.end <= start_epoch:
            continue
        previous, lr = model, replicas.layout(phase.config)["lr"]
        # Layers take the policy when built; set around the build only, so that the
        # process (a notebook, the next run) keeps its own global policy.
        with replicas.scope(), dtype_policy(policy):
            model = compile_model(phase.config, len(train_batches), lr, len(names))
        restored = start_epoch > phase.first  # the backup holds this phase's optimizer state too
        if previous is not None:
            model.set_weights(previous.get_weights())
        elif phase.first and not restored:  # resumed where the phase begins: the previous one's weights
            load_weights(model, run.backup_weights())
        elif not restored and config.initial_weights:
            load_initial_weights(model, starting_weights(config), names, train_batches)
        if config.head_epochs:
            trains = "the classifier alone, the base frozen" if phase.config.freeze_base else "every layer"
            print(f"epochs {phase.first + 1} to {phase.end} of {config.total_epochs}: {trains}, lr {lr:g}")
        elapsed += _fit_phase(model, run, phase, lr, max(start_epoch, phase.first), restored, train_batches,
                              val_batches, replicas)
    if not replicas.is_chief:
        return {"process_id": replicas.process_id, "epochs": config.total_epochs}

    history = run.trim_history(run.restored_epoch())
    summary = make_summary(run, config, history, policy, gpu, len(train_split[0]), start_epoch, elapsed)
    summary.update(dataset=dataset.name, classes=len(names), skipped_files=len(dataset.skipped))
    if test:
        with distribute.outside_distribution():  # evaluate here alone, not across processes
            summary["test_accuracy"] = evaluate_test(run, dataset.test)
    run.write_summary(summary)
    return summary


def _fit_phase(model: keras.Model, run: RunFolder, phase: Phase, lr: float, start_epoch: int, restored: bool,
               train_batches: CifarBatches, val_batches: CifarBatches, replicas: Replicas) -> float:
    """`model.fit` for one phase's epochs from `start_epoch`, at peak `lr`; returns its seconds.
    `restored`: the backup restores the weights and optimizer state (a run resumed inside the phase)."""
    config = phase.config
    nan_stop = NanStop()
    callbacks = [EpochSeeder(train_batches, config.seed), EpochStats(), nan_stop]
    if config.use_ema:  # before the writers, so that they see the averaged weights
        callbacks.append(SwapEMAWeights(resumed=restored))
        if config.batch_norm:  # after the swap: statistics for the averaged weights
            callbacks.append(BatchNormRefresh(train_batches.sample(REFRESH_IMAGES), config.batch_size))
    callbacks += (writer_callbacks(run, start_epoch, restore=restored) if replicas.is_chief
                  else [RunBackup(run, write=False, restore=restored)])
    started = time.perf_counter()
    try:
        # shuffle=False: CifarBatches shuffles itself, keyed by (seed, epoch); Keras would
        # reorder batches with Python's global random state, which no resume restores.
        model.fit(train_batches, validation_data=val_batches, epochs=phase.end, initial_epoch=start_epoch,
                  callbacks=callbacks, shuffle=False,
                  verbose=(1 if sys.stdout.isatty() else 2) if replicas.is_chief else 0)
    except Exception as e:
        if nan_stop.fired:
            last = run.last_weights
            kept = f"the last completed epoch's weights are in {last}" if last.exists() else "no epoch completed"
            raise RunError(f"the loss became NaN; the learning rate ({lr}) is probably too high: try a "
                           f"smaller --lr or more --warmup-epochs ({kept})") from None
        if replicas.processes > 1 and is_worker_loss(e):
            raise WorkerLost(f"process {replicas.process_id}: another process of the run stopped "
                             f"({str(e).splitlines()[0]}); restart every process with --resume") from None
        raise
    return time.perf_counter() - started


def make_batches(config: TrainConfig, run: RunFolder, train_split: tuple, val_split: tuple, replicas: Replicas,
                 layout: dict, classes: int) -> tuple[CifarBatches, CifarBatches]:
    """This process's training and validation batches, preprocessed as in the run folder; the
    training targets are the labels, or with a `teacher` its predictions, once or batch by batch
    (`teacher_augmented`); validation keeps the labels."""
    prep = run.read_preprocessing()
    if prep is None:
        prep = fit_preprocessing(config.preprocessing, train_split[0])
        if replicas.is_chief:
            run.write_preprocessing(prep)
    one_hot = lambda y: keras.utils.to_categorical(y, classes)  # noqa: E731
    fixed_teacher = config.teacher and not config.teacher_augmented
    targets = (teacher_targets(run, config, train_split[0], classes, write=replicas.is_chief) if fixed_teacher
               else one_hot(train_split[1]))
    # JAX splits every batch evenly over the devices: drop a ragged last training
    # batch, and validate in batches that divide over the replicas.
    even = replicas.mode == "data-parallel"
    if even and len(val_split[0]) % replicas.count:
        raise RunError(f"val_size {len(val_split[0])} does not split evenly over {replicas.count} replicas; "
                       f"choose a --val-size divisible by {replicas.count}")
    shard = (replicas.process_id, replicas.processes)
    augment = config.augment
    train_batches = CifarBatches(train_split[0], targets, prep, layout["global_batch_size"],
                                 shuffle=True, flip=augment and config.flip,
                                 translate=config.translate if augment else 0,
                                 cutout=config.cutout if augment else 0,
                                 trivial_augment=augment and config.trivial_augment,
                                 mixup=config.mixup if augment else 0.0,
                                 seed=config.seed,
                                 teacher=augmented_teacher(config, prep) if config.teacher_augmented else None,
                                 shard=shard, drop_remainder=even, threads=config.data_workers)
    val_batch = replicas.count * max(1, VAL_BATCH // replicas.count)
    val_batches = CifarBatches(val_split[0], one_hot(val_split[1]), prep, val_batch, shard=shard)
    return train_batches, val_batches


def make_summary(run: RunFolder, config: TrainConfig, history: list[dict], policy: str, gpu, n_train: int,
                 start_epoch: int, elapsed: float) -> dict:
    """What summary.json holds: totals over all sessions of the run and which machines trained
    which epochs, plus this session's speed, device and precision.

    A resume that trains no epoch (the run had finished) keeps the summary as it
    was: this session's device and precision did not produce the weights.
    """
    new_epochs = len(history) - start_epoch
    if not new_epochs and run.summary_path.exists():
        return run.read_summary()
    seconds = sum(float(row["epoch_seconds"]) for row in history)
    summary = {
        "epochs": len(history),
        "planned_epochs": config.total_epochs,
        "train_seconds": round(seconds, 1),
        "images_per_second": round(n_train * new_epochs / elapsed, 1) if new_epochs else None,
        "precision": policy,
        "device": hardware.describe(gpu),
        "backend": keras.backend.backend(),
        "best_val_accuracy": best_val_accuracy(history),
        "last_val_accuracy": float(history[-1]["val_accuracy"]) if history else None,
        "machines": run.machines(len(history)),
    }
    return summary


def evaluate_test(run: RunFolder, test_split: tuple) -> float:
    """Top-1 accuracy of `best.weights.h5` on the test split (only when asked)."""
    x, y = test_split
    classifier = load_classifier(run.best_weights, precision="float32")  # as `allcnn evaluate` measures
    return metrics(classifier.probabilities(x), y, classifier.class_names)["top1"]
