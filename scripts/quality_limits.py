"""The audit's image-quality limits on planted problems: found and false flags per data set.

Each data set of the suite (scripts/benchmark_datasets.py builds them) gets `--plants` images
made into the problem `--check` looks for, then every image is thumbnailed as the audit does
(`audit.load._file_entry`) and judged by `audit.quality.find` with the shipped `audit.quality`
limits, the ones in the grid replaced: the package's own rule, counted set by set.
  blurry           Gaussian blur, radius max(1, the shorter side / `--divisor`)
  dark             every level x `--strength` (an underexposed image)
  light            every level's distance from white x `--strength` (an overexposed one)
  low_information  the image's mean colour everywhere (a blank frame)
Limits are chosen on one `--seed` and reported on another:

    uv run python scripts/quality_limits.py --keep /tmp/suite --check blurry --seed 0
    uv run python scripts/quality_limits.py --keep /tmp/suite --check blurry --seed 1 \\
        --only blurry=0.15 blurry_contrast=0.3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SHARES = (0.2, 0.3, 0.5, 9)  # class_share: 9 is not judging against the class
GRIDS = {
    "blurry": [
        {"blurry": a, "blurry_contrast": b}
        for a in (0.05, 0.1, 0.15, 0.2, 0.3)
        for b in (0.2, 0.3, 0.4, 0.6, 9)
    ],
    "dark": [{"dark": a, "class_share": r} for a in (0.15, 0.2, 0.3) for r in SHARES],
    "light": [{"light": a, "class_share": r} for a in (0.9, 0.8, 0.7) for r in SHARES],
    "low_information": [
        {"low_information": a, "class_share": r} for a in (0.15, 0.2) for r in SHARES
    ],
}


def planted(im: Image.Image, check: str, args) -> Image.Image:
    from benchmark_datasets import blurred  # beside this script: on sys.path

    if check == "blurry":
        return blurred(im, args.divisor)
    x = np.asarray(im.convert("RGB") if im.mode in ("RGBA", "LA", "P") else im, np.float32)
    if check == "dark":
        x = x * args.strength
    elif check == "light":
        x = 255 - (255 - x) * args.strength
    else:  # low_information
        x = np.broadcast_to(x.mean(axis=(0, 1)), x.shape)
    return Image.fromarray(x.round().clip(0, 255).astype(np.uint8))


def judged(root: Path, check: str, args):
    """(the audit's inputs for root's images, `--plants` of them made a `check` problem; the
    planted mask)."""
    from benchmark_datasets import files  # beside this script: on sys.path

    from image_classifier.audit.load import _file_entry

    rows = files(root)
    colour = Image.open(rows[0][0]).mode != "L"
    rng = np.random.default_rng(100 + args.seed)
    picked = set(rng.choice(len(rows), args.plants, replace=False).tolist())
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (path, _, _) in enumerate(rows):
            if i in picked:
                path = Path(tmp, "planted" + path.suffix)  # saved as the others are
                planted(Image.open(rows[i][0]), check, args).save(path)
            entries.append(_file_entry(str(path), colour))
    classes = sorted({c for _, _, c in rows})
    labels = np.array([classes.index(c) for _, _, c in rows])
    thumbs, sizes = np.stack([e[1] for e in entries]), np.array([e[3] for e in entries])
    grey = np.array([e[4] for e in entries])
    mask = np.isin(np.arange(len(rows)), list(picked))
    return (thumbs, sizes, labels, grey, colour), mask


def main() -> None:
    from benchmark_datasets import EXTRA, SUITE, build  # beside this script: on sys.path

    from image_classifier.audit.quality import find
    from image_classifier.config import compose_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, required=True, help="the suite's folder (built if absent)")
    ap.add_argument("--check", choices=list(GRIDS), required=True)
    ap.add_argument("--names", nargs="+", default=[*SUITE, *EXTRA], choices=[*SUITE, *EXTRA])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plants", type=int, default=25, help="images planted per data set")
    ap.add_argument("--divisor", type=float, default=24, help="blur radius: shorter side / this")
    ap.add_argument("--strength", type=float, default=0.12, help="dark, light: the levels' scale")
    ap.add_argument("--only", nargs="+", help="one set of limits, as key=value")
    args = ap.parse_args()
    defaults = dict(compose_config("command=audit").audit.quality)  # the shipped limits
    grid = [{k: float(v) for k, v in (kv.split("=") for kv in args.only)}] if args.only else None
    sets = {n: judged(build(n, args.keep / n), args.check, args) for n in args.names}
    print(
        f"{args.check}, seed {args.seed}, {args.plants} planted per set; per set: found / "
        "flagged unplanted"
    )
    for limits in grid or GRIDS[args.check]:
        cells, found = [], 0
        for name, (inputs, mask) in sets.items():
            flagged = np.isin(np.arange(len(mask)), find(*inputs, defaults | limits)[args.check])
            found += int((flagged & mask).sum())
            cells.append(f"{name} {int((flagged & mask).sum())}/{int((flagged & ~mask).sum())}")
        shown = " ".join(f"{k}={v:g}" for k, v in limits.items())
        print(f"{shown}: found {found}/{args.plants * len(sets)} | " + ", ".join(cells))


if __name__ == "__main__":
    main()
