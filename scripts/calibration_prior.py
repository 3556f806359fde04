"""How much should a small validation split be trusted to fit the temperature? Chooses
`calibrate.PRIOR`, the weight of the prior that holds T near 1.

    uv run python commands.py command=infer infer.model=RUN/checkpoints/best.ckpt \\
        infer.input=D/val infer.output=/tmp/val.json     # images the model did not train on
    uv run python scripts/calibration_prior.py RUN/checkpoints/best.ckpt /tmp/val.json [more.json]

The JSON is `infer`'s rows for folders whose parent folders are the true classes (several files
are pooled: a pre-split folder's val/ and test/). For class folders the tool split itself, give
`infer` the whole folder and `--split-of D`: only the rows of the val and test splits the
tool cut (the default data.split and data.seed) are kept. The rows' probabilities carry the
checkpoint's temperature; its logits are recovered from them (up to a constant per row, which
softmax ignores). Then, 100 times for each size n: n images drawn as a validation split, T fitted on
them with each prior, and the log-loss and ECE of the other images at that T, against T = 1 and
the rule before the prior (2026-12-04): the plain fit, or T = 1 when the model got every drawn
image right. Accuracy is the same at every T.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from image_classifier.data.layouts import discover
from image_classifier.models import checkpoint as ckpt_file
from image_classifier.training.calibrate import ece, fit_temperature, nll

PRIORS = (5.0, 10.0, 20.0, 30.0, 50.0)
SIZES = (12, 25, 50, 100, 250)


def held_out_logits(checkpoint: str, files: list[Path], split_of: str | None):
    t = float(ckpt_file.load_module(checkpoint).temperature)
    rows = [r for f in files for r in json.loads(f.read_text()) if r.get("all_predictions")]
    if split_of:
        splits = discover(split_of).splits
        held = {str(Path(p).resolve()) for s in ("val", "test") for p, _ in splits[s]}
        rows = [r for r in rows if str(Path(r["path"]).resolve()) in held]
    classes = sorted(rows[0]["all_predictions"])
    probs = np.array([[r["all_predictions"][c] for c in classes] for r in rows])
    truth = [classes.index(Path(r["path"]).parent.name) for r in rows]
    logits = t * np.log(np.clip(probs, 1e-7, None))
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(truth)


def simulate(logits, truth, n: int, draws: int, seed: int) -> dict[float, np.ndarray]:
    """rule -> draws x (NLL, ECE, NLL above T = 1's) on the images not drawn."""
    rng = np.random.default_rng(seed)
    out: dict = {p: [] for p in ("T = 1", "before", *PRIORS)}
    for _ in range(draws):
        idx = torch.from_numpy(rng.permutation(len(truth)))
        fit, rest = idx[:n], idx[n:]
        base = nll(logits[rest], truth[rest])
        all_right = bool((logits[fit].argmax(1) == truth[fit]).all())
        for prior in out:
            if prior == "T = 1" or (prior == "before" and all_right):
                t = 1.0
            else:
                t = fit_temperature(logits[fit], truth[fit], 0.0 if prior == "before" else prior)
            loss = nll(logits[rest], truth[rest], t)
            out[prior].append((loss, ece(logits[rest], truth[rest], t), loss > base))
    return {p: np.array(v, dtype=float) for p, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("rows", nargs="+", type=Path, help="infer's JSON rows on held-out images")
    ap.add_argument("--split-of", help="class folders the tool split: keep its val and test")
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logits, truth = held_out_logits(a.checkpoint, a.rows, a.split_of)
    acc = float((logits.argmax(1) == truth).float().mean())
    print(f"{len(truth)} held-out images, accuracy {acc:.1%}; mean over {a.draws} draws:")
    print("| n | T = 1 | before | " + " | ".join(f"prior {p:g}" for p in PRIORS) + " |")
    print("| --- " * (len(PRIORS) + 3) + "|")
    for n in SIZES:
        if n > len(truth) - 100:
            continue
        res = simulate(logits, truth, n, a.draws, a.seed)
        cells = [
            f"{r[:, 0].mean():.4f} / {r[:, 1].mean():.4f}"
            + ("" if p == "T = 1" else f" ({r[:, 2].mean():.0%})")
            for p, r in res.items()
        ]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("cells: log-loss / ECE of the images not drawn (the share of draws worse than T = 1)")


if __name__ == "__main__":
    main()
