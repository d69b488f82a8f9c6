"""A teacher for distillation: a small CIFAR network of another family, fast to train.

Every stage from the shipped All-CNN-C weights has stayed at ~91.3% validation, whatever its
schedule or regularization (docs/results.md): a network taught by its own predictions learns
nothing new. A teacher that is better than the student has something to teach. This one follows
airbench (Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds", 10 epochs on a GPU): a 2x2 conv that
whitens the input's patches (frozen, set from the training images' covariance), then three blocks
of conv, max-pooling, batch norm and GELU (64, 256, 256 channels), max-pooled to the classes. An
epoch costs about half an All-CNN-C one. Its other tricks (lookahead, dirac init, alternating
flips, a trained whitening bias, TTA with translations) are left out, and they matter: what this
one reaches is in docs/results.md.

`train_teacher` writes a teacher folder: `teacher.keras` (the whole model, on inputs
preprocessed as `preprocessing.json` says) and `teacher.json` (its classes, the validation images
it held out, its augmentation, accuracy and time), which a run's `teacher` key can name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

from allcnn import hardware
from allcnn.files import atomic_write, atomic_write_text
from allcnn.pipeline import CifarBatches, EpochSeeder
from allcnn.preprocessing import fit_preprocessing

WIDTHS = (64, 256, 256)
# Whitened patch directions: each of the 12 eigenvectors of 2x2x3 patches, and its negative (the GELU
# after the whitening keeps one sign of each).
WHITENING_FILTERS = 24
# Patches the covariance is taken from, and the ridge on its eigenvalues (of standardized pixels).
WHITENING_PATCHES = 200_000
WHITENING_EPSILON = 5e-4


def whitening_kernel(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The (2, 2, 3, 24) kernel that whitens `images`' (preprocessed, float) 2x2 patches: their
    covariance's eigenvectors scaled by 1 / sqrt(eigenvalue + eps), and their negatives."""
    patches = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2))  # N, H-1, W-1, C, 2, 2
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)  # rows in the kernel's (h, w, c) order
    rng = np.random.default_rng(seed)
    patches = patches[rng.choice(len(patches), min(WHITENING_PATCHES, len(patches)), replace=False)]
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    filters = (eigenvectors / np.sqrt(eigenvalues + WHITENING_EPSILON)).T
    kernel = np.concatenate([filters, -filters]).reshape(WHITENING_FILTERS, 2, 2, 3).transpose(1, 2, 3, 0)
    return kernel.astype(np.float32)


def _block(x, filters: int):
    for pool in (True, False):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        if pool:
            x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        x = layers.Activation("gelu")(x)
    return x


def build_teacher(whitening: np.ndarray, classes: int = 10, input_shape: tuple = (32, 32, 3)) -> keras.Model:
    """The teacher network, its first conv frozen at the `whitening` kernel."""
    inputs = keras.Input(input_shape)
    whiten = layers.Conv2D(WHITENING_FILTERS, 2, trainable=False, name="whiten")
    x = layers.Activation("gelu")(whiten(inputs))
    for filters in WIDTHS:
        x = _block(x, filters)
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(classes, use_bias=False)(x)
    # airbench's scale of the logits.
    x = layers.Rescaling(1 / 9)(x)
    outputs = layers.Activation("softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="airbench_teacher")
    whiten.set_weights([whitening, np.zeros(WHITENING_FILTERS, "float32")])
    return model


def train_teacher(train: tuple, val: tuple, class_names: tuple[str, ...], out, *, held_out: dict,
                  epochs: int = 15, batch_size: int = 512, lr: float = 0.4, warmup_epochs: int = 3,
                  weight_decay: float = 0.005, label_smoothing: float = 0.2, translate: int = 2,
                  cutout: int = 0, seed: int = 0) -> dict:
    """Trains the teacher on `train` (uint8 images, int labels), validating on `val`, and writes
    the teacher folder `out`; returns `teacher.json`'s record. `held_out` (a `data.held_out_record`)
    names the validation images, which a student's run must hold out too.

    SGD-Nesterov under a one-cycle lr (`warmup_epochs` up to `lr`, then linearly to 0), Keras'
    decoupled `weight_decay`, label smoothing, flips and translations (and `cutout`, as a run's):
    airbench's recipe at an ordinary batch size.
    """
    from allcnn.optim import LearningRate  # the run's schedule; not needed to build the network

    keras.utils.set_random_seed(seed)
    prep = fit_preprocessing("standardize", train[0])
    one_hot = lambda y: keras.utils.to_categorical(y, len(class_names))  # noqa: E731
    batches = CifarBatches(train[0], one_hot(train[1]), prep, batch_size, shuffle=True, flip=True,
                           translate=translate, cutout=cutout, seed=seed)
    val_batches = CifarBatches(val[0], one_hot(val[1]), prep, 500)
    policy = hardware.resolve_precision("auto", None)[0]
    with hardware.dtype_policy(policy):
        model = build_teacher(whitening_kernel(prep(train[0][:5000]), seed), len(class_names), train[0].shape[1:])
        schedule = LearningRate(lr, len(batches), epochs, "onecycle", warmup_epochs)
        model.compile(keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=weight_decay),
                      keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing), metrics=["accuracy"])
        started = time.perf_counter()
        history = model.fit(batches, epochs=epochs, validation_data=val_batches, verbose=2,
                            callbacks=[EpochSeeder(batches, seed)])
    record = {
        "network": "airbench-style teacher (allcnn.airbench)",
        "class_names": list(class_names),
        "held_out": held_out,
        "epochs": epochs,
        "augmentation": {"flip": True, "translate": translate, "cutout": cutout},
        "train_seconds": round(time.perf_counter() - started, 1),
        "val_accuracy": round(float(history.history["val_accuracy"][-1]), 4),
        "precision": policy,
        "machine": hardware.describe(None),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep.save(out / "preprocessing.json")
    with atomic_write(out / "teacher.keras", ".keras") as tmp:
        model.save(tmp)
    atomic_write_text(out / "teacher.json", json.dumps(record, indent=2) + "\n")
    return record
