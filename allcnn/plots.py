"""Matplotlib figures: learning curves of a run, confusion matrices, grids of images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allcnn.files import atomic_write

# A grid shows at most this many images: beyond it the cells get too small to read.
GRID_LIMIT = 64


def _figure(**kwargs):
    """A Figure drawn straight to files (Agg canvas): pyplot's global backend and
    figure list are left alone, so a notebook's plots are not affected."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: str | Path) -> None:
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


@dataclass
class Panel:
    """One cell of an image grid.

    `image` is RGB (H, W, 3), uint8 or float in [0, 1], or a map (H, W) in [0, 1];
    `overlay`, a map (H, W) in [0, 1], is drawn over it as a translucent heat map.
    `scale`, when given, labels a colorbar of the map (the overlay if any, else the image),
    so a reader can tell what a colour means.
    """

    image: np.ndarray
    caption: str = ""
    color: str = "black"
    overlay: np.ndarray | None = None
    scale: str | None = None


def panel_figure(panels: list[Panel], columns: int, title: str | None = None):
    """The Figure of `plot_panels`, not saved: its axes can be inspected."""
    from matplotlib.cm import ScalarMappable

    rows = max(1, math.ceil(len(panels) / columns))
    fig = _figure(figsize=(1.9 * columns, 2.0 * rows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        # 32x32 pixels drawn as blocks, as they are; a map in [0, 1] in one colour scale
        drawn = ax.imshow(panel.image, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        if panel.overlay is not None:
            drawn = ax.imshow(panel.overlay, cmap="jet", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear")
        if panel.scale:  # the colormap at full opacity: a translucent overlay's bar would look washed out
            bar = fig.colorbar(ScalarMappable(drawn.norm, drawn.cmap), ax=ax, fraction=0.046, pad=0.03,
                               ticks=[0, 0.5, 1])
            bar.set_label(panel.scale, fontsize=7)
            bar.ax.tick_params(labelsize=7)
        ax.set_title(panel.caption, color=panel.color, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_panels(panels: list[Panel], path: str | Path, columns: int, title: str | None = None) -> None:
    """Panels in a grid, `columns` wide, each with its caption above it in its colour."""
    _save(panel_figure(panels, columns, title), path)


def plot_labelled_images(images, captions: list[str], path: str | Path, *, colors: list[str] | None = None,
                         title: str | None = None, total: int | None = None) -> None:
    """Images in a grid up to 8 wide, each with its caption (and colour). At most
    `GRID_LIMIT` are drawn; `total`, the count they were taken from, goes in the title."""
    shown = min(len(images), GRID_LIMIT)
    colors = colors or ["black"] * shown
    panels = [Panel(images[i], captions[i], colors[i]) for i in range(shown)]
    if (total or shown) > shown:
        title = f"{title + ': ' if title else ''}the first {shown} of {total} images"
    plot_panels(panels, path, columns=max(1, min(shown, 8)), title=title)
