"""Audit benchmark: time on all 70,000 Fashion-MNIST images, recall/precision on planted problems.

    uv run python scripts/benchmark_audit.py          # pixels features only (about 3 minutes)
    uv run python scripts/benchmark_audit.py --cache  # also with cache-features (+ about 4 minutes)

1. `audit` on data/fashion_mnist as it is (timed; what it flags there is the dataset's own).
2. A planted copy (written to a temp folder, same IDX format): 50 exact duplicates (a training image
   copied over another training image), 50 near-duplicates across train/test (a training image,
   brightness-shifted, noised and JPEG re-encoded, copied over a test image) and 100 flipped
   labels (training images given another random class). The audit of the copy is scored:
   recall = planted problems found; precision = flagged items that are planted. Near-duplicate
   precision counts leak pairs only (train vs test); a second near-duplicate precision also counts
   the dataset's own flagged pairs that differ by no more than the planted copies do from their
   sources (raw pixels, an independent check). With --cache the copy's features come from
   `cache-features` (the packaged tf_efficientnet_lite0 at 64 px), built first.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(root: Path, *overrides: str):
    from image_classifier.config import compose_config

    return compose_config(*overrides, root=ROOT)


def perturb(img: np.ndarray, rng) -> np.ndarray:
    from PIL import Image

    x = img.astype(np.float32) + rng.uniform(-15, 15) + rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return np.asarray(Image.open(buf).convert("L"))


def plant(src: Path, dest: Path, seed: int = 0):
    from image_classifier.data.idx import read_idx, write_idx

    rng = np.random.default_rng(seed)
    xtr, ytr = (
        read_idx(src / "train-images-idx3-ubyte").copy(),
        read_idx(src / "train-labels-idx1-ubyte").copy(),
    )
    xte, yte = (
        read_idx(src / "t10k-images-idx3-ubyte").copy(),
        read_idx(src / "t10k-labels-idx1-ubyte").copy(),
    )
    pick = rng.permutation(len(xtr))
    exact_src, exact_dst = pick[:50], pick[50:100]
    near_src, flips = pick[100:150], pick[150:250]
    near_dst = rng.permutation(len(xte))[:50]
    xtr[exact_dst], ytr[exact_dst] = xtr[exact_src], ytr[exact_src]
    for s, t in zip(near_src, near_dst, strict=True):
        xte[t], yte[t] = perturb(xtr[s], rng), ytr[s]
    for i in flips:
        ytr[i] = (ytr[i] + rng.integers(1, 10)) % 10
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, arr in (
        ("train-images-idx3-ubyte", xtr),
        ("train-labels-idx1-ubyte", ytr),
        ("t10k-images-idx3-ubyte", xte),
        ("t10k-labels-idx1-ubyte", yte),
    ):
        write_idx(dest / name, arr)
        files[name] = hashlib.sha256((dest / name).read_bytes()).hexdigest()
    planted = {
        "exact": list(zip(exact_src, exact_dst, strict=True)),
        "near": list(zip(near_src, near_dst, strict=True)),
        "flips": list(flips),
    }
    return files, planted, ytr


def positions(ytr: np.ndarray, val_size: int, seed: int, n_test: int) -> list[tuple[str, int]]:
    """Audit index -> (file, row): train, then val (both from the train file), then test."""
    from image_classifier.data.identity import stratified_indices

    tr, va = stratified_indices(ytr.astype(np.int64), val_size, seed)
    return (
        [("train", int(i)) for i in tr]
        + [("train", int(i)) for i in va]
        + [("test", i) for i in range(n_test)]
    )


def score(result: dict, planted: dict, where: list[tuple[str, int]]) -> dict:
    report = result["report"]
    # names in the report are "<split>[i]"; rebuild the audit index from them
    split_offsets = {"train": 0}
    counts = {
        s: sum(report["class_counts"]["per_split"].get(s, {}).values())
        for s in ("train", "val", "test")
    }
    split_offsets["val"] = counts["train"]
    split_offsets["test"] = counts["train"] + counts["val"]

    def pos(item: dict) -> tuple[str, int]:
        split, i = item["name"].rstrip("]").split("[")
        return where[split_offsets[split] + int(i)]

    exact_flagged = set()
    for g in report["exact_duplicates"]["items"]:
        members = [pos(x) for x in g["images"]]
        for a in members:
            for b in members:
                if a < b:
                    exact_flagged.add((a, b))
    exact_planted = {
        tuple(sorted([("train", int(s)), ("train", int(t))])) for s, t in planted["exact"]
    }
    near_flagged = {
        tuple(sorted([pos(e["a"]), pos(e["b"])]))
        for e in report["near_duplicates"]["items"]
        if e["leak"]
    }
    near_planted = {
        tuple(sorted([("train", int(s)), ("test", int(t))])) for s, t in planted["near"]
    }
    # a perturbed copy that happens to be byte-identical counts as found by either check
    near_found = len(near_planted & (near_flagged | exact_flagged))
    # pairs of two images the planting did not touch: Fashion-MNIST's own near-duplicates
    touched = {("train", int(t)) for _, t in planted["exact"]} | {
        ("test", int(t)) for _, t in planted["near"]
    }
    own = sorted(p for p in near_flagged if not (set(p) & touched))
    label_flagged = {pos(e) for e in report["label_errors"]["items"]}
    label_planted = {("train", int(i)) for i in planted["flips"]}

    def pr(found, flagged, planted_n):
        return {
            "found": found,
            "planted": planted_n,
            "recall": found / planted_n,
            "flagged": flagged,
            "precision": found / flagged if flagged else 0.0,
        }

    return {
        "exact": pr(len(exact_planted & exact_flagged), len(exact_flagged), len(exact_planted)),
        "near": pr(near_found, len(near_flagged), len(near_planted)) | {"own": own},
        "labels": pr(len(label_planted & label_flagged), len(label_flagged), len(label_planted)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", action="store_true", help="also score with cache-features features")
    ap.add_argument("--cache-only", action="store_true", help="only the cache-features run")
    ap.add_argument("--cache-dir", help="keep the planted copy's feature cache here (reused)")
    ap.add_argument("--pr-png", default=str(ROOT / "docs" / "figures" / "audit_label_pr.png"))
    args = ap.parse_args()
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    from image_classifier.audit.run import run_audit

    src = ROOT / "data" / "fashion_mnist"
    if not (src / "train-images-idx3-ubyte").exists():
        sys.exit("Fashion-MNIST is not in data/: run `uv run python commands.py command=download`.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.cache_only:
            t0 = time.perf_counter()
            orig = [f"paths.output_dir={tmp}/orig", "audit.features=pixels", "logger.enabled=false"]
            r = run_audit(cfg_for(tmp, *orig))
            print(
                f"\n70,000 images, pixels features: {time.perf_counter() - t0:.1f}s wall "
                f"(stages: {r['report']['seconds']})\n"
            )

        files, planted, ytr = plant(src, tmp / "planted")
        base = [
            f"data.dir={tmp / 'planted'}",
            "data.download.sources=[local]",
            "logger.enabled=false",
            *[f"data.files.{k}={v}" for k, v in files.items()],
        ]
        c = cfg_for(tmp, *base)
        where = positions(ytr, int(c.data.val_size), int(c.data.seed), 10000)
        runs = [] if args.cache_only else [("pixels", ["audit.features=pixels"])]
        if (
            args.cache or args.cache_only
        ):  # the packaged EfficientNet-Lite0 at 64 px, as in benchmark_features.py
            feats = [
                "audit.features=cache",
                f"features.dir={args.cache_dir or tmp / 'features'}",
                "features.size=[64,64]",
            ]
            runs.append(("cache-features", feats))
        for name, extra in runs:
            if name == "cache-features":
                from image_classifier.training.features import build_cache

                t0 = time.perf_counter()
                build_cache(cfg_for(tmp, *base, *extra, "train.num_workers=0"), quiet=True)
                print(f"cache-features on the planted copy: {time.perf_counter() - t0:.0f}s")
            t0 = time.perf_counter()
            # every image cleanlab flags, ranked: the precision-recall curve along the ranking,
            # and the scores of the recommended cut (cleanlab's estimate of the number wrong)
            r = run_audit(cfg_for(tmp, *base, *extra, f"paths.output_dir={tmp}/{name}"))
            wall = time.perf_counter() - t0
            curve = pr_curve(r, planted, where)
            cut = int(r["report"]["label_errors"]["recommended_cut"])
            items = r["report"]["label_errors"]["items"]
            r["report"]["label_errors"]["items"] = items[:cut]
            s = score(r, planted, where)
            print(f"\nplanted copy, {name} features: audit {wall:.1f}s ({r['report']['seconds']})")
            print(f"label issues at the recommended cut ({cut} of {len(items)} flagged):")
            print("| problem | planted | found | recall | flagged | precision |")
            print("| --- | --- | --- | --- | --- | --- |")
            for k, v in s.items():
                print(
                    f"| {k} | {v['planted']} | {v['found']} | {v['recall']:.0%} | {v['flagged']} | "
                    f"{v['precision']:.1%} |"
                )
            own, arrays = s["near"]["own"], images_of(tmp / "planted")
            new, found = s["near"]["flagged"] - len(own), s["near"]["found"]
            print(
                f"near-duplicate leaks: {len(own)} of the {s['near']['flagged']} flagged join two "
                f"images the planting did not touch (Fashion-MNIST's own, grid: "
                f"{own_grid(own, arrays, Path(args.pr_png).parent)}); among the other "
                f"{new}, {found} planted: precision {found / max(new, 1):.1%}"
            )
            print(verify_own(s, planted, arrays))
            best = max((rec for rec, prec, _ in curve if prec >= 0.5), default=0.0)
            print(f"label issues, best recall at precision >= 50 %: {best:.0%}")
            for k in (100, 150, 200, 300):
                if k <= len(curve):
                    rec, prec, _ = curve[k - 1]
                    print(f"  top {k}: recall {rec:.0%}, precision {prec:.0%}")
            plot_pr(curve, Path(args.pr_png).with_stem(Path(args.pr_png).stem + f"_{name}"), name)


def pr_curve(result: dict, planted: dict, where) -> list[tuple[float, float, float]]:
    """(recall, precision, self-confidence) after each suspect, in the audit's ranking."""
    flips = {("train", int(i)) for i in planted["flips"]}
    counts = result["report"]["class_counts"]["per_split"]
    offsets = {"train": 0, "val": sum(counts["train"].values())}
    offsets["test"] = offsets["val"] + sum(counts.get("val", {}).values())
    found, out = 0, []
    for k, e in enumerate(result["report"]["label_errors"]["items"], 1):
        split, i = e["name"].rstrip("]").split("[")
        found += where[offsets[split] + int(i)] in flips
        out.append((found / len(flips), found / k, e["self_confidence"]))
    return out


def images_of(planted: Path) -> dict[str, np.ndarray]:
    from image_classifier.data.idx import read_idx

    return {
        "train": read_idx(planted / "train-images-idx3-ubyte"),
        "test": read_idx(planted / "t10k-images-idx3-ubyte"),
    }


def raw_difference(pairs, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """RMS difference in grey levels of each pair's raw 28x28 pixels: no thumbnails, no brightness
    or contrast matching, none of the audit's own measures (an independent check of its finds)."""
    return np.array(
        [
            np.sqrt(np.mean((arrays[a[0]][a[1]].astype(np.float64) - arrays[b[0]][b[1]]) ** 2))
            for a, b in pairs
        ]
    )


def verify_own(s: dict, planted: dict, arrays: dict[str, np.ndarray]) -> str:
    """Fashion-MNIST's own flagged pairs that differ by no more than the planted copies differ
    from their sources count as true near-duplicates in a second precision figure."""
    own = s["near"]["own"]
    copies = [(("train", int(a)), ("test", int(b))) for a, b in planted["near"]]
    envelope = raw_difference(copies, arrays).max()
    closer = int((raw_difference(own, arrays) <= envelope).sum()) if own else 0
    flagged, found = s["near"]["flagged"], s["near"]["found"]
    return (
        f"independent check: {closer} of those {len(own)} differ by at most {envelope:.1f} grey "
        f"levels RMS on the raw pixels (the most any planted copy differs from its source); "
        f"counting them as true: precision {(found + closer) / max(flagged, 1):.1%}"
    )


def own_grid(pairs, arrays: dict[str, np.ndarray], folder: Path, n: int = 24) -> Path:
    """The first n of Fashion-MNIST's own flagged leak pairs side by side, for a person to judge."""
    from PIL import Image

    tiles = [
        np.pad(
            np.hstack([arrays[a[0]][a[1]], np.full((28, 2), 255, np.uint8), arrays[b[0]][b[1]]]),
            ((2, 2), (4, 4)),
            constant_values=128,
        )
        for a, b in pairs[:n]
    ] or [np.zeros((32, 66), np.uint8)]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 6)
    grid = np.vstack([np.hstack(tiles[i : i + 6]) for i in range(0, len(tiles), 6)])
    path = folder / "audit_fmnist_own_leaks.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
    return path


def plot_pr(curve, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.set(xlabel="recall (100 planted label flips)", ylabel="precision", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"Label issues on Fashion-MNIST, {name} features", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"  precision-recall curve: {path}")


if __name__ == "__main__":
    main()
