"""Time-to-accuracy curves: validation accuracy against wall seconds of training, one line per run.

    uv run python scripts/time_to_accuracy.py NAME=CHECKPOINT [NAME=CHECKPOINT ...] \
        [--out docs/figures/time_to_accuracy.png]

Each checkpoint carries its per-epoch history (`History`: val/acc and the seconds since training
started, validation included), so the curves come from the runs themselves, e.g.
    default=outputs/.../checkpoints/last.ckpt fast=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def history(path: Path) -> list[dict]:
    from image_classifier.models import checkpoint

    rows = [r for r in checkpoint.history(path) if "seconds" in r and "val/acc" in r]
    if not rows:
        sys.exit(f"{path} holds no training history with seconds (trained before they were kept?)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", help="NAME=CHECKPOINT")
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures" / "time_to_accuracy.png"))
    ap.add_argument("--target", type=float, default=0.93)
    args = ap.parse_args()
    from image_classifier.training.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for spec in args.runs:
        name, _, path = spec.partition("=")
        rows = history(Path(path))
        xs, ys = [r["seconds"] for r in rows], [100 * r["val/acc"] for r in rows]
        ax.plot(xs, ys, marker="o", label=name)
        hit = next((r for r in rows if r["val/acc"] >= args.target), None)
        when = f"{hit['seconds']:.0f} s (epoch {hit['epoch'] + 1})" if hit else "not reached"
        print(
            f"{name}: best val/acc {max(ys):.2f} % at {xs[ys.index(max(ys))]:.0f} s; "
            f">= {100 * args.target:.0f} % {when}"
        )
    ax.axhline(100 * args.target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("wall seconds of training (validation included)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(bottom=85)
    ax.grid(alpha=0.3)
    ax.legend()
    out = save_figure(fig, Path(args.out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
