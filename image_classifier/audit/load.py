"""Every image of every split, as the training data module sees it, read once: content hash,
grey 32x32 thumbnail, original size and mode (for the image-quality checks)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from image_classifier.data.identity import SPLITS
from image_classifier.errors import UserError

if TYPE_CHECKING:
    import torch

THUMB = 32


@dataclass
class AuditData:
    classes: list[str]
    names: list[str]  # a file path, or "<split>[<index>]" for array data
    splits: np.ndarray  # split index into SPLITS, per image
    labels: np.ndarray
    thumbs: np.ndarray  # (N, 32, 32) float32 grey, 0..255
    digests: list[str]  # content hashes
    sizes: np.ndarray  # (N, 2) original width, height
    grey: np.ndarray  # (N,) bool: the file itself is grey
    colour_data: bool = False  # the data set is colour (its model takes 3 channels)
    skipped: dict[str, str] = field(default_factory=dict)
    data_hash: str = ""
    layout: str = ""
    pixels: np.ndarray | None = None  # array data: (N, C, H, W) uint8 for the example grids
    left_out: dict[str, int] = field(default_factory=dict)  # images of classes not in data.classes


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
    """(hash, thumbnail, (w, h), grey, None) or (None, None, None, None, why)."""
    from PIL import Image

    from image_classifier.data.images import (
        GREY_MODES,
        ImageError,
        header,
        open_bytes,
        to_model_mode,
    )

    try:
        data = Path(path).read_bytes()
        mode, size = header(path, data=data)
        im = open_bytes(data, path, fit=THUMB)  # a JPEG decoded at up to 1/8 scale
        grey = mode in GREY_MODES
        thumb = to_model_mode(im, 1).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    except OSError as e:  # gone or unreadable since the scan
        return None, None, None, None, f"{path}: cannot read ({e.strerror or e})"
    except ImageError as e:  # changed since the scan
        return None, None, None, None, str(e)
    return _digest(data), np.asarray(thumb, dtype=np.float32), size, grey, None


def load(cfg) -> AuditData:
    # the splits as training sees them, without the data module (Lightning's import alone took
    # 3 s of an audit's 20 on photos-7)
    from image_classifier.data.splits import load_splits

    datasets, info = load_splits(cfg.data, project_root=cfg.paths.root)
    parts, skipped = [], dict(info.skipped)
    for s, split in enumerate(SPLITS):
        ds = datasets[split]
        if len(ds):
            parts.append(_split_entries(ds, split, s, skipped))
    merged = {k: [x for p in parts for x in p[k]] for k in ("names", "digests")}
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("splits", "labels", "thumbs")}
    cat |= {k: np.concatenate([p[k] for p in parts]) for k in ("sizes", "grey")}
    pixels = [p["pixels"] for p in parts if p["pixels"] is not None]
    return AuditData(
        classes=list(info.classes),
        names=merged["names"],
        digests=merged["digests"],
        splits=cat["splits"],
        labels=cat["labels"].astype(np.int64),
        thumbs=cat["thumbs"],
        sizes=cat["sizes"],
        grey=cat["grey"].astype(bool),
        colour_data=info.preprocessing.channels == 3,
        skipped=skipped,
        data_hash=info.data_hash,
        layout=info.layout,
        pixels=np.concatenate(pixels) if pixels else None,
        left_out=info.left_out,
    )


def _split_entries(ds, split: str, s: int, skipped: dict) -> dict:
    from image_classifier.data.datasets import ArrayDataset, FileDataset

    if isinstance(ds, ArrayDataset) and ds.items is None:  # arrays, not decoded files
        arr = ds.images.numpy()
        n, c, h, w = arr.shape
        return {
            "names": [f"{split}[{i}]" for i in range(n)],
            "digests": [_digest(a.tobytes()) for a in arr],
            "splits": np.full(n, s),
            "labels": ds.labels.numpy(),
            "thumbs": _thumbs_from_arrays(ds.images),
            "sizes": np.tile([w, h], (n, 1)),
            "grey": np.full(n, c == 1),
            "pixels": arr,
        }
    if not isinstance(ds, FileDataset | ArrayDataset):
        raise UserError(f"audit cannot read a {type(ds).__name__} dataset.")
    with ThreadPoolExecutor(max_workers=4) as pool:
        entries = list(pool.map(_file_entry, [p for p, _ in ds.items]))
    keep = []
    for (path, y), (digest, thumb, size, grey, why) in zip(ds.items, entries, strict=True):
        if thumb is None:
            skipped[path] = why
        else:
            keep.append((path, y, digest, thumb, size, grey))
    return {
        "names": [k[0] for k in keep],
        "digests": [k[2] for k in keep],
        "splits": np.full(len(keep), s),
        "labels": np.array([k[1] for k in keep], dtype=np.int64),
        "thumbs": np.stack([k[3] for k in keep]) if keep else np.zeros((0, THUMB, THUMB), "f4"),
        "sizes": np.array([k[4] for k in keep], dtype=np.int64).reshape(-1, 2),
        "grey": np.array([k[5] for k in keep], dtype=bool),
        "pixels": None,
    }
