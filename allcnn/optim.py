"""The optimizer `allcnn train` compiles the model with: SGD-Nesterov under the lr schedule.

A module of its own so that `allcnn benchmark` times the model compiled exactly
as a run compiles it without importing the run's machinery (data, run folders,
callbacks), and so that the schedule a saved optimizer names
(`allcnn>LearningRate`) has one home apart from the loop.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from allcnn import data
from allcnn.config import TrainConfig
from allcnn.model import build_model, freeze_base
from allcnn.sam import sharpness_aware


@keras.saving.register_keras_serializable("allcnn")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The lr per step: linear warm-up, then `step`, `cosine`, `onecycle` or `constant`.

    `step` multiplies by `decay_factor` at each epoch in `milestones` (the
    paper's x0.1 at 200, 250, 300); `cosine` anneals to 0 at the last step;
    `onecycle` rises linearly for the warm-up (30% of the run if none is
    given) and falls linearly to 0. `time_decay` is Keras 2's `decay`:
    lr / (1 + time_decay * step).

    Keras' own schedules compute what they give the same float32 values for
    (bit for bit, in the optimizer's compiled step as eagerly;
    tests/test_training.py checks every step against the formulas they
    replaced): `step` is `PiecewiseConstantDecay`, and the lr with its
    `time_decay` is `InverseTimeDecay` (a rounding apart where a time decay
    meets a warm-up or another schedule, which no recipe has). A run resumed
    by a newer allcnn must go on with the lr it was trained with, so two parts
    stay formulas: the warm-up, since `CosineDecay(warmup_steps=w)` starts at
    its initial lr at step 0 and reaches the peak at step w, where ours is
    lr * (step + 1) / w, the peak at the last warm-up step; and the cosine
    itself, since in a TensorFlow graph Grappler's constant folding regroups
    CosineDecay's arithmetic, a rounding apart at some steps (with constant
    folding off the values agree). Keras has no one-cycle schedule.
    """

    def __init__(self, lr, steps_per_epoch, epochs, schedule="step", warmup_epochs=0,
                 milestones=(), decay_factor=0.1, time_decay=0.0):
        self.lr, self.steps_per_epoch, self.epochs = lr, steps_per_epoch, epochs
        self.schedule, self.warmup_epochs = schedule, warmup_epochs
        self.milestones, self.decay_factor, self.time_decay = list(milestones), decay_factor, time_decay
        total = float(epochs * steps_per_epoch)
        warmup = float(warmup_epochs * steps_per_epoch)
        self._warmup_steps = 0.3 * total if schedule == "onecycle" and not warmup else warmup
        self._decay_steps = max(total - self._warmup_steps, 1.0)
        schedules = keras.optimizers.schedules
        # The lr is lr / (1 + time_decay * step), times the schedule's factor (1 at the peak).
        self._lr = schedules.InverseTimeDecay(lr, decay_steps=1, decay_rate=time_decay)
        # Milestone m (an epoch) takes effect at its first step, m * steps_per_epoch: after the boundary before it.
        # The factors are float32 powers, as the formula before computed them, so the lr stays the same bits.
        boundaries = [m * steps_per_epoch - 1 for m in sorted(self.milestones)]
        factors = [float(ops.power(decay_factor, ops.cast(k, "float32"))) for k in range(len(boundaries) + 1)]
        self._step_factor = schedules.PiecewiseConstantDecay(boundaries, factors)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        factor = self._factor(step)
        if self._warmup_steps:
            factor = factor * ops.minimum(1.0, (step + 1.0) / self._warmup_steps)
        return self._lr(step) * factor

    def _factor(self, step):
        """The schedule's factor at `step`, warm-up aside."""
        if self.schedule == "step" and self.milestones:
            return self._step_factor(step)
        progress = ops.clip((step - self._warmup_steps) / self._decay_steps, 0.0, 1.0)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + ops.cos(math.pi * progress))
        if self.schedule == "onecycle":
            return 1.0 - progress
        return ops.ones_like(step)

    def get_config(self):
        return {"lr": self.lr, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
                "schedule": self.schedule, "warmup_epochs": self.warmup_epochs,
                "milestones": self.milestones, "decay_factor": self.decay_factor,
                "time_decay": self.time_decay}


def compile_model(config: TrainConfig, steps_per_epoch: int, lr: float | None = None,
                  classes: int = len(data.CLASS_NAMES)) -> keras.Model:
    """The model with its optimizer; `lr` overrides the config's (scaled for data parallelism).
    With `freeze_base`, the optimizer sees the classifier's weights alone."""
    model = build_model(
        config.variant,
        classes=classes,
        input_shape=(config.image_size, config.image_size, 3),
        input_dropout=config.input_dropout,
        dropout=config.dropout,
        weight_decay=config.weight_decay,
        kernel_initializer=config.kernel_initializer,
        batch_norm=config.batch_norm,
        reparam=config.reparam,
        seed=config.seed,
    )
    if config.freeze_base:
        freeze_base(model)
    if config.sam_rho:
        model = sharpness_aware(model, config.sam_rho)
    schedule = LearningRate(config.lr if lr is None else lr, steps_per_epoch, config.epochs, config.schedule,
                            config.warmup_epochs, config.milestones, config.lr_decay_factor, config.time_decay)
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum, nesterov=config.nesterov,
                                     use_ema=config.use_ema, ema_momentum=config.ema_momentum)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=config.steps_per_execution,
    )
    return model
