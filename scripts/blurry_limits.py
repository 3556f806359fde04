"""The audit's `blurry` limits on planted blur: found and false flags per data set, over a grid.

Each data set of the suite (scripts/benchmark_datasets.py builds them) gets `--blurs` images
blurred as `--plant-blur` does (Gaussian, radius max(1, the shorter side / `--divisor`)); every
image is thumbnailed as the audit does (`audit.load._file_entry`) and scored by
`audit.quality.scores`, so the measures are the package's own. An image is flagged when its
`blurry` score is under the first limit and its `blurry_contrast` score under the second (9:
that second score not used). Limits are chosen on one `--seed` and reported on another:

    uv run python scripts/blurry_limits.py --keep /tmp/suite --seed 0            # choose
    uv run python scripts/blurry_limits.py --keep /tmp/suite --seed 1 --only 0.15,0.3  # report
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from benchmark_datasets import EXTRA, SUITE, build, files  # beside this script: on sys.path
from PIL import Image, ImageFilter

from image_classifier.audit.load import _file_entry
from image_classifier.audit.quality import scores

GRID = [(a, b) for a in (0.05, 0.1, 0.15, 0.2, 0.3) for b in (0.2, 0.3, 0.4, 0.6, 9)]


def blurred_scores(root: Path, blurs: int, divisor: float, seed: int):
    """(blurry scores, blurry_contrast scores, planted mask) of root with `blurs` images blurred."""
    rows = files(root)
    colour = Image.open(rows[0][0]).mode != "L"
    picked = set(np.random.default_rng(100 + seed).choice(len(rows), blurs, replace=False).tolist())
    thumbs, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (path, _, _) in enumerate(rows):
            im = Image.open(path)
            sizes.append(im.size)
            if i in picked:
                path = Path(tmp, "blurred" + path.suffix)
                im.filter(ImageFilter.GaussianBlur(max(1.0, min(im.size) / divisor))).save(path)
            thumbs.append(_file_entry(str(path), colour)[1])
    classes = sorted({c for _, _, c in rows})
    labels = np.array([classes.index(c) for _, _, c in rows])
    s = scores(np.stack(thumbs), np.array(sizes), labels)
    planted = np.isin(np.arange(len(rows)), list(picked))
    return s["blurry"], s["blurry_contrast"], planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, required=True, help="the suite's folder (built if absent)")
    ap.add_argument("--names", nargs="+", default=[*SUITE, *EXTRA], choices=[*SUITE, *EXTRA])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blurs", type=int, default=25, help="images blurred per data set")
    ap.add_argument("--divisor", type=float, default=24, help="blur radius: shorter side / this")
    ap.add_argument("--only", help="one pair of limits, 'blurry,blurry_contrast'")
    args = ap.parse_args()
    grid = [tuple(map(float, args.only.split(",")))] if args.only else GRID
    sets = {
        n: blurred_scores(build(n, args.keep / n), args.blurs, args.divisor, args.seed)
        for n in args.names
    }
    print(
        f"seed {args.seed}, {args.blurs} blurred per set (radius: shorter side / {args.divisor:g});"
        " per set: found / flagged unblurred"
    )
    for a, b in grid:
        cells, found = [], 0
        for name, (sa, sb, planted) in sets.items():
            flagged = (sa < a) & (sb < b)
            found += int((flagged & planted).sum())
            cells.append(
                f"{name} {int((flagged & planted).sum())}/{int((flagged & ~planted).sum())}"
            )
        total = args.blurs * len(sets)
        print(f"blurry {a:<5g} blurry_contrast {b:<4g} found {found}/{total} | " + ", ".join(cells))


if __name__ == "__main__":
    main()
