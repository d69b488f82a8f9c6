"""Sharpness-aware minimization (`sam_rho`): each step descends with the gradient taken at the
worst nearby weights, which steers training towards flat minima.

Adaptive SAM (ASAM, Kwon et al., 2021; SAM: Foret et al., 2021): the step first climbs from the
weights w to w + e, e = rho * T^2 g / |T g| with T = |w| + eta elementwise, then applies the
gradient taken there to w. Every weight is scaled so, biases and batch norm's too, where ASAM's own
code leaves biases at T = 1. The climb is measured relative to each weight, so it is the same for a
kernel and the kernel scaled, as a kernel before a batch norm is free to be (plain SAM, T = 1,
climbs less the larger the kernels, and the kernels unfolded from the shipped weights are larger
than a batch-norm run's own). A step costs two forward and backward passes. SAM applied only at
the end of a run brings most of its gain (Zhou et al., 2025), which suits a stage from the
shipped weights.
"""

from __future__ import annotations

import keras
from keras import ops

from allcnn.config import ConfigError
from allcnn.model import batch_norms

# ASAM's eta: weights at 0 (fresh biases, batch norm betas) still move.
ETA = 0.01


class SharpnessAware(keras.Sequential):
    """A `keras.Sequential` whose `fit` takes SAM steps (TensorFlow on one replica, or JAX).

    Its layers and weights are the network's own, so checkpoints, folding and evaluation see the
    same model. The loss and metrics `fit` reports are the first pass's, at the weights
    themselves; batch norm's moving statistics are updated by that pass alone.
    """

    def __init__(self, layers, rho: float, name: str | None = None):
        super().__init__(layers, name=name)
        self.rho = rho

    def train_step(self, *args):
        """Keras' step: `(data)` under TensorFlow, `(state, data)` under JAX (stateless)."""
        return self._jax_step(*args) if keras.backend.backend() == "jax" else self._tensorflow_step(*args)

    def _tensorflow_step(self, data):
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        weights = self.trainable_weights
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            self._loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])
            loss = self.optimizer.scale_loss(loss)
        climb = _climb(self.rho, weights, tape.gradient(loss, weights))
        statistics = [v for norm in batch_norms(self) for v in (norm.moving_mean, norm.moving_variance)]
        kept = [tf.identity(v) for v in statistics]
        for weight, step in zip(weights, climb):
            weight.assign_add(step)
        with tf.GradientTape() as tape:
            y_climbed = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_climbed, sample_weight=sample_weight, training=True)
            loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(loss, weights)
        for weight, step in zip(weights, climb):
            weight.assign_sub(step)
        for variable, value in zip(statistics, kept):
            variable.assign(value)
        self.optimizer.apply_gradients(zip(gradients, weights))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _jax_step(self, state, data):
        import jax

        weights, non_trainable, optimizer_variables, metrics_variables = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        gradient = jax.grad(self.compute_loss_and_updates, has_aux=True)

        def gradients_at(at):
            return gradient(at, non_trainable, metrics_variables, x, y, sample_weight, training=True,
                            optimizer_variables=optimizer_variables)

        gradients, (loss, y_pred, updated, metrics_variables) = gradients_at(weights)
        climbed = [w + step for w, step in zip(weights, _climb(self.rho, weights, gradients))]
        gradients = gradients_at(climbed)[0]
        weights, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, weights)
        logs, metrics_variables = self._update_metrics_variables(metrics_variables, loss, x, y, y_pred, sample_weight)
        return logs, (weights, updated, optimizer_variables, metrics_variables)


def _climb(rho: float, weights, gradients) -> list:
    """e = rho * T^2 g / |T g|, T = |w| + eta: the step to the worst weights nearby (to first order).
    A loss scale (mixed_float16) cancels out of it."""
    scales = [ops.abs(ops.convert_to_tensor(w)) + ETA for w in weights]
    norm = ops.sqrt(sum(ops.sum(ops.square(t * g)) for t, g in zip(scales, gradients)))
    return [rho * t * t * g / (norm + 1e-12) for t, g in zip(scales, gradients)]


def check_sharpness_aware(replicas: int) -> None:
    """Before a run with `sam_rho` starts: its backend takes SAM steps, on all its replicas.

    Raises:
        ConfigError: a backend other than TensorFlow and JAX, or TensorFlow's data parallelism over
            several replicas (whose step would climb with its replica's gradient only; JAX's sees the batch's).
    """
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise ConfigError(f"sam_rho: sharpness-aware steps need the TensorFlow or JAX backend, not {backend}")
    if backend == "tensorflow" and replicas > 1:
        raise ConfigError(f"sam_rho: sharpness-aware steps under TensorFlow run on one replica, not {replicas}: "
                          "use --distribute none, or KERAS_BACKEND=jax")


def sharpness_aware(model: keras.Sequential, rho: float) -> SharpnessAware:
    """`model`'s layers (the same objects, so the same weights) in a model that trains with SAM."""
    return SharpnessAware([keras.Input(model.input_shape[1:]), *model.layers], rho, name=model.name)
