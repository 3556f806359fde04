"""Which label probabilities, and which cut, for audit.probabilities=trained? The choice behind
audit/run.py's average and audit/labels.py's LABEL_CUTS["trained"].

    uv run python scripts/audit_trained_views.py /tmp/suite/colour-96 --frac 0.05 --seed 0

Labels of `frac` of the folder's images (class folders at any depth; every split) are moved to
another class; the images are cut into 5 stratified folds, and for each `train` runs as a user
runs it (`uv run python commands.py command=train data=folder data.root=FOLD.csv`, the default
job) on the other four, and `infer` gives the held-out fold's probabilities (T). The audit's own
features and classifiers give theirs (F, `out_of_sample_probs`, the view it would choose). For
F, T and their average: out-of-sample accuracy against the true labels, the precision of the
ranking at 80 % recall, planted flips in the first 2x rows, and the recall / precision of the
audit's `label_issues` cut at several multiples of chance. About 11 minutes for colour-96 on two
CPU cores (five trainings).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CUTS = (0.3, 0.45, 0.6, 0.8, 1.0)


def command(work: Path, *args: str) -> str:
    from benchmark_datasets import command as run  # uv run python commands.py, outputs in work

    return run(work, *args)


def trained(files, classes, given, seed: int, work: Path) -> np.ndarray:
    """(N, C) probabilities, each image's from the default job trained without its fold."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(files), len(classes)))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed).split(files, given)
    for k, (rows, held) in enumerate(folds):
        manifest, listed, rows_out = (
            work / f"fold{k}.csv",
            work / f"fold{k}.txt",
            work / f"{k}.json",
        )
        with open(manifest, "w", newline="") as f:
            csv.writer(f).writerows(
                [("path", "label")] + [(files[i], classes[given[i]]) for i in rows]
            )
        out = command(work, "command=train", "data=folder", f"data.root={manifest}")
        ckpt = re.search(r"checkpoint: (\S+best\.ckpt)", out).group(1)
        print(
            f"fold {k}: " + next(x for x in out.splitlines() if "best val" in x).strip(), flush=True
        )
        listed.write_text("\n".join(str(files[i]) for i in held) + "\n")
        command(
            work,
            "command=infer",
            f"infer.model={ckpt}",
            f"infer.input={listed}",
            f"infer.output={rows_out}",
        )
        by_path = {r["path"]: r["all_predictions"] for r in json.loads(rows_out.read_text())}
        for i in held:
            probs[i] = [by_path[str(files[i])][c] for c in classes]
    return probs


def features(files, classes, given, work: Path) -> np.ndarray:
    """(N, C) the audit's own out-of-sample probabilities from its features."""
    from image_classifier.audit.labels import choose_view, features, out_of_sample_probs
    from image_classifier.audit.load import load
    from image_classifier.config import compose_config

    manifest = work / "all.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(
            [("path", "label")] + [(p, classes[g]) for p, g in zip(files, given, strict=True)]
        )
    cfg = compose_config("command=audit", "data=folder", f"data.root={manifest}")
    d = load(cfg)
    at = {str(p): i for i, p in enumerate(files)}
    rows = np.array([at[str(Path(n).resolve())] for n in d.names])
    views, _, _ = features(d, cfg, "auto")
    _, _, each = out_of_sample_probs(views, d.labels, 5, 42)
    probs = np.zeros((len(files), len(classes)))
    probs[rows] = choose_view(each, d.labels)[0]
    return probs


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
    ap.add_argument("--seed", type=int, default=0, help="the planting's and the folds' seed")
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
    t, f = trained(files, classes, given, args.seed, work), features(files, classes, given, work)
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
