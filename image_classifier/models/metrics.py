"""The torchmetrics a ClassifierModule keeps per stage: accuracy and macro F1 while training and
validating; per-class precision and recall, the confusion matrix, the calibration error (with
and without the temperature) and, for more than 5 classes, the top-5 accuracy when testing.
Multi-label data gets thresholded metrics and ranking metrics (models/multilabel.py)."""

from __future__ import annotations

from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

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
