"""The audit's steps, timed, and its report."""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from image_classifier.audit import labels as label_checks
from image_classifier.audit import neighbours, quality
from image_classifier.audit.load import AuditData, load
from image_classifier.audit.report import grids, log_mlflow, summary
from image_classifier.data.identity import SPLITS, imbalance_ratio
from image_classifier.data.splits import data_name
from image_classifier.errors import UserError
from image_classifier.rules import is_auto


def run_audit(cfg, train=None) -> dict:
    """`train`: the train command's function, for audit.probabilities=trained (commands.py hands
    it over; the audit does not import the training code)."""
    started = time.perf_counter()
    a = cfg.audit
    d = load(cfg)
    if len(d.labels) == 0:
        raise UserError("No readable images to audit.")
    timings = {"load": time.perf_counter() - started}
    with _timed(timings, "exact"):
        groups = exact_duplicates(d)
        exact_pairs = {(i, j) for g in groups for i in g for j in g if i < j}
    with _timed(timings, "near"):
        dist, idx = neighbours.knn(neighbours.pixel_vectors(d.thumbs), k=5)
        near = neighbours.near_duplicates(
            d.thumbs,
            dist,
            idx,
            float(a.near_candidates),
            float(a.near_threshold),
            exact_pairs,
            d.colour,
        )
    with _timed(timings, "labels"):
        x, suspects, found, source = _label_checks(d, cfg, train)
    with _timed(timings, "outliers"):
        # x is already principal components (labels.features): only L2-normalise for cosine
        fdist, _ = neighbours.knn(
            x / x.norm(dim=1, keepdim=True).clamp_min(1e-6), int(a.neighbours)
        )
        scores = neighbours.outlier_scores(fdist)
        beyond = neighbours.outliers(scores, float(a.outlier_fence), len(scores))
        outliers = beyond[: int(a.max_outliers)]
    with _timed(timings, "quality"):
        flags = quality.find(d.thumbs, d.sizes, d.labels, d.grey, d.colour_data, dict(a.quality))
    report = build_report(cfg, d, groups, near, suspects, (outliers, scores), flags, source)
    report["label_errors"] |= found
    out = Path(cfg.paths.output_dir) / "audit"
    out.mkdir(parents=True, exist_ok=True)
    write_label_csv(report, out / "label_issues.csv")
    write_near_csv(report, out / "near_duplicates.csv")
    report["outliers"]["beyond_fence"] = len(beyond)  # the items stop at audit.max_outliers
    ranked = np.argsort(scores, kind="stable")  # every image, most unusual first
    write_outlier_csv(d, scores, ranked, set(beyond), out / "outliers.csv")
    with _timed(timings, "grids"):
        made = grids(d, groups, near, suspects, (ranked, len(beyond)), flags, out, int(a.examples))
    timings["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    run_id = log_mlflow(cfg, report, out, d.data_hash)
    summary(report, out, run_id)
    return {"report": report, "dir": str(out), "mlflow_run_id": run_id, "grids": made}


def _label_checks(d: AuditData, cfg, train) -> tuple:
    """(features for the outliers, suspects, the report's figures: the recommended cut and its
    rule (None for multi-label data), cleanlab's estimate and, single-label, how often the
    out-of-sample probabilities name the given label; where the probabilities came from)."""
    a = cfg.audit
    trained = a.get("probabilities") == "trained"
    if trained:  # before the features: arrays and multi-label data stop here
        from image_classifier.audit.crossfit import check_trainable, trained_probs

        check_trainable(d, train)
    views, x, names = label_checks.features(d, cfg, str(a.features))
    if d.multi_label:
        suspects, estimate = label_checks.multi_label_issues(
            views, d.label_sets, d.multi_label, int(a.folds), cfg.seed
        )
        views_named = " and ".join(names) + (", averaged" if len(names) > 1 else "")
        found = {"recommended_cut": None, "cut_rule": None, "cleanlab_estimate": estimate}
        return x, suspects, found, f"multi-label: {views_named}"
    probs, which, _ = label_checks.out_of_sample_probs(views, d.labels, int(a.folds), cfg.seed)
    source = label_checks.describe_views(names, which)
    if trained:  # averaged with the features' view: it ranks planted flips better than either
        fitted, what, warning = trained_probs(d, cfg, Path(cfg.paths.output_dir) / "audit", train)
        probs, source = (fitted + probs) / 2, f"{what}, averaged with {source}"
        source += f"; WARNING: {warning}" if warning else ""
    given_cut = a.get("label_cut", "auto")
    label_cut = label_checks.LABEL_CUTS[a.get("probabilities", "features")]
    label_cut = label_cut if is_auto(given_cut) else float(given_cut)
    suspects, cut, estimate = label_checks.label_issues(d.labels, probs, label_cut)
    found = {
        "recommended_cut": cut,
        "cut_rule": f"{label_cut:g} x chance",
        "cleanlab_estimate": estimate,
        "agreement": round(float((probs.argmax(1) == d.labels).mean()), 4),
        "probabilities": "trained" if trained else "features",
        "chance": round(1 / len(np.unique(d.labels)), 4),
    }
    return x, suspects, found, source


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t


def class_counts(d: AuditData) -> dict:
    """Images per class and split; for multi-label data, images per label (not per label set)."""
    out = {}
    names = d.multi_label or d.classes
    for s, split in enumerate(SPLITS):
        mask = d.splits == s
        if not mask.any():
            continue
        if d.label_sets is None:
            c = np.bincount(d.labels[mask], minlength=len(names))
        else:
            held = [j for t, m in zip(d.label_sets, mask, strict=True) if m for j in t]
            c = np.bincount(np.asarray(held, dtype=np.int64), minlength=len(names))
        out[split] = {name: int(n) for name, n in zip(names, c, strict=True)}
    return {
        "per_split": out,
        "images_per_split": {k: int((d.splits == s).sum()) for s, k in enumerate(SPLITS)},
        "imbalance_ratio": imbalance_ratio(out.get("train", {}).values()),
        "empty_classes": [c for c, n in out.get("train", {}).items() if n == 0],
    }


def exact_duplicates(d: AuditData) -> list[list[int]]:
    groups = defaultdict(list)
    for i, h in enumerate(d.digests):
        groups[h].append(i)
    return [g for g in groups.values() if len(g) > 1]


def suggestion(d: AuditData, s) -> str:
    """The suggested class (an index) or, for multi-label data, labels (a string)."""
    return s if isinstance(s, str) else d.classes[s]


def who(d: AuditData, i: int) -> dict:
    return {
        "name": d.names[i],
        "split": SPLITS[int(d.splits[i])],
        "label": d.classes[int(d.labels[i])],
    }


def build_report(cfg, d, groups, near, suspects, outliers, flags, source: str) -> dict:
    a = cfg.audit
    return {
        "data": {
            "name": data_name(cfg.data),
            "layout": d.layout,
            "hash": d.data_hash,
            "images": len(d.labels),
            "classes": d.classes,
            "left_out": d.left_out,  # images of classes not in data.classes, not audited
            "multi_label": d.multi_label,  # its labels; "classes" are then their combinations
        },
        "class_counts": class_counts(d),
        "unusable_files": [{"path": p, "reason": why} for p, why in sorted(d.skipped.items())],
        "exact_duplicates": _exact_report(d, groups),
        "near_duplicates": _near_report(d, near, a),
        "label_errors": {
            "suspects": len(suspects),
            "features": source,
            "method": f"cleanlab's find_label_issues(multi_label=True) on {a.folds}-fold "
            "cross-validated probabilities of a logistic regression per label and feature view, "
            "averaged; the flagged images ranked by cleanlab's label quality score"
            if d.multi_label
            else f"cleanlab's find_label_issues on {a.folds}-fold cross-validated "
            f"probabilities of {label_checks.describe(len(d.labels))}, one per feature view "
            "(their average, or one view where it fits the labels clearly better by log loss); "
            "every flagged image and every image whose given label is less likely than chance, "
            "ranked by self-confidence",
            "items": [
                {**who(d, i), "suggested": suggestion(d, s), "self_confidence": round(q, 6)}
                for i, q, s in suspects
            ],
            "too_few_to_rank": {
                c: int(n)
                for c, n, few in zip(
                    d.classes,
                    np.bincount(d.labels, minlength=len(d.classes)),
                    label_checks.too_few(d.labels, len(d.classes)),
                    strict=True,
                )
                if few and not d.multi_label  # multi-label: ranked per label, not per set
            },
        },
        "outliers": {
            "count": len(outliers[0]),
            "method": f"distance d to the k-th nearest neighbour (k = {a.neighbours}) in feature "
            f"space, score exp(-d / median d); reported beyond Q3 + {a.outlier_fence} x IQR of d; "
            "every image ranked by score in outliers.csv",
            "items": [{**who(d, i), "score": round(float(outliers[1][i]), 4)} for i in outliers[0]],
        },
        "image_quality": {
            name: {"count": len(idx), "items": [d.names[i] for i in idx[:100]]}
            for name, idx in flags.items()
        },
        "settings": OmegaConf.to_container(cfg.audit, resolve=True),
    }


def _exact_report(d: AuditData, groups) -> dict:
    items = [
        {
            "images": [who(d, i) for i in g],
            "splits": sorted({SPLITS[int(d.splits[i])] for i in g}),
            "conflicting_labels": len({int(d.labels[i]) for i in g}) > 1,
        }
        for g in groups
    ]
    return {
        "groups": len(groups),
        "extra_copies": sum(len(g) - 1 for g in groups),
        "across_splits": sum(1 for g in items if len(g["splits"]) > 1),
        "conflicting_labels": sum(1 for g in items if g["conflicting_labels"]),
        "items": items,
    }


def _near_report(d: AuditData, near, a) -> dict:
    def leak(i, j):  # a pair that joins train and val/test
        return d.splits[i] != d.splits[j] and 0 in (d.splits[i], d.splits[j])

    items = [
        {
            "a": who(d, i),
            "b": who(d, j),
            "splits": f"{SPLITS[int(d.splits[i])]}-{SPLITS[int(d.splits[j])]}",
            "grey_level_difference": r,
            "leak": bool(leak(i, j)),
        }
        for i, j, r in sorted(near, key=lambda e: e[2])
    ]
    return {
        "pairs": len(items),
        "leaks_train_to_eval": sum(1 for e in items if e["leak"]),
        "method": f"pixel neighbours closer than {a.near_candidates} x the median nearest-"
        f"neighbour cosine distance, whose thumbnails differ by at most {a.near_threshold} grey "
        "levels (RMS, 0-255) once brightness and contrast are matched (colour data: in grey and "
        "in each colour channel)",
        "items": items,
    }


def write_label_csv(report: dict, path: Path) -> None:
    """The ranked label suspects, one row each, for a person to open and go through."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        score = "label_quality" if report["data"]["multi_label"] else "self_confidence"
        w.writerow(["rank", "image", "split", "given_label", "suggested_label", score])
        for rank, e in enumerate(report["label_errors"]["items"], 1):
            w.writerow(
                [rank, e["name"], e["split"], e["label"], e["suggested"], e["self_confidence"]]
            )


def write_near_csv(report: dict, path: Path) -> None:
    """The near-duplicate pairs, closest first, leaks marked."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "rank",
                "image_a",
                "label_a",
                "image_b",
                "label_b",
                "splits",
                "leak",
                "grey_level_difference",
            ]
        )
        for rank, e in enumerate(report["near_duplicates"]["items"], 1):
            a, b = e["a"], e["b"]
            w.writerow(
                [
                    rank,
                    a["name"],
                    a["label"],
                    b["name"],
                    b["label"],
                    e["splits"],
                    e["leak"],
                    e["grey_level_difference"],
                ]
            )


def write_outlier_csv(d: AuditData, scores, ranked, beyond: set, path: Path) -> None:
    """Every image, most unusual first: a few odd images alike are each other's neighbours and
    can stay under the fence (five digits among 1,060 photo crops, all in the first 26-28 rows,
    none beyond it), so the ranking is there to read past the fence."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank", "image", "split", "label", "score", "beyond_fence"])
        for rank, i in enumerate(ranked, 1):
            e = who(d, int(i))
            w.writerow(
                [rank, e["name"], e["split"], e["label"], round(float(scores[i]), 4), i in beyond]
            )
