"""Multi-label classification: every class is its own yes/no (sigmoid + binary cross-entropy).

A label counts as present when its probability reaches its threshold; `tune_thresholds` picks one
per class on the validation split (the F1-maximising one), stored with the weights like the
temperature. Metrics: exact match (`acc`), micro/macro F1 and mean average precision (`mAP`,
threshold-free), per-class precision, recall and AP.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)

DEFAULT_THRESHOLD = 0.5


def thresholded_metrics(n: int) -> MetricCollection:
    """Metrics of the 0/1 decisions (fed integer predictions: thresholds already applied)."""
    return MetricCollection(
        {
            "acc": MultilabelExactMatch(n),
            "f1_macro": MultilabelF1Score(n, average="macro"),
            "f1_micro": MultilabelF1Score(n, average="micro"),
        }
    )


def test_metrics(n: int) -> tuple[MetricCollection, MetricCollection]:
    """(decisions, rankings): per-class precision/recall/F1 on decisions, AP on probabilities."""
    decisions = thresholded_metrics(n)
    decisions.add_metrics(
        {
            "precision": MultilabelPrecision(n, average="none"),
            "recall": MultilabelRecall(n, average="none"),
            "f1": MultilabelF1Score(n, average="none"),
        }
    )
    # per class: the report averages the classes the test split has images of
    ranking = MetricCollection({"ap": MultilabelAveragePrecision(n, average="none")})
    return decisions, ranking


def compute_quietly(metric):
    """metric.compute() without torchmetrics' "No positive samples found in target" warning,
    printed raw every epoch when a label has no example in a split: the data's own warning
    names that label, and the test report marks its figures as not measured."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No positive samples found in target")
        return metric.compute()


def decide(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """0/1 (int) per label: probability >= that label's threshold."""
    return (probs >= thresholds.to(probs.device)).int()


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per class, the threshold in 0.05..0.95 with the best F1 on (probs, targets); ties go to
    the one nearest 0.5, and a class without positives keeps 0.5."""
    grid = torch.arange(0.05, 0.951, 0.01)
    targets = targets.bool()
    out = []
    for c in range(probs.shape[1]):
        p, t = probs[:, c], targets[:, c]
        if not t.any():
            out.append(DEFAULT_THRESHOLD)
            continue
        pred = p[None, :] >= grid[:, None]
        tp = (pred & t).sum(1).float()
        f1 = 2 * tp / (pred.sum(1) + t.sum()).clamp(min=1)
        best = f1.max()
        candidates = grid[f1 >= best - 1e-9]
        out.append(round(float(candidates[(candidates - 0.5).abs().argmin()]), 2))
    return out
