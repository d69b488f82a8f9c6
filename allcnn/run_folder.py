"""The run folder of `allcnn train`: where each file lies, and reading and writing them.

A run folder holds everything a user looks for afterwards (see the README's
table) and what `--resume` continues from. `RunFolder` is the one place that
knows its layout; training, its callbacks and `scripts/ship_weights.py` go
through it. Every write is atomic (temp file + rename), so a kill leaves the
old file or the new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from allcnn.config import EXECUTION_KEYS, ConfigError, TrainConfig, load_config
from allcnn.errors import AllcnnError, FileAccessError
from allcnn.files import atomic_link, atomic_save_weights, atomic_write_csv, atomic_write_text
from allcnn.preprocessing import Preprocessing

# Keras' BackupAndRestore names; a backup made by an earlier version has them too.
_BACKUP_MARKER = "training_metadata.json"
_KERAS_BACKUP_WEIGHTS = "latest.weights.h5"
MACHINE_FIELDS = ("device", "precision", "backend")  # what says which machine trained an epoch
SESSION_FIELDS = ("started", "first_epoch", *MACHINE_FIELDS)


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


def best_val_accuracy(history: list[dict], default: float | None = None) -> float | None:
    """The highest val_accuracy of history.csv rows (`default` when there are none)."""
    return max((float(row["val_accuracy"]) for row in history), default=default)


class RunFolder:
    """One run folder (`allcnn train --out`), its paths and their reading and writing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    config_path = property(lambda self: self.path / "config.toml", doc="The fully resolved recipe.")
    history_path = property(lambda self: self.path / "history.csv", doc="One row per completed epoch.")
    best_weights = property(lambda self: self.path / "best.weights.h5", doc="Best by val_accuracy.")
    last_weights = property(lambda self: self.path / "last.weights.h5",
                            doc="The latest epoch's, with optimizer state: the backup's file under a second name.")
    preprocessing_path = property(lambda self: self.path / "preprocessing.json", doc="What evaluate replays.")
    curves_path = property(lambda self: self.path / "curves.png", doc="Loss, accuracy and lr per epoch.")
    classes_path = property(lambda self: self.path / "classes.json", doc="The class names, in label order.")
    summary_path = property(lambda self: self.path / "summary.json", doc="Totals of all sessions.")
    sessions_path = property(lambda self: self.path / "sessions.csv", doc="Each session's first epoch and machine.")
    distribution_path = property(lambda self: self.path / "distribution.json", doc="Replicas and global batch.")
    logs_dir = property(lambda self: self.path / "logs", doc="TensorBoard's.")
    backup_dir = property(lambda self: self.path / "backup", doc="What --resume continues from.")
    backup_marker = property(lambda self: self.backup_dir / _BACKUP_MARKER, doc="The last completed epoch.")

    # --- config.toml and distribution.json -------------------------------------

    def has_run(self) -> bool:
        return self.config_path.is_file()

    def read_config(self, **execution) -> TrainConfig:
        """The run's config, with the `config.EXECUTION_KEYS` given in `execution` (None: the run's own):
        a run may move, e.g. from a GPU to a CPU."""
        return load_config(self.config_path, **execution)

    def create(self, config: TrainConfig, layout: dict, overwrite: bool, class_names: tuple[str, ...]) -> None:
        """Makes the folder of a new run, or replaces one with `overwrite`; writes its config and class names.

        `layout` is how this session runs (mode, replicas, global batch, lr): it goes
        to distribution.json and, as a comment, to config.toml.
        """
        try:
            if self.path.exists() and any(self.path.iterdir()):
                if not overwrite:
                    raise RunError(f"{self.path} already holds a run; use --resume to continue it or --overwrite "
                                   "to replace it")
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # --out is a file, or the system refuses
            raise FileAccessError.of(e, self.path) from None
        note = (f"# {layout['mode']} on {layout['replicas']} replica(s): global batch {layout['global_batch_size']}, "
                f"lr {layout['lr']:g} ({config.lr_scaling} lr scaling)\n")
        atomic_write_text(self.config_path, config.to_toml() + note)
        atomic_write_text(self.distribution_path, json.dumps(layout, indent=2))
        atomic_write_text(self.classes_path, json.dumps({"class_names": list(class_names)}, indent=2))

    def read_class_names(self) -> tuple[str, ...] | None:
        """The class names the run trains on; None for a run made before they were recorded (CIFAR-10)."""
        if not self.classes_path.exists():
            return None
        names = read_run_json(self.classes_path, "class_names")["class_names"]
        if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
            raise RunError(f"{self.classes_path}: class_names must be a list of at least two names; the run folder "
                           "is damaged")
        return tuple(names)

    def check_replicas(self, layout: dict) -> None:
        """A run resumes only on as many replicas as it started with, so that it follows the same global batches."""
        path = self.distribution_path
        started = read_run_json(path, "replicas", "global_batch_size") if path.exists() else None
        if started and started["replicas"] != layout["replicas"]:
            raise RunError(f"{self.path} was started on {started['replicas']} replicas (global batch "
                           f"{started['global_batch_size']}); resume it on as many, not {layout['replicas']}")

    # --- preprocessing.json and summary.json -------------------------------------

    def read_preprocessing(self) -> Preprocessing | None:
        """The run's preprocessing, or None before it was fitted."""
        return Preprocessing.load(self.preprocessing_path) if self.preprocessing_path.exists() else None

    def write_preprocessing(self, preprocessing: Preprocessing) -> None:
        preprocessing.save(self.preprocessing_path)

    def read_summary(self, *keys: str) -> dict | None:
        """summary.json, checked for `keys`; None while the run has not finished a session."""
        return read_run_json(self.summary_path, *keys) if self.summary_path.exists() else None

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2))

    def check_flags(self, config: TrainConfig, recipe: str | None, flags: dict) -> None:
        """Refuses, by name, the flags (and recipe) given to resume this run that differ from its
        `config` (None: not given); those of `EXECUTION_KEYS` may differ: a run may move."""
        given = {key: value for key, value in flags.items() if value is not None}
        if not (given or recipe):
            return
        wanted = load_config(recipe or self.config_path, **given)
        # `auto` is whatever dataset the run resolved it to.
        differ = [key for key, value in vars(wanted).items() if key not in EXECUTION_KEYS
                  and value != getattr(config, key) and not (key == "dataset" and value == "auto")]
        if differ:
            named = ", ".join(f"--{key.replace('_', '-')} {getattr(wanted, key)!r} (run: {getattr(config, key)!r})"
                              for key in differ)
            raise ConfigError(f"--resume continues {self.config_path} as it is; these differ from it: {named}")

    # --- sessions.csv ---------------------------------------------------------------

    def record_session(self, first_epoch: int, device: str, precision: str, backend: str) -> None:
        """Appends the session that trains from `first_epoch` on: a run may take several
        sessions on different machines, and summary.json, written only when a session ends
        normally, names the last one alone."""
        rows = self.read_sessions()
        rows.append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "first_epoch": first_epoch, "device": device, "precision": precision, "backend": backend})
        atomic_write_csv(self.sessions_path, rows, SESSION_FIELDS)

    def read_sessions(self) -> list[dict]:
        """sessions.csv's rows, oldest first (none for a run made before sessions were recorded)."""
        if not self.sessions_path.exists():
            return []
        with self.sessions_path.open(newline="") as f:
            return [row | {"first_epoch": int(row["first_epoch"])} for row in csv.DictReader(f)]

    def machines(self, epochs: int) -> list[dict]:
        """Which machine trained which of the first `epochs` epochs: one entry (device, precision,
        backend, first and last epoch, counted from 1) per stretch of sessions on the same one."""
        stretches: list[dict] = []
        sessions = self.read_sessions()
        ends = [row["first_epoch"] for row in sessions[1:]] + [epochs]
        for row, end in zip(sessions, ends):
            first, last = row["first_epoch"] + 1, min(end, epochs)
            if last < first:  # stopped before its first epoch ended
                continue
            machine = {key: row[key] for key in MACHINE_FIELDS}
            if stretches and {key: stretches[-1][key] for key in MACHINE_FIELDS} == machine:
                stretches[-1]["last_epoch"] = last
            else:
                stretches.append(machine | {"first_epoch": first, "last_epoch": last})
        return stretches

    # --- history.csv ---------------------------------------------------------------

    def _history_rows(self, epochs: int | None) -> tuple[str, list[str], list[dict]]:
        """The header, then one complete line and row for each of the first `epochs` epochs (all if None)."""
        if not self.history_path.exists():
            return "", [], []
        text = self.history_path.read_text()
        header, *lines = [line for line in text.splitlines(keepends=True) if line.endswith("\n")] or [""]
        kept_lines, kept = [], []
        for line, row in zip(lines, csv.DictReader(io.StringIO(header + "".join(lines)))):
            if int(row["epoch"]) == len(kept) and (epochs is None or len(kept) < epochs):
                kept_lines.append(line)
                kept.append(row)
        return header, kept_lines, kept

    def read_history(self, epochs: int | None = None) -> list[dict]:
        """history.csv's rows for the first `epochs` epochs (every complete one if None), without touching the file.

        Read only: while a run trains, Keras' CSVLogger keeps the file open for appending.
        """
        return self._history_rows(epochs)[2]

    def trim_history(self, epochs: int) -> list[dict]:
        """Rewrites history.csv to one complete row for each of the first `epochs` epochs.

        An interrupted run may have logged an epoch whose backup never landed, or
        a partial last line; without trimming, the resumed run duplicates it.
        """
        header, lines, rows = self._history_rows(epochs)
        if self.history_path.exists():
            atomic_write_text(self.history_path, header + "".join(lines) if rows else "")
        return rows

    # --- backup/ -------------------------------------------------------------------

    def restored_epoch(self) -> int:
        """How many epochs the backup holds (0 when there is none)."""
        return read_run_json(self.backup_marker, "epoch")["epoch"] if self.backup_marker.exists() else 0

    def backup_weights(self) -> Path | None:
        """The weights (with optimizer state) the backup marker names, or None when there is no backup.

        A marker without a name (a backup written by Keras' own BackupAndRestore)
        means `latest.weights.h5`, as in Keras.
        """
        if not self.backup_marker.exists():
            return None
        named = read_run_json(self.backup_marker, "epoch").get("weights")
        return self.backup_dir / (named or _KERAS_BACKUP_WEIGHTS)

    def write_backup(self, model, epochs: int) -> None:
        """Backs up `model` (weights and optimizer state) after `epochs` completed epochs,
        and makes `last_weights` the same file (a hard link: one write an epoch, not two).

        Each epoch's weights land by rename under their own name, then the marker,
        naming them, lands the same way; the previous epoch's file goes only after
        that. So a kill at any point leaves a marker paired with the weights of its
        own epoch, never a truncated file or the next epoch's weights.
        """
        name = f"epoch-{epochs}.weights.h5"
        atomic_save_weights(model, self.backup_dir / name)
        atomic_write_text(self.backup_marker, json.dumps({"epoch": epochs, "batch": 0, "weights": name}))
        atomic_link(self.backup_dir / name, self.last_weights)
        for old in [*self.backup_dir.glob("epoch-*.weights.h5"), self.backup_dir / _KERAS_BACKUP_WEIGHTS]:
            if old.name != name and old.exists():
                old.unlink()
