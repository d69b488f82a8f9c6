"""Training recipes: TOML files in `configs/`, overridden by command-line flags."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from allcnn.errors import AllcnnError
from allcnn.resources import configs_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The names every module checks against live here, so that config imports no other module of the package.
# The paper's networks (Tables 1-2): a base model with max-pooling (A, B or C) and the three derived from it.
NETWORK_KINDS = ("model", "strided-cnn", "convpool-cnn", "all-cnn")
FAMILIES = ("a", "b", "c")
# `paper` is All-CNN-C (`all-cnn-c` names the same network); `tutorial` the Keras tutorial's layout of it.
VARIANTS = ("paper", "tutorial", *(f"{kind}-{family}" for family in FAMILIES for kind in NETWORK_KINDS))
_SYNONYMS = {"all-cnn-c": "paper"}
# auto: an image folder (DIR/CLASS/IMAGE) when --data-dir holds class sub-folders, else CIFAR-10.
DATASETS = ("auto", "cifar10", "cifar100", "folder")
# `initial_weights` naming the weights allcnn ships (weights/manifest.json's default).
SHIPPED = "shipped"
PREPROCESSINGS = ("scale", "standardize", "zca")
SCHEDULES = ("step", "cosine", "onecycle", "constant")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
DEVICES = ("auto", "cpu", "gpu")
DISTRIBUTE_MODES = ("none", "auto", "mirrored", "data-parallel")
LR_SCALINGS = ("linear", "none")
# Keys that say how a run executes, not what it trains: a resumed run may change them
# (a run started on a GPU can go on on a CPU), and they leave its results the same.
EXECUTION_KEYS = ("device", "data_workers", "steps_per_execution")
# Test-time augmentation of evaluate and predict: "flip" averages the probabilities of
# each image and its mirror (training flips images at random, so the network knows both).
TTA_MODES = ("none", "flip")
# `allcnn explain`'s maps and `allcnn export`'s formats (see allcnn/explain.py, allcnn/export.py).
EXPLAIN_METHODS = ("guided", "deconvnet", "saliency", "gradcam")
EXPORT_FORMATS = ("onnx", "tflite", "saved_model")


class ConfigError(AllcnnError, ValueError):
    """A recipe key or flag has a wrong name, type or value."""


def canonical_variant(variant: str) -> str:
    """The one name a network is recorded under: `all-cnn-c` is `paper`, so that weights of
    either start, resume and evaluate as the other (the shipped ones say `paper`)."""
    return _SYNONYMS.get(variant, variant)


def model_name(variant: str) -> str:
    """The Keras name of a variant's model, which a `.keras` file keeps: `paper` and `tutorial`
    keep the names their files already carry (`allcnn_c_paper`)."""
    variant = canonical_variant(variant)
    return f"allcnn_c_{variant}" if variant in ("paper", "tutorial") else f"allcnn_{variant.replace('-', '_')}"


def variant_of(name: str) -> str | None:
    """The variant a model name says (`model_name`'s inverse), or None for another model."""
    return next((variant for variant in VARIANTS if model_name(variant) == name), None)


@dataclass
class TrainConfig:
    """Everything that defines a training run; written to the run folder."""

    variant: str = "paper"
    dataset: str = "auto"
    # The network's input size: image folders are resized to it (CIFAR is 32x32).
    image_size: int = 32
    epochs: int = 350
    batch_size: int = 128
    lr: float = 0.05
    schedule: str = "step"
    milestones: list[int] = field(default_factory=lambda: [200, 250, 300])
    lr_decay_factor: float = 0.1
    warmup_epochs: int = 0
    time_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.001
    label_smoothing: float = 0.0
    augment: bool = True
    flip: bool = True
    translate: int = 5
    # Cutout (DeVries & Taylor, 2017): each training image loses a random square of this
    # side (0: none), centred on a random pixel.
    cutout: int = 0
    # TrivialAugment (Müller & Hutter, 2021; its wide operations, `allcnn.pipeline.trivial_augment`):
    # each training image goes through one photometric or geometric operation drawn at random first.
    trivial_augment: bool = False
    # Mixup (Zhang et al., 2018): each training image and its target are mixed with another's of
    # the batch, weighted by a draw from Beta(mixup, mixup) (1.0: uniform); 0: none.
    mixup: float = 0.0
    # Sharpness-aware minimization (`allcnn.sam`, adaptive): each step's gradient is taken at the
    # worst weights within this relative radius (ASAM's rho; 0.5 for CIFAR-10); 0: plain steps.
    sam_rho: float = 0.0
    preprocessing: str = "standardize"
    input_dropout: float = 0.2
    dropout: float = 0.5
    kernel_initializer: str = "he_normal"
    batch_norm: bool = False
    # With batch_norm: each conv trains as RepVGG's branches (`allcnn.model.RepConv`: the conv, a 1x1
    # conv, the identity, each batch-normed), which fold into the plain conv; from a random init only
    # (`initial_weights` is refused).
    reparam: bool = False
    # Polyak averaging (Keras' SGD(use_ema=True)): validation, best.weights.h5 and
    # last.weights.h5 use the exponential moving average of the weights, which is
    # less noisy than the weights of the last step while the lr is high.
    use_ema: bool = False
    ema_momentum: float = 0.999
    # Weights to start from instead of random init: a file, or "shipped" (our CIFAR-10
    # weights); "" trains from scratch. Weights trained on the same classes load whole (a
    # warm restart, e.g. a second cosine cycle from a run's last.weights.h5); on other
    # classes every layer but the classifier (the last 1x1 conv) loads, the classifier starts random.
    initial_weights: str = ""
    # Distillation: the training images' targets are the predictions of these weights (a file, or
    # "shipped"), or of a teacher network's `.keras` file (scripts/train_teacher.py), averaged as
    # `teacher_tta` says, instead of their labels ("" : the labels).
    teacher: str = ""
    teacher_tta: str = "flip"
    # The teacher predicts each training batch as augmented (the student's view) instead of the
    # images once, unaugmented (`allcnn.teacher`); `teacher_tta` is then unused: a teacher that
    # flip-averages is one `scripts/ensemble_teacher.py --tta flip` wrote.
    teacher_augmented: bool = False
    # Transfer learning: train only the classifier (the last 1x1 conv), the base frozen.
    freeze_base: bool = False
    # Transfer learning as the Keras guide does it, in one run: `head_epochs` epochs of the
    # classifier alone (base frozen, lr `head_lr`, constant), then every layer unfrozen and
    # recompiled for `epochs` more epochs at `lr` with `schedule`.
    head_epochs: int = 0
    head_lr: float = 0.01
    # Training images held out for validation; 0: the dataset's default (see `allcnn.data.hold_out`),
    # 5,000 of CIFAR, 10% of an image folder with at least one image of each class.
    val_size: int = 0
    # A fraction of the training images to hold out instead of `val_size` (0: use val_size).
    val_split: float = 0.0
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    # Data parallelism: batch_size is per replica, so the global batch is
    # batch_size x replicas, and with lr_scaling "linear" the lr scales with it.
    distribute: str = "auto"
    lr_scaling: str = "linear"
    # Threads that prepare the next training batches while a step runs (a GPU trains
    # faster than one thread augments); the batches are the same for any number.
    data_workers: int = 1
    # Training steps per call of Keras' compiled step (`compile(steps_per_execution=)`):
    # fewer round trips between Python and a GPU; the same steps, so the same weights.
    steps_per_execution: int = 1

    def validate(self) -> "TrainConfig":
        """Checks values, naming the offending key."""
        choices = {
            "variant": VARIANTS,
            "dataset": DATASETS,
            "schedule": SCHEDULES,
            "precision": PRECISIONS,
            "device": DEVICES,
            "preprocessing": PREPROCESSINGS,
            "distribute": DISTRIBUTE_MODES,
            "lr_scaling": LR_SCALINGS,
            "teacher_tta": TTA_MODES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("epochs", "batch_size", "data_workers", "steps_per_execution"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        for key in (f.name for f in fields(self) if f.type == "float"):  # nan passes every comparison below
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key}: must be a finite number, got {getattr(self, key)}")
        for key in ("lr", "head_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("weight_decay", "time_decay", "warmup_epochs", "translate", "cutout", "mixup", "sam_rho",
                    "head_epochs", "val_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must not be negative, got {getattr(self, key)}")
        for key in ("label_smoothing", "input_dropout", "dropout", "momentum", "ema_momentum", "val_split"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.warmup_epochs >= self.epochs and self.schedule != "constant":
            raise ConfigError(f"warmup_epochs: {self.warmup_epochs} leaves no epoch after warm-up of {self.epochs}")
        if self.image_size < 16:
            raise ConfigError(f"image_size: must be at least 16, got {self.image_size}")
        if self.preprocessing == "zca" and self.image_size != 32:
            raise ConfigError(f"preprocessing: zca is fitted on 32x32 images only, not {self.image_size}x{self.image_size}")
        if self.reparam and not self.batch_norm:
            raise ConfigError("reparam: the branches are batch-normed: it needs batch_norm = true")
        if self.freeze_base and self.head_epochs:
            raise ConfigError("freeze_base: the whole run trains the classifier alone; head_epochs (which then "
                              "unfreezes the base) contradicts it: set one of them (e.g. --head-epochs 0)")
        return self

    @property
    def total_epochs(self) -> int:
        """The epochs of the run: the classifier-only ones first, if any."""
        return self.head_epochs + self.epochs

    def to_toml(self) -> str:
        """The resolved recipe as TOML (flat scalars and lists only)."""
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in dataclasses.asdict(self).items())


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _check_type(key: str, value, expected: type) -> object:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is list:
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


_TYPE_NAMES = {"str": str, "int": int, "float": float, "bool": bool, "list[int]": list}
_TYPES = {f.name: _TYPE_NAMES[f.type] for f in fields(TrainConfig)}


# Keras and PyTorch names that difflib finds nothing (or the wrong thing) close to; it finds
# lr_schedule, ema, validation_split, num_epochs and the like itself.
_ALIASES = {"learning_rate": "lr", "decay": "weight_decay, or time_decay (Keras 2's decay)",
            "gamma": "lr_decay_factor"}


def _unknown_key(key: str) -> ConfigError:
    """The error for an unknown key, naming the key meant where it can be guessed."""
    near = _ALIASES.get(key) or (difflib.get_close_matches(key, _TYPES, n=1) or [None])[0]
    return ConfigError(f"{key}: unknown key; did you mean {near}?" if near
                       else f"{key}: unknown key (known: {', '.join(_TYPES)})")


def make_config(base: dict | None = None, **overrides) -> TrainConfig:
    """Builds a validated config from a recipe dict plus overrides (None = keep).

    An overridden `val_size` without an overridden `val_split` sets val_split to 0:
    the count asked for beats a recipe's fraction (finetune's 0.2)."""
    values = dict(base or {})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "val_size" in overrides and "val_split" not in overrides:
        overrides["val_split"] = 0.0
    values.update(overrides)
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise _unknown_key(unknown[0])
    checked = {k: _check_type(k, v, _TYPES[k]) for k, v in values.items()}
    if "variant" in checked:
        checked["variant"] = canonical_variant(checked["variant"])
    return TrainConfig(**checked).validate()


def read_recipe(path: str | os.PathLike) -> dict:
    """Reads a TOML recipe file into a dict (validated by `make_config`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """Reads a recipe (a path, or a name in `configs/` such as `paper`) and applies overrides."""
    return make_config(read_recipe(find_recipe(path)) if path else {}, **overrides)


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A path as given, else a recipe shipped in `configs/` by its name."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix:
        return path
    return configs_dir() / f"{name_or_path}.toml"
