"""Which backbone outputs, and which rule for combining the views, rank planted label flips best?
The choice behind audit/backbone.py's STAGES and audit/labels.py's SINGLE_VIEW_GAIN.

    uv run python scripts/audit_views.py /tmp/suite/colour-96 /tmp/suite/photos-7 --seeds 0 2

For each folder: the audit's own loading, thumbnails and principal components, and three views
of every image: the pixels, the backbone's pooled head (`head`, the view before 2026-12-04) and
the average-pooled outputs of its last two feature stages (`stages`), all at the audit's input
side. Labels of 1 % and 5 % of the images are moved to another class in memory (one draw per
seed); each view's out-of-sample probabilities come from the audit's `out_of_sample_probs`. Per
rule, the out-of-sample accuracy against the true labels, the recommended cut's recall /
precision (the audit's `label_issues`) and the planted flips in the first 2x rows:
- `before`: pixels and head; each alone or their average, whichever fits the given labels best;
- `lowest loss`: pixels and stages, the same rule;
- `average first`: pixels and stages, the average unless one view's log loss is 10 % lower.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def views(root: Path):
    """(true labels, {name: view}) of a folder, as the audit reads it."""
    from image_classifier.audit import backbone, labels
    from image_classifier.audit.load import load
    from image_classifier.config import compose_config
    from image_classifier.models.factory import create_backbone

    cfg = compose_config("command=audit", "data=folder", f"data.root={root}")
    d = load(cfg)
    side, n, net = backbone.backbone_side(d.sizes), len(d.labels), create_backbone(cfg.features)
    head, stages = [], []
    with torch.inference_mode():
        for start in range(0, n, backbone.BATCH):
            x = backbone._images(d, list(range(start, min(start + backbone.BATCH, n))), side, 3)
            head.append(net(x).float())
            stages.append(backbone.stage_features(net, x))
    pixels = torch.from_numpy(d.thumbs.reshape(n, -1).astype(np.float32))
    out = {"pixels": pixels, "head": torch.cat(head), "stages": torch.cat(stages)}
    return d.labels, {k: labels._view(v, 128).numpy() for k, v in out.items()}


def lowest_loss(each: list, given: np.ndarray) -> np.ndarray:
    candidates = [sum(each) / len(each), *each]
    rows = np.arange(len(given))
    return min(candidates, key=lambda p: -np.log(np.clip(p[rows, given], 1e-12, None)).mean())


def scores(probs, truth, given, planted: set) -> str:
    from image_classifier.audit.labels import label_issues

    listed, cut, _ = label_issues(given, probs, 0.45)
    ranked = [i for i, _, _ in listed]
    hit = len(planted & set(ranked[:cut]))
    first = len(planted & set(ranked[: 2 * len(planted)]))
    acc = (probs.argmax(1) == truth).mean()
    return f"{acc:.1%}, {hit / len(planted):.0%} / {hit / max(1, cut):.0%}, {first}/{len(planted)}"


def main() -> None:
    from image_classifier.audit.labels import choose_view, out_of_sample_probs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 2])
    args = ap.parse_args()
    print(
        "accuracy out of sample, the cut's recall / precision, planted flips in the first 2x rows"
    )
    print("| data set | noise, seed | before | lowest loss | average first |")
    print("| --- " * 5 + "|")
    for root in args.folders:
        truth, v = views(root)
        c = int(truth.max()) + 1
        for frac in (0.01, 0.05):
            for seed in args.seeds:
                rng = np.random.default_rng(seed)
                moved = rng.choice(len(truth), int(round(frac * len(truth))), replace=False)
                given = truth.copy()
                given[moved] = (truth[moved] + rng.integers(1, c, len(moved))) % c
                _, _, (pix, head, stages) = out_of_sample_probs(
                    [v["pixels"], v["head"], v["stages"]], given, 5, 42
                )
                planted = set(moved.tolist())
                cells = [
                    scores(lowest_loss([pix, head], given), truth, given, planted),
                    scores(lowest_loss([pix, stages], given), truth, given, planted),
                    scores(choose_view([stages, pix], given)[0], truth, given, planted),
                ]
                print(
                    f"| {root.name} | {frac:.0%}, {seed} | " + " | ".join(cells) + " |", flush=True
                )


if __name__ == "__main__":
    main()
