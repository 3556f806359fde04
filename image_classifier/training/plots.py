"""Training curves and the confusion matrix as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from image_classifier.plotting import plt, save

CURVES = (
    ("loss", "train/loss_epoch", "val/loss"),
    ("accuracy", "train/acc", "val/acc"),
    ("macro F1", "train/f1_macro", "val/f1_macro"),
)


def plot_curves(history: list[dict], path: str | Path) -> Path | None:
    """One panel per metric, train and val against epoch; None when there is no history."""
    if not history:
        return None
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (title, train_key, val_key) in zip(axes, CURVES, strict=True):
        for key, label in ((train_key, "train"), (val_key, "val")):
            pts = [(h["epoch"] + 1, h[key]) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


# the confusion matrix: counts in the cells up to this many classes; names on the axes up to
# NAMED (beyond, a name would be under 2 pt tall); the side never over MAX_INCHES (3,300 px)
ANNOTATED, NAMED, MAX_INCHES = 30, 150, 30.0


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | Path) -> Path:
    """Row-normalised colours (recall per class), raw counts in the cells."""
    cm = np.asarray(cm)
    n = len(classes)
    size = min(max(5.0, (0.55 if n <= ANNOTATED else 0.2) * n + 2), MAX_INCHES)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= NAMED:
        font = None if n <= ANNOTATED else 6
        turn = (45, "right") if n <= ANNOTATED else (90, "center")
        ax.set_xticks(range(n), classes, rotation=turn[0], ha=turn[1], fontsize=font)
        ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted" if n <= NAMED else "predicted (classes in the model's order)")
    ax.set_ylabel("true")
    if n <= ANNOTATED:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_title(f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.2%})")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    return save(fig, path, dpi=110)
