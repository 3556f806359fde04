"""What `test` reports for a multi-label model: mAP, micro/macro F1, exact match, per-class
precision/recall/AP at the tuned thresholds, a per-class plot and a per-image predictions file.

predictions.csv   image, true labels, predicted labels (every label at or above its threshold),
                  exact match, the 3 most probable labels with their probabilities
per_class.png     precision, recall and AP of every class
mistakes.png      the wrong decisions furthest from their labels (image models: `mistakes`)
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from image_classifier.errors import listed, shown
from image_classifier.models.metrics import interval_text, wilson_interval
from image_classifier.plotting import gallery
from image_classifier.training.plots import plt, save_figure

TOP_K = 3


def build_report(path: Path, module, info, m: dict, loss: float, hash_note: str) -> dict:
    """Per class, recall and AP are None where the test split holds no image of the class, and
    precision where nothing was predicted; mAP and macro F1 average the classes measured."""
    thresholds = module.thresholds.cpu().numpy()
    outputs = module.test_outputs
    probs = np.concatenate([p.numpy() for p, _ in outputs]) if outputs else None
    targets = np.concatenate([y.numpy() for _, y in outputs]) if outputs else None
    n, tested = len(thresholds), 0 if targets is None else len(targets)
    support = targets.sum(0).astype(int) if outputs else np.zeros(n, int)
    predicted = (probs >= thresholds[None, :]).sum(0) if outputs else np.zeros(n, int)
    per_class = {
        c: {
            "precision": float(m["precision"][i]) if predicted[i] else None,
            "recall": float(m["recall"][i]) if support[i] else None,
            "ap": float(m["ap"][i]) if support[i] else None,
            "threshold": float(thresholds[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(module.classes)
    }
    measured = [i for i in range(n) if support[i]]
    return {
        "checkpoint": str(path),
        "multi_label": True,
        "data": {
            "name": info.name,
            "hash": info.data_hash,
            "test_images": tested,
            "trained_on_hash": (module.hparams.get("data") or {}).get("hash"),
            "warning": hash_note or None,
        },
        "accuracy": float(m["acc"]),  # exact match: every label of the image right
        "accuracy_interval": list(wilson_interval(float(m["acc"]), tested)),
        "f1_macro": float(m["f1"][measured].mean()) if measured else 0.0,
        "f1_micro": float(m["f1_micro"]),
        "mAP": float(m["ap"][measured].mean()) if measured else 0.0,
        "ece": None,
        "loss": loss,
        "per_class": per_class,
        "classes": module.classes,
        "thresholds": [round(float(t), 4) for t in thresholds],
    }


def plot_per_class(report: dict, path: Path) -> Path:
    classes = report["classes"]
    per = report["per_class"]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(classes) + 2), 3.8))
    for k, (key, label) in enumerate(
        (("precision", "precision"), ("recall", "recall"), ("ap", "AP"))
    ):
        ax.bar(x + (k - 1) * 0.27, [per[c][key] or 0 for c in classes], width=0.27, label=label)
    ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="score")
    ax.set_title(f"per class (mAP {report['mAP']:.3f}, macro F1 {report['f1_macro']:.3f})")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def per_image(out: Path, dataset, names, probs, targets, thresholds, classes, images: bool):
    """[predictions.csv, and plots/mistakes.png when the test set is images]."""
    made = [write_predictions(out / "predictions.csv", names, probs, targets, thresholds, classes)]
    if images:
        made.append(plot_mistakes(dataset, probs, targets, thresholds, classes, out / "plots"))
    return [m for m in made if m]


def mistakes(probs, targets, thresholds, n: int = 18) -> list[int]:
    """The `n` images with a wrong label decision whose probabilities are furthest from their
    labels (the distance summed over the classes), furthest first."""
    decided = probs >= np.asarray(thresholds)[None, :]
    wrong = (decided != (targets > 0.5)).any(1)
    furthest = np.argsort(-np.abs(probs - targets).sum(1), kind="stable")
    return [int(i) for i in furthest if wrong[i]][:n]


def plot_mistakes(dataset, probs, targets, thresholds, classes, folder: Path) -> Path | None:
    """mistakes.png: each of `mistakes` with its true and predicted labels."""
    idx, decided = mistakes(probs, targets, thresholds), probs >= np.asarray(thresholds)[None, :]

    def labels(row) -> str:
        return ";".join(classes[j] for j in np.flatnonzero(row)) or "none"

    captions = [f"true {labels(targets[i] > 0.5)}\npred {labels(decided[i])}" for i in idx]
    images = [np.asarray(dataset[i][0]) for i in idx]
    title = "Furthest from their labels: the images whose label decisions were wrong"
    return gallery(images, captions, folder / "mistakes.png", title)


def write_predictions(path: Path, names, probs, targets, thresholds, classes) -> Path:
    decided = probs >= np.asarray(thresholds)[None, :]
    order = np.argsort(-probs, axis=1)[:, :TOP_K]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "true", "predicted", "exact_match", f"top{TOP_K}"])
        for i, name in enumerate(names):
            true = [classes[j] for j in np.flatnonzero(targets[i] > 0.5)]
            pred = [classes[j] for j in np.flatnonzero(decided[i])]
            top = "; ".join(f"{classes[j]}:{probs[i, j]:.4f}" for j in order[i])
            w.writerow([name, ";".join(true), ";".join(pred), int(true == pred), top])
    return path


def summary_lines(report: dict) -> list[str]:
    measured = [(c, v["ap"]) for c, v in report["per_class"].items() if v["support"]]
    absent = [c for c, v in report["per_class"].items() if not v["support"]]
    worst = sorted(measured, key=lambda ca: ca[1])[:3]
    lines = [
        f"  mAP {report['mAP']:.4f}   macro F1 {report['f1_macro']:.4f}   micro F1 "
        f"{report['f1_micro']:.4f}   exact match {report['accuracy']:.4f} ("
        + interval_text(report["accuracy_interval"], report["data"]["test_images"])
        + ")",
        "  lowest AP: " + ", ".join(f"{shown(c)} {ap:.3f}" for c, ap in worst),
    ]
    if absent:
        lines.append(f"  no test images of {listed(absent)}: their recall and AP are not measured")
    thresholds = zip(report["classes"], report["thresholds"], strict=True)
    return [
        *lines,
        "  thresholds (tuned on val): " + ", ".join(f"{shown(c)} {t:.2f}" for c, t in thresholds),
    ]
