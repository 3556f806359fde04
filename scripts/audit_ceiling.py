"""How well could the audit rank planted label errors if its out-of-sample probabilities were as
good as a trained model's on images it never saw? An upper bound for a cross-fitted view built
from that model (which would train on less data, with the noise in its labels).

    uv run python commands.py command=infer infer.model=RUN/checkpoints/best.ckpt \\
        infer.input=D/test infer.output=/tmp/test.json
    uv run python scripts/audit_ceiling.py /tmp/test.json

The JSON is `infer`'s rows for a folder whose parent folders are the true classes. Labels of 1 %
and 5 % of the images are moved to another class (10 draws each); for each, the planted errors
within the first 2x rows by self-confidence (the probability of the given label), the recall and
precision of the audit's recommended cut (its own `label_issues`, audit.label_cut) and of
cleanlab's `find_label_issues`, and the best precision any cut on that ranking reaches at 80 %
recall (#34's target: recall >= 80 % at precision >= 50 %).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in json.loads(path.read_text()) if r.get("all_predictions")]
    classes = sorted(rows[0]["all_predictions"])
    probs = np.array([[r["all_predictions"][c] for c in classes] for r in rows])
    return probs, np.array([classes.index(Path(r["path"]).parent.name) for r in rows])


def one_draw(probs, truth, frac: float, seed: int, cut: float) -> list[float]:
    """One draw of planted flips, ranked and cut by the audit's own `label_issues` (with these
    probabilities as its only view)."""
    from benchmark_datasets import precision_at_recall  # beside this script: on sys.path
    from cleanlab.filter import find_label_issues

    from image_classifier.audit.labels import label_issues

    rng, c = np.random.default_rng(seed), probs.shape[1]
    k = int(round(frac * len(truth)))
    moved = rng.choice(len(truth), k, replace=False)
    given = truth.copy()
    given[moved] = (given[moved] + rng.integers(1, c, k)) % c
    suspects, recommended, _ = label_issues(given, probs, cut)
    listed = np.array([i for i, _, _ in suspects], dtype=int)
    flagged = np.flatnonzero(find_label_issues(given, probs))
    # the best any cut can do: every image ranked by the probability of its given label
    ranked = np.argsort(probs[np.arange(len(given)), given], kind="stable").tolist()
    at_80 = precision_at_recall(ranked, set(moved.tolist()), 0.8)
    found = np.isin(listed[:recommended], moved).sum()
    return [
        np.isin(listed[: 2 * k], moved).sum() / k,
        found / k,
        found / max(1, recommended),
        np.isin(flagged, moved).sum() / k,
        np.isin(flagged, moved).sum() / max(1, len(flagged)),
        at_80,
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", type=Path, help="infer's JSON output for a labelled folder")
    ap.add_argument("--cut", type=float, help="audit.label_cut (default: the features' cut)")
    ap.add_argument("--draws", type=int, default=10)
    args = ap.parse_args()
    if args.cut is None:
        from image_classifier.audit.labels import LABEL_CUTS

        args.cut = LABEL_CUTS["features"]
    probs, truth = read(args.rows)
    print(f"{len(truth)} images, accuracy {(probs.argmax(1) == truth).mean():.1%}")
    for frac in (0.01, 0.05):
        r = np.mean([one_draw(probs, truth, frac, s, args.cut) for s in range(args.draws)], 0)
        print(
            f"{frac:.0%} noise: {r[0]:.0%} of planted errors in the first 2x rows; recommended "
            f"cut recall {r[1]:.0%} precision {r[2]:.0%}; cleanlab recall {r[3]:.0%} precision "
            f"{r[4]:.0%}; best precision at 80 % recall {r[5]:.0%}"
        )


if __name__ == "__main__":
    main()
