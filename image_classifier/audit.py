"""`command=audit`: what is wrong with a dataset, before hours go into training on it.

On any dataset the project reads (`data=fashion_mnist`, `data=folder data.root=...`), split as
training would split it:
  - class counts per split and the imbalance ratio (largest class / smallest, in train);
  - files that are not usable images (unreadable, truncated, not an image, stray), with the reason;
  - exact duplicates: identical content (file bytes, or pixels for array data), within and across
    splits, and duplicates that carry different labels;
  - near-duplicates: a 64-bit perceptual hash (DCT of a 32x32 grey thumbnail) within
    `audit.phash_distance` bits, confirmed by thumbnail correlation >= `audit.near_correlation`;
    pairs across train and val/test are reported as leakage;
  - suspected label errors: images whose k nearest neighbours in feature space mostly carry one
    other label. Features are the cache-features backbone's when a cache for this data exists
    (`command=cache-features`), else PCA of the thumbnails.

Output: report.json, a console summary, PNG example grids (exact duplicates, near-duplicates,
suspected label errors) in the run folder, all logged to MLflow. Pairwise work is chunked matrix
products in torch, so 70,000 images take seconds, not the hours a pairwise Python loop would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from image_classifier import tracking
from image_classifier.data.layouts import SPLITS
from image_classifier.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
FEATURE_SOURCES = ("auto", "cache", "pixels")  # audit.features
THUMB = 32


@dataclass
class AuditData:
    classes: list[str]
    names: list[str]  # a file path, or "<split>[<index>]" for array data
    splits: np.ndarray  # split index into SPLITS, per image
    labels: np.ndarray
    thumbs: np.ndarray  # (N, 32, 32) float32 grey, 0..255
    digests: list[str]  # content hashes
    skipped: dict[str, str] = field(default_factory=dict)
    data_hash: str = ""
    layout: str = ""
    pixels: list | None = None  # array data: (N, C, H, W) uint8 for the example grids


def _digest(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=16).hexdigest()


def _thumbs_from_arrays(images: torch.Tensor) -> np.ndarray:
    import torch

    x = images.float()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = torch.nn.functional.interpolate(
        x, size=(THUMB, THUMB), mode="bilinear", antialias=True, align_corners=False
    )
    return x[:, 0].numpy()


def _file_entry(path: str):
    """(content hash, grey thumbnail, None) or (None, None, why): each file is read once."""
    from PIL import Image

    from image_classifier.data.images import ImageError, open_bytes, to_model_mode

    try:
        data = Path(path).read_bytes()
        im = to_model_mode(open_bytes(data, path), 1).resize(
            (THUMB, THUMB), Image.Resampling.BILINEAR
        )
    except OSError as e:  # gone or unreadable since the scan
        return None, None, f"{path}: cannot read ({e.strerror or e})"
    except ImageError as e:  # changed since the scan
        return None, None, str(e)
    return _digest(data), np.asarray(im, dtype=np.float32), None


def load(cfg) -> AuditData:
    """Every image of every split as the training data module sees it."""
    from image_classifier.data.datamodule import ArrayDataset, FileDataset, build_datamodule

    dm = build_datamodule(cfg, augment_preset="none")
    info = dm.prepare()
    names, splits, labels, thumbs, digests, pixels = [], [], [], [], [], []
    skipped = dict(info.skipped)
    for s, split in enumerate(SPLITS):
        ds = dm.dataset(split)
        if ds is None or len(ds) == 0:
            continue
        if isinstance(ds, ArrayDataset):
            images = ds.images
            arr = images.numpy()
            digests += [_digest(a.tobytes()) for a in arr]
            thumbs.append(_thumbs_from_arrays(images))
            names += [f"{split}[{i}]" for i in range(len(arr))]
            labels.append(ds.labels.numpy())
            splits.append(np.full(len(arr), s))
            pixels.append(arr)
        elif isinstance(ds, FileDataset):
            with ThreadPoolExecutor(max_workers=4) as pool:
                entries = list(pool.map(_file_entry, [p for p, _ in ds.items]))
            keep = []
            for (path, y), (digest, thumb, why) in zip(ds.items, entries, strict=True):
                if thumb is None:
                    skipped[path] = why
                    continue
                keep.append((path, y, digest, thumb))
            names += [p for p, *_ in keep]
            labels.append(np.array([y for _, y, *_ in keep], dtype=np.int64))
            digests += [d for *_, d, _ in keep]
            thumbs.append(
                np.stack([t for *_, t in keep]) if keep else np.zeros((0, THUMB, THUMB), np.float32)
            )
            splits.append(np.full(len(keep), s))
        else:
            raise UserError(f"audit cannot read a {type(ds).__name__} dataset.")
    return AuditData(
        classes=list(info.classes),
        names=names,
        splits=np.concatenate(splits),
        labels=np.concatenate(labels).astype(np.int64),
        thumbs=np.concatenate(thumbs),
        digests=digests,
        skipped=skipped,
        data_hash=info.data_hash,
        layout=info.layout,
        pixels=np.concatenate(pixels) if pixels else None,
    )


# -- checks ---------------------------------------------------------------------------------------
def class_counts(d: AuditData) -> dict:
    out = {}
    for s, split in enumerate(SPLITS):
        mask = d.splits == s
        if mask.any():
            c = np.bincount(d.labels[mask], minlength=len(d.classes))
            out[split] = {name: int(n) for name, n in zip(d.classes, c, strict=True)}
    train = np.array(list(out.get("train", {}).values()))
    ratio = float(train.max() / max(train.min(), 1)) if len(train) else None
    return {
        "per_split": out,
        "imbalance_ratio": ratio,
        "empty_classes": [c for c, n in out.get("train", {}).items() if n == 0],
    }


def exact_duplicates(d: AuditData) -> list[list[int]]:
    groups = defaultdict(list)
    for i, h in enumerate(d.digests):
        groups[h].append(i)
    return [g for g in groups.values() if len(g) > 1]


def dct_matrix(n: int) -> torch.Tensor:
    import torch

    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(torch.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    m[0] *= 1 / np.sqrt(2)
    return (m * np.sqrt(2 / n)).float()


def perceptual_hash(thumbs: np.ndarray) -> torch.Tensor:
    """pHash: 8x8 lowest DCT frequencies of the 32x32 thumbnail vs their median -> (N, 64) bits."""
    import torch

    D = dct_matrix(THUMB)
    low = (D @ torch.from_numpy(thumbs) @ D.T)[:, :8, :8].reshape(len(thumbs), 64)
    median = low[:, 1:].median(dim=1, keepdim=True).values
    return low > median


def _pairs_within(x: torch.Tensor, threshold: float, chunk: int = 2048):
    """(i, j) with i < j and x_i . x_j >= threshold, in chunks (x: N x d float)."""
    import torch

    out = []
    for start in range(0, len(x), chunk):
        sim = x[start : start + chunk] @ x.T
        i, j = torch.nonzero(sim >= threshold, as_tuple=True)
        i = i + start
        keep = i < j
        out.append(torch.stack([i[keep], j[keep]], 1))
    return torch.cat(out) if out else torch.zeros((0, 2), dtype=torch.long)


def near_duplicates(
    d: AuditData, max_distance: int, min_correlation: float, exact: set
) -> list[dict]:
    import torch

    bits = perceptual_hash(d.thumbs)
    signs = bits.float() * 2 - 1  # hamming = (64 - s.s') / 2
    pairs = _pairs_within(signs, 64 - 2 * max_distance - 0.5)
    if len(pairs) == 0:
        return []
    flat = torch.from_numpy(d.thumbs.reshape(len(d.thumbs), -1))
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)
    out = []
    for start in range(0, len(pairs), 200_000):
        p = pairs[start : start + 200_000]
        corr = (flat[p[:, 0]] * flat[p[:, 1]]).sum(1)
        ham = ((64 - (signs[p[:, 0]] * signs[p[:, 1]]).sum(1)) / 2).round()
        for (i, j), c, h in zip(p.tolist(), corr.tolist(), ham.tolist(), strict=True):
            if c >= min_correlation and (i, j) not in exact:
                out.append({"a": i, "b": j, "hamming": int(h), "correlation": round(c, 4)})
    return out


def _pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Centre, project on the top principal axes (fitted on up to 20,000 rows), L2-normalise."""
    import torch

    x = x - x.mean(0, keepdim=True)
    dims = max(1, min(dims, x.shape[0] - 1, x.shape[1]))
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20000]]
    _, _, v = torch.linalg.svd(sample, full_matrices=False)
    z = x @ v[:dims].T
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-6)


def features(d: AuditData, cfg, source: str) -> tuple[torch.Tensor, str]:
    """Per image, L2-normalised: the cache-features backbone's features, or the thumbnails' pixels;
    both reduced by PCA so that the all-pairs neighbour search stays a few seconds at 70,000."""
    import torch

    if source not in FEATURE_SOURCES:
        raise UserError(f"audit.features={source!r} is not one of auto, cache, pixels.")
    if source in ("auto", "cache"):
        cached = _cached_features(d, cfg)
        if cached is not None:
            x, name = cached
            return _pca(
                x, int(cfg.audit.feature_dims)
            ), f"{name}, PCA-{min(int(cfg.audit.feature_dims), x.shape[1])}"
        if source == "cache":
            raise UserError(
                "audit.features=cache, but no feature cache matches this data and backbone. Build "
                "it with `uv run python commands.py command=cache-features` (same data options), "
                "or "
                "use audit.features=pixels."
            )
    x = torch.from_numpy(d.thumbs.reshape(len(d.thumbs), -1))
    return _pca(x, 64), "pixels (PCA-64 of 32x32 thumbnails)"


def _cached_features(d: AuditData, cfg):
    import torch

    from image_classifier.data.features import read_manifest
    from image_classifier.training.features import cache_folder

    folder, key = cache_folder(cfg, d.data_hash)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("key") != key:
        return None
    parts = []
    for split in SPLITS:
        f = folder / f"{split}_features.npy"
        if f.exists():
            parts.append(np.load(f, mmap_mode="r"))
    x = torch.from_numpy(np.concatenate(parts).astype(np.float32))
    if len(x) != len(d.labels):  # unreadable files dropped since the cache was built
        return None
    return x, f"{manifest['backbone']} features from the cache ({folder.name})"


def label_errors(
    d: AuditData, x: torch.Tensor, k: int, min_vote: float, chunk: int = 1024
) -> list[dict]:
    """Images whose k nearest neighbours (cosine) mostly carry one other label."""
    import torch

    n, c = len(x), len(d.classes)
    k = min(k, n - 1)
    if k < 1:
        return []
    labels = torch.from_numpy(d.labels)
    out = []
    for start in range(0, n, chunk):
        sim = x[start : start + chunk] @ x.T
        rows = torch.arange(start, min(start + chunk, n))
        sim[torch.arange(len(rows)), rows] = -2  # not its own neighbour
        nn = sim.topk(k, dim=1).indices
        votes = torch.zeros(len(rows), c).scatter_add_(1, labels[nn], torch.ones(nn.shape)) / k
        share, top = votes.max(1)
        own = votes[torch.arange(len(rows)), labels[rows]]
        for r in torch.nonzero((top != labels[rows]) & (share >= min_vote)).flatten().tolist():
            i = start + r
            out.append(
                {
                    "index": i,
                    "given": int(labels[i]),
                    "suggested": int(top[r]),
                    "vote": round(float(share[r]), 3),
                    "own_vote": round(float(own[r]), 3),
                }
            )
    out.sort(key=lambda e: (-e["vote"], e["own_vote"]))
    return out


# -- report ---------------------------------------------------------------------------------------
def _who(d: AuditData, i: int) -> dict:
    return {
        "name": d.names[i],
        "split": SPLITS[int(d.splits[i])],
        "label": d.classes[int(d.labels[i])],
    }


def run_audit(cfg) -> dict:
    started = time.perf_counter()
    a = cfg.audit
    d = load(cfg)
    if len(d.labels) == 0:
        raise UserError("No readable images to audit.")
    timings = {"load": time.perf_counter() - started}
    with _timed(timings, "exact"):
        groups = exact_duplicates(d)
        exact_pairs = {(i, j) for g in groups for i in g for j in g if i < j}
    with _timed(timings, "near"):
        near = near_duplicates(d, int(a.phash_distance), float(a.near_correlation), exact_pairs)
    with _timed(timings, "labels"):
        x, feature_source = features(d, cfg, str(a.features))
        suspects = label_errors(d, x, int(a.neighbours), float(a.min_vote))
    report = build_report(cfg, d, groups, near, suspects, feature_source)
    out = Path(cfg.paths.output_dir) / "audit"
    out.mkdir(parents=True, exist_ok=True)
    with _timed(timings, "grids"):
        grids = _grids(d, groups, near, suspects, out, int(a.examples))
    timings["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    run_id = _log_mlflow(cfg, report, out, d.data_hash)
    _summary(report, out, run_id)
    return {"report": report, "dir": str(out), "mlflow_run_id": run_id, "grids": grids}


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t


def build_report(cfg, d: AuditData, groups, near, suspects, feature_source: str) -> dict:
    a = cfg.audit

    def leak(i, j):  # a pair that joins train and val/test
        return d.splits[i] != d.splits[j] and 0 in (d.splits[i], d.splits[j])

    dup_report = [
        {
            "images": [_who(d, i) for i in g],
            "splits": sorted({SPLITS[int(d.splits[i])] for i in g}),
            "conflicting_labels": len({int(d.labels[i]) for i in g}) > 1,
        }
        for g in groups
    ]
    near_report = [{**_pair(d, e), "leak": bool(leak(e["a"], e["b"]))} for e in near]
    label_report = [
        {
            **_who(d, e["index"]),
            "suggested": d.classes[e["suggested"]],
            "neighbour_vote": e["vote"],
            "own_label_vote": e["own_vote"],
        }
        for e in suspects
    ]
    return {
        "data": {
            "name": cfg.data.name,
            "layout": d.layout,
            "hash": d.data_hash,
            "images": len(d.labels),
            "classes": d.classes,
        },
        "class_counts": class_counts(d),
        "unusable_files": [{"path": p, "reason": why} for p, why in sorted(d.skipped.items())],
        "exact_duplicates": {
            "groups": len(groups),
            "extra_copies": sum(len(g) - 1 for g in groups),
            "across_splits": sum(1 for g in dup_report if len(g["splits"]) > 1),
            "conflicting_labels": sum(1 for g in dup_report if g["conflicting_labels"]),
            "items": dup_report,
        },
        "near_duplicates": {
            "pairs": len(near_report),
            "leaks_train_to_eval": sum(1 for e in near_report if e["leak"]),
            "method": f"pHash within {a.phash_distance} bits and thumbnail correlation >= "
            f"{a.near_correlation}",
            "items": near_report,
        },
        "label_errors": {
            "suspects": len(label_report),
            "features": feature_source,
            "method": f"{a.neighbours} nearest neighbours (cosine); flagged when >= "
            f"{a.min_vote:.0%} of them share one other label",
            "items": label_report,
        },
        "settings": {k: v for k, v in cfg.audit.items()},
    }


def _pair(d: AuditData, e: dict) -> dict:
    return {
        "a": _who(d, e["a"]),
        "b": _who(d, e["b"]),
        "hamming": e["hamming"],
        "correlation": e["correlation"],
    }


def _image(d: AuditData, i: int) -> np.ndarray:
    if d.pixels is not None:
        p = d.pixels[i]
        return p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)

    from image_classifier.data.images import open_image

    im = open_image(d.names[i])
    im.thumbnail((128, 128))
    return np.asarray(im.convert("RGB"))


def _grids(d: AuditData, groups, near, suspects, out: Path, n: int) -> list[str]:
    """PNG grids: one row per example; the titles say what each image is."""

    def short(i):
        split, label = SPLITS[int(d.splits[i])], d.classes[int(d.labels[i])]
        return f"{Path(d.names[i]).name[-18:]}\n{split} · {label}"

    def pair(e):
        detail = f"\n{e['hamming']} bits, r={e['correlation']:.3f}"
        return [(e["a"], short(e["a"])), (e["b"], short(e["b"]) + detail)]

    def suspect(e):
        return e["index"], short(e["index"]) + f"\n→ {d.classes[e['suggested']]}? ({e['vote']:.0%})"

    leaks_first = sorted(near, key=lambda e: (d.splits[e["a"]] == d.splits[e["b"]], e["hamming"]))
    made = [
        _grid(
            d,
            [[(i, short(i)) for i in g[:4]] for g in groups[:n]],
            "Exact duplicates",
            out / "exact_duplicates.png",
        ),
        _grid(
            d,
            [pair(e) for e in leaks_first[:n]],
            "Near-duplicates (leaks across splits first)",
            out / "near_duplicates.png",
        ),
        _grid(
            d,
            _chunks([suspect(e) for e in suspects[: n * 4]], 4),
            "Suspected label errors: given label → what the neighbours say",
            out / "label_errors.png",
        ),
    ]
    return [m for m in made if m]


def _grid(d: AuditData, rows: list[list[tuple[int, str]]], title: str, path: Path) -> str | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.4 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for c, (i, caption) in enumerate(row):
            img = _image(d, i)
            axes[r][c].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            axes[r][c].set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _log_mlflow(cfg, report: dict, out: Path, data_hash: str) -> str | None:
    tags = {**tracking.lineage_tags(cfg.paths.root, data_hash), "command": "audit"}
    logger = tracking.create_logger(cfg, run_name=f"audit-{cfg.data.name}", tags=tags)
    if logger is None:  # logger.enabled=false
        return None
    metrics = {
        "images": report["data"]["images"],
        "unusable_files": len(report["unusable_files"]),
        "exact_duplicate_groups": report["exact_duplicates"]["groups"],
        "exact_duplicates_across_splits": report["exact_duplicates"]["across_splits"],
        "near_duplicate_pairs": report["near_duplicates"]["pairs"],
        "near_duplicate_leaks": report["near_duplicates"]["leaks_train_to_eval"],
        "suspected_label_errors": report["label_errors"]["suspects"],
        "imbalance_ratio": report["class_counts"]["imbalance_ratio"] or 0.0,
        "seconds": report["seconds"]["total"],
    }
    tracking.log_metrics(logger, metrics)
    tracking.log_params(logger, {f"audit.{k}": v for k, v in report["settings"].items()})
    tracking.log_artifacts(logger, [out], artifact_path="audit")
    tracking.finish(logger)
    return logger.run_id


def _summary(r: dict, out: Path, run_id: str | None) -> None:
    c = r["class_counts"]
    train = c["per_split"].get("train", {})
    lines = [
        f"Audit of {r['data']['name']} ({r['data']['layout']}): {r['data']['images']:,} images, "
        f"{len(r['data']['classes'])} classes, in {r['seconds']['total']:.1f}s",
        "  splits: "
        + ", ".join(f"{s} {sum(v.values()):,}" for s, v in c["per_split"].items())
        + (
            f"; train imbalance {c['imbalance_ratio']:.1f}x (largest/smallest class)"
            if train
            else ""
        )
        + (f"; EMPTY classes: {', '.join(c['empty_classes'])}" if c["empty_classes"] else ""),
        f"  unusable files: {len(r['unusable_files'])}"
        + "".join(f"\n    {Path(u['path']).name}: {u['reason']}" for u in r["unusable_files"][:5]),
        f"  exact duplicates: {r['exact_duplicates']['groups']} groups "
        f"({r['exact_duplicates']['extra_copies']} extra "
        f"copies), {r['exact_duplicates']['across_splits']} across splits, "
        f"{r['exact_duplicates']['conflicting_labels']} with conflicting labels",
        f"  near-duplicates: {r['near_duplicates']['pairs']} pairs, "
        f"{r['near_duplicates']['leaks_train_to_eval']} leak train into val/test",
        f"  suspected label errors: {r['label_errors']['suspects']} "
        f"({r['label_errors']['features']})",
        f"  report: {out / 'report.json'}; example grids: {out}/*.png"
        + (f"; mlflow run {run_id}" if run_id else ""),
    ]
    print("\n".join(lines))
