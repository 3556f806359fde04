"""Which label probabilities, and which cut, for audit.probabilities=trained? The choice behind
audit/run.py's average and audit/labels.py's LABEL_CUTS["trained"].

    uv run python scripts/audit_trained_views.py /tmp/suite/colour-96 --frac 0.05 --seed 0

Labels of `frac` of the folder's images (class folders at any depth; every split) are moved to
another class. The audit's own code then gives two sets of out-of-sample probabilities for them:
T, `audit/crossfit.py`'s (what `audit.probabilities=trained` runs: the default job trained
audit.folds times, each fit predicting the images it did not train on), and F, its features'
classifiers (`out_of_sample_probs`, the view it would choose). For F, T and their average:
out-of-sample accuracy against the true labels, the precision of the ranking at 80 % recall,
planted flips in the first 2x rows, and the recall / precision of the audit's `label_issues` cut
at several multiples of chance. About 11 minutes for colour-96 on two CPU cores (five
trainings). The figures in docs/benchmarks.md came from its first form, which ran the same
default job through `uv run python commands.py command=train` and `command=infer` per fold.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

CUTS = (0.3, 0.45, 0.6, 0.8, 1.0)


def probabilities(files, classes, given, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(T, F): (N, C) out-of-sample probabilities in `files`' order, from the audit's code."""
    from image_classifier.audit.crossfit import trained_probs
    from image_classifier.audit.labels import choose_view, features, out_of_sample_probs
    from image_classifier.audit.load import load
    from image_classifier.config import compose_config
    from image_classifier.training.train import run_train

    manifest = work / "all.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(
            [("path", "label")] + [(p, classes[g]) for p, g in zip(files, given, strict=True)]
        )
    cfg = compose_config(
        "command=audit", "data=folder", f"data.root={manifest}", f"paths.output_dir={work}"
    )
    d = load(cfg)
    at = {str(p): i for i, p in enumerate(files)}
    rows = np.array([at[str(Path(n).resolve())] for n in d.names])
    views, _, _ = features(d, cfg, "auto")
    _, _, each = out_of_sample_probs(views, d.labels, int(cfg.audit.folds), cfg.seed)
    t, f = np.zeros((len(files), len(classes))), np.zeros((len(files), len(classes)))
    f[rows] = choose_view(each, d.labels)[0]
    t[rows] = trained_probs(d, cfg, work / "audit", run_train)[0]
    return t, f


def line(name: str, p, truth, given, planted: set) -> str:
    from benchmark_datasets import precision_at_recall  # beside this script: on sys.path

    from image_classifier.audit.labels import label_issues

    ranked = np.argsort(p[np.arange(len(given)), given], kind="stable").tolist()
    cells = []
    for cut in CUTS:
        listed, n, _ = label_issues(given, p, cut)
        hit = len(planted & {i for i, _, _ in listed[:n]})
        cells.append(f"{hit / len(planted):.0%} / {hit / max(1, n):.0%}")
    first = len(planted & set(ranked[: 2 * len(planted)]))
    return (
        f"| {name} | {np.mean(p.argmax(1) == truth):.1%} | "
        f"{precision_at_recall(ranked, planted, 0.8):.0%} | {first}/{len(planted)} | "
        + " | ".join(cells)
        + " |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--frac", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="the planting's seed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/audit_trained_views"))
    args = ap.parse_args()
    files = sorted(p.resolve() for p in args.folder.rglob("*") if p.suffix in (".png", ".jpg"))
    classes = sorted({p.parent.name for p in files})
    truth = np.array([classes.index(p.parent.name) for p in files])
    rng = np.random.default_rng(args.seed)
    moved = rng.choice(len(files), int(round(args.frac * len(files))), replace=False)
    given = truth.copy()
    given[moved] = (given[moved] + rng.integers(1, len(classes), len(moved))) % len(classes)
    work = args.work / f"{args.folder.name}-{args.frac}-{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    t, f = probabilities(files, classes, given, work)
    planted = set(moved.tolist())
    print(
        "| probabilities | accuracy | precision at 80 % recall | first 2x rows | "
        + " | ".join(f"cut {c:g} x chance" for c in CUTS)
        + " |"
    )
    for name, p in (("features (F)", f), ("trained (T)", t), ("(T + F) / 2", (t + f) / 2)):
        print(line(name, p, truth, given, planted))


if __name__ == "__main__":
    main()
