"""Matplotlib figures: learning curves of a run, confusion matrices."""

from __future__ import annotations

from pathlib import Path


def _figure(**kwargs):
    """A Figure drawn straight to files (Agg canvas): pyplot's global backend and
    figure list are left alone, so a notebook's plots are not affected."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: str | Path) -> None:
    from allcnn.files import atomic_write

    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)


def plot_history(history: list[dict], path: str | Path) -> None:
    """Loss and accuracy per epoch, train vs validation, lr on a twin axis."""
    epochs = [int(row["epoch"]) + 1 for row in history]
    fig = _figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [float(r[metric]) for r in history], label=f"train {metric}")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in history], label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        lr_axis = ax.twinx()
        lr_axis.plot(epochs, [float(r["lr"]) for r in history], color="grey", linestyle=":", label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lines = ax.get_lines() + lr_axis.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    _save(fig, path)


def plot_confusion(confusion, class_names, path: str | Path, title: str = "confusion matrix") -> None:
    """Row-normalized confusion matrix (true class down, predicted across), counts in cells."""
    import numpy as np

    counts = np.asarray(confusion)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    for i in ticks:
        for j in ticks:
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    _save(fig, path)
