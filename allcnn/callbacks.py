"""The Keras callbacks of `allcnn train`: what runs around each epoch and writes the run folder.

Each builds on public Keras API: the atomic writes that make a run resumable
after kill -9 are our own small callbacks rather than overrides of the private
`_save_model` methods of Keras' ModelCheckpoint and BackupAndRestore. The one
private name used is SwapEMAWeights' state flag, for want of a public one (see
`SwapEMAWeights`).
"""

from __future__ import annotations

import importlib.util
import time

import keras
from keras import ops

from allcnn.distribute import outside_distribution
from allcnn.files import atomic_save_weights
from allcnn.model import refresh_batch_norm
from allcnn.plots import plot_history
from allcnn.run_folder import RunFolder, best_val_accuracy


class EpochStats(keras.callbacks.Callback):
    """Adds the epoch's learning rate and wall time to the logs (so to history.csv)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._lr = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["lr"] = self._lr
        logs["epoch_seconds"] = time.perf_counter() - self._start


class CurvesPlotter(keras.callbacks.Callback):
    """Redraws curves.png from history.csv, so a running run shows its progress.

    After an epoch when `min_seconds` have passed since the last drawing, and at the
    end: a drawing takes ~0.25 s, a long run's epoch on a GPU a few seconds.
    """

    def __init__(self, run: RunFolder, min_seconds: float = 30.0):
        super().__init__()
        self.run, self.min_seconds = run, min_seconds
        self._drawn_at, self._epochs, self._drawn = -float("inf"), 0, 0

    def on_epoch_end(self, epoch, logs=None):
        self._epochs = epoch + 1
        if time.perf_counter() - self._drawn_at >= self.min_seconds:
            self._draw()

    def on_train_end(self, logs=None):
        if self._epochs > self._drawn:
            self._draw()

    def _draw(self):
        plot_history(self.run.read_history(self._epochs), self.run.curves_path)
        self._drawn_at, self._drawn = time.perf_counter(), self._epochs


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
    never expects: it would train on from the average. `resumed` tells it, through
    the private flag the callback keeps for exactly this state, since Keras offers
    no public way to say "the averaged weights are in the model already".
    """

    def __init__(self, resumed: bool):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed


class BatchNormRefresh(keras.callbacks.Callback):
    """Gives the averaged weights of `SwapEMAWeights` their own batch norm statistics.

    Keras' EMA averages the trainable weights, not the batch norms' moving mean and
    variance, which follow the trained weights: validating the average with them measures
    a mismatched network. Before each validation, once `SwapEMAWeights` (earlier in the
    callback list) has swapped the average in, `refresh_batch_norm` recomputes them on
    `images` (training images, augmented as training augments them); the checkpoints of the
    epoch's end keep them.
    Training then normalizes by batch statistics and its moving averages move on
    (momentum 0.99 forgets the refresh within a few hundred steps).
    """

    def __init__(self, images, batch_size: int):
        super().__init__()
        self.images, self.batch_size = images, batch_size

    def on_test_begin(self, logs=None):
        refresh_batch_norm(self.model, self.images, self.batch_size)


class BestCheckpoint(keras.callbacks.Callback):
    """ModelCheckpoint(save_weights_only=True, save_best_only=True) for `.weights.h5`,
    replacing the file atomically: saves an epoch whose `monitor` (maximized) beats the
    best so far, starting from `best` (a resumed run's best, as `initial_value_threshold`)."""

    def __init__(self, path, monitor: str, best: float | None = None):
        super().__init__()
        self.path, self.monitor, self.best = path, monitor, best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or (self.best is not None and not value > self.best):
            return
        self.best = value
        with outside_distribution():
            atomic_save_weights(self.model, self.path)


class RunBackup(keras.callbacks.Callback):
    """Keras' BackupAndRestore for a run folder, with atomic writes (`RunFolder.write_backup`).

    Keras' callback writes `latest.weights.h5` and its epoch marker in place, so a
    kill mid-write leaves a truncated file, and one between the two writes pairs
    epoch k's marker with epoch k+1's weights (and optimizer step). The epoch to
    start from is `model.fit(initial_epoch=run.restored_epoch())`; this callback
    restores the weights and optimizer state at the start of training, once
    `fit` has built the model, and backs up after each epoch. `write=False`
    (processes other than 0 of a run) restores only; `restore=False` only writes
    (a phase that starts from the previous phase's weights, not from its backup).
    """

    def __init__(self, run: RunFolder, write: bool = True, restore: bool = True):
        super().__init__()
        self.run, self.write, self.restore = run, write, restore

    def on_train_begin(self, logs=None):
        weights = self.run.backup_weights() if self.restore else None
        if weights is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)

    def on_epoch_end(self, epoch, logs=None):
        if self.write:
            with outside_distribution():
                self.run.write_backup(self.model, epoch + 1)


def tensorboard(logdir) -> list[keras.callbacks.Callback]:
    """Keras' TensorBoard callback writes through TensorFlow; skip it where there is none (JAX-only GPU hosts)."""
    if importlib.util.find_spec("tensorflow") is None:
        print("note: TensorFlow is not installed, so no TensorBoard logs are written")
        return []
    return [keras.callbacks.TensorBoard(str(logdir))]


def writer_callbacks(run: RunFolder, start_epoch: int, restore: bool = True) -> list[keras.callbacks.Callback]:
    """What writes the run folder: history, checkpoints, curves, logs, the backup (see `RunBackup` for `restore`)."""
    history = run.trim_history(start_epoch)
    best = best_val_accuracy(history)
    return [
        keras.callbacks.CSVLogger(str(run.history_path), append=True),
        BestCheckpoint(run.best_weights, monitor="val_accuracy", best=best),
        CurvesPlotter(run),
        *tensorboard(run.logs_dir),
        # Last, so that an epoch is only marked done once everything above is written; it
        # writes last.weights.h5 too.
        RunBackup(run, restore=restore),
    ]
