"""The torchmetrics a ClassifierModule keeps per stage: accuracy and macro F1 while training and
validating; per-class precision and recall, the confusion matrix, the calibration error (with
and without the temperature) and, for more than 5 classes, the top-5 accuracy when testing.
Multi-label data gets thresholded metrics and ranking metrics (models/multilabel.py)."""

from __future__ import annotations

import math

from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from image_classifier.errors import shown
from image_classifier.models import multilabel

TOP_K = 5  # the test report's top-5 accuracy, for more than 5 classes


def metric_set(n: int, multi_label: bool) -> dict[str, Metric | MetricCollection]:
    """The module's metrics by attribute name, for `n` classes."""
    if multi_label:
        metrics = multilabel.thresholded_metrics(n)
        decisions, ranking = multilabel.test_metrics(n)
        return {
            "train_metrics": metrics.clone(prefix="train/"),
            "train_loss": MeanMetric(),
            "val_metrics": metrics.clone(prefix="val/"),
            "val_map": multilabel.MultilabelAveragePrecision(n, average="macro"),
            "test_metrics": decisions.clone(prefix="test/"),
            "test_ranking": ranking.clone(prefix="test/"),
        }
    metrics = MetricCollection(
        {
            "acc": MulticlassAccuracy(n, average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
        }
    )
    test = {
        **metrics.clone(),
        "precision": MulticlassPrecision(n, average="none"),
        "recall": MulticlassRecall(n, average="none"),
        "confusion": MulticlassConfusionMatrix(n),
        "ece": MulticlassCalibrationError(n, n_bins=15, norm="l1"),
        **({"acc_top5": MulticlassAccuracy(n, top_k=TOP_K, average="micro")} if n > TOP_K else {}),
    }
    return {
        "train_metrics": metrics.clone(prefix="train/"),
        "train_loss": MeanMetric(),
        "val_metrics": metrics.clone(prefix="val/"),
        "test_metrics": MetricCollection(test, prefix="test/"),
        "test_ece_raw": MulticlassCalibrationError(n, n_bins=15, norm="l1"),
    }


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion `p` measured on `n` images: where the
    accuracy on many more images like them may lie. On a small folder's test split it is wide
    (8 images at 0.75: 0.41-0.93); the normal approximation would pass 1 near perfect scores."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mistaken_for(cm, i: int, classes: list[str]) -> dict | None:
    """The class that row `i` of a confusion matrix (rows true, columns predicted) is most often
    predicted as, other than itself, with how many images (a tie: the first); None when never."""
    j = max((j for j in range(len(classes)) if j != i), key=lambda j: cm[i][j], default=i)
    n = int(cm[i][j]) if j != i else 0
    return {"class": classes[j], "images": n} if n else None


def recall_text(row: dict) -> str:
    """A class's recall with its count, and where most of the rest went: "0.784 (784 of 1,000;
    97 as T-shirt/top)" (a recall of 0 on 1 image is not one on 100)."""
    n, m = row["support"], row.get("mistaken_for")
    wrong = f"; {m['images']:,} as {shown(m['class'])}" if m else ""
    return f"{row['recall']:.3f} ({round(row['recall'] * n):,} of {n:,}{wrong})"


def lowest_recall_text(per_class: dict) -> str:
    """The three lowest recalls of the classes tested, each with recall_text, and how many more
    tie with the third (100 classes of 2 test images: 11 at 0.500); or that every one is 1."""
    tested = [c for c in per_class if per_class[c]["support"]]
    missed = sorted(
        (c for c in tested if per_class[c]["recall"] < 1), key=lambda c: per_class[c]["recall"]
    )
    if not missed:
        return f"recall 1.000 for every class tested ({len(tested)})"
    worst = missed[:3]
    third = per_class[worst[-1]]["recall"]
    tied = sum(per_class[c]["recall"] == third for c in missed[3:])
    more = f" (and {tied} more class(es) at {third:.3f})" if tied else ""
    each = ", ".join(f"{shown(c)} {recall_text(per_class[c])}" for c in worst)
    return f"lowest recall: {each}{more}"


def interval_text(interval: list[float] | tuple[float, float], n: int) -> str:
    """'95 % interval 0.4093-0.9285 on 8 images': how the test report states it."""
    return f"95 % interval {interval[0]:.4f}-{interval[1]:.4f} on {n:,} images"


def at_chance(accuracy: float, counts, classes: list[str]) -> dict | None:
    """When `accuracy`, measured on images of these class `counts`, is not clearly better than
    always answering the largest class (its rate inside the accuracy's 95 % interval): that
    rate, the class, the number of images and whether they are `too_few` to tell even when
    every one is right (3 images of two classes: 1.0's interval holds 0.67); None otherwise."""
    n = sum(counts)
    rate = max(counts) / n if n else 0.0
    if not n or wilson_interval(accuracy, n)[0] > rate:
        return None
    largest = max(range(len(counts)), key=counts.__getitem__)
    too_few = wilson_interval(1.0, n)[0] <= rate
    return {"rate": rate, "class": classes[largest], "images": n, "too_few": too_few}


def chance_text(score: str, c: dict, split: str) -> str:
    """at_chance's finding in words."""
    text = (
        f"{score} is not clearly better than always answering {c['class']!r} ({c['rate']:.4f} "
        f"of the {c['images']} {split} images): the network has not shown that it tells the "
        "classes apart"
    )
    if c.get("too_few"):
        text += (
            f"; {c['images']} {split} images cannot show it even when every one is right: "
            f"give the {split} split more images (a larger share in data.split, or more files "
            "in its folder when the data is pre-split)"
        )
    return text


# the confidence floors `test` reports accuracy above, for choosing infer.min_confidence
CONFIDENCE_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)


def by_confidence(probs, targets, levels=CONFIDENCE_LEVELS) -> list[dict]:
    """For each floor: the share of images whose top probability reaches it (`answered`) and
    the accuracy on those (None when none does): what a confidence floor keeps and gains."""
    conf, right = probs.max(1), probs.argmax(1) == targets
    rows = []
    for level in levels:
        kept = conf >= level
        acc = float(right[kept].mean()) if kept.any() else None
        rows.append({"min_confidence": level, "answered": float(kept.mean()), "accuracy": acc})
    return rows


def confidence_text(rows: list[dict]) -> str:
    """'0.9 82.0 % (98.6 % right), ...': at each floor, the share of images answered and the
    accuracy on them, as the test summary states it."""
    return ", ".join(
        f"{r['min_confidence']:g} {100 * r['answered']:.1f} %"
        + (f" ({100 * r['accuracy']:.1f} % right)" if r["accuracy"] is not None else "")
        for r in rows
    )
