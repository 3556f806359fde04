"""What `test` writes per image: the predictions file, a gallery of mistakes, calibration.

predictions.csv    one row per test image: image (path, or test[i] for array data), true
                   label, predicted label, confidence, correct, the top 3 classes
mistakes.png       the most confident mistakes, then each class's worst confusion
mistakes_explained.png  the same under the Grad-CAM map of the class each was taken for
reliability.png    accuracy against confidence in 15 bins, with the expected calibration
                   error (ECE, torchmetrics' MulticlassCalibrationError, L1)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from image_classifier.plotting import gallery
from image_classifier.training.plots import plt, save_figure

TOP_K = 3
BINS = 15


def image_names(dataset, n: int) -> list[str]:
    """A file path per test image when the data is files, else test[i]."""
    items = getattr(dataset, "items", None)
    if items is not None and len(items) == n:
        return [str(p) for p, _ in items]
    return [f"test[{i}]" for i in range(n)]


def write_predictions(path: Path, names, probs: np.ndarray, targets: np.ndarray, classes) -> Path:
    pred = probs.argmax(1)
    order = np.argsort(-probs, axis=1)[:, :TOP_K]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "true", "predicted", "confidence", "correct", f"top{TOP_K}"])
        for i, name in enumerate(names):
            top = "; ".join(f"{classes[j]}:{probs[i, j]:.4f}" for j in order[i])
            w.writerow(
                [
                    name,
                    classes[targets[i]],
                    classes[pred[i]],
                    f"{probs[i, pred[i]]:.6f}",
                    int(pred[i] == targets[i]),
                    top,
                ]
            )
    return path


def mistakes(probs: np.ndarray, targets: np.ndarray, n: int = 12) -> list[int]:
    """The n most confident mistakes, then each true class's most confident mistake."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != targets)
    ranked = wrong[np.argsort(-probs[wrong, pred[wrong]])]
    chosen = ranked[:n].tolist()
    for c in np.unique(targets):
        worst = ranked[targets[ranked] == c][:1].tolist()
        chosen += [i for i in worst if i not in chosen]
    return chosen


def mistake_galleries(module, dataset, probs, targets, folder: Path) -> list[Path]:
    """mistakes.png, and mistakes_explained.png for a checkpoint's network (an export, which
    `test` also scores, has no gradients to explain with); each image read once for both."""
    idx = mistakes(probs, targets)
    images = [np.asarray(dataset[i][0]) for i in idx]
    shown = (idx, probs, targets, module.classes)
    made = [plot_mistakes(images, *shown, folder / "mistakes.png")]
    if hasattr(module, "net"):
        made.append(explain_mistakes(module, images, *shown, folder / "mistakes_explained.png"))
    return [m for m in made if m]


MISTAKES = "Most confident mistakes, then each class's worst"


def explain_mistakes(module, images, idx, probs, targets, classes, path: Path) -> Path | None:
    """The same mistakes under the Grad-CAM map of the class each was taken for: what in the
    picture made the network say it (None for a network with no feature map, model=baseline)."""
    from image_classifier.errors import UserError
    from image_classifier.inference.explain import Explainer, overlay

    if not idx:
        return None
    try:
        explainer = Explainer(module, str(module.device))
    except UserError:
        return None
    heat, _, _ = explainer(np.stack(images), [int(probs[i].argmax()) for i in idx])
    pictures = [overlay(im, h).transpose(2, 0, 1) for im, h in zip(images, heat, strict=True)]
    title = "The same mistakes: where the network saw the class it predicted (Grad-CAM)"
    return plot_mistakes(pictures, idx, probs, targets, classes, path, title)


def plot_mistakes(images, idx, probs, targets, classes, path: Path, title: str = MISTAKES):
    """Each chosen mistake's image (uint8 CHW) with its true label, predicted label and
    confidence."""

    def caption(i: int) -> str:
        p = int(probs[i].argmax())
        return f"true {classes[targets[i]]}\npred {classes[p]} ({probs[i, p]:.2f})"

    return gallery(images, [caption(i) for i in idx], path, title)


def plot_reliability(probs: np.ndarray, targets: np.ndarray, ece: float, path: Path) -> Path:
    conf = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0, 1, BINS + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, BINS - 1)
    centres, accs, counts = [], [], []
    for b in range(BINS):
        mask = which == b
        if mask.any():
            centres.append(conf[mask].mean())
            accs.append(correct[mask].mean())
            counts.append(mask.sum())
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centres, accs, marker="o", label="model")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"reliability (ECE {ece:.4f}, {BINS} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return save_figure(fig, path)
