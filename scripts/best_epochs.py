"""Which epoch each rule keeps as best.ckpt, from a run's own history (docs/benchmarks.md,
thirteenth session): the first epoch at the top validation accuracy (Lightning's rule, kept until
then) and the one with the lowest val/loss among those tied at it (`BestCheckpoint`).

    uv run python scripts/best_epochs.py outputs/<date>/<time> [more run folders]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from image_classifier.models.checkpoint import history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (with checkpoints/last.ckpt)")
    for run in ap.parse_args().runs:
        rows = [r for r in history(run / "checkpoints" / "last.ckpt") if "val/acc" in r]
        top = max(r["val/acc"] for r in rows)
        tied = [r for r in rows if r["val/acc"] == top]
        first, lowest = tied[0], min(tied, key=lambda r: r["val/loss"])
        print(
            f"{run}: {len(rows)} epochs, {len(tied)} at the top val/acc {top:.4f}; first "
            f"epoch {first['epoch']} (val/loss {first['val/loss']:.4f}), lowest loss epoch "
            f"{lowest['epoch']} (val/loss {lowest['val/loss']:.4f})"
        )


if __name__ == "__main__":
    main()
