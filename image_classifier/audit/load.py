"""Every image of every split, as the training data module sees it, read once: content hash,
grey 32x32 thumbnail (and, for colour data, a 16x16 colour one), original size and mode (for the
image-quality checks)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from image_classifier.data.identity import SPLITS
from image_classifier.errors import UserError

if TYPE_CHECKING:
    import torch

THUMB = 32
COLOUR_THUMB = 16  # the colour thumbnail's side: the near-duplicate check's colour channels


@dataclass
class AuditData:
    classes: list[str]
    names: list[str]  # a file path, or "<split>[<index>]" for array data
    splits: np.ndarray  # split index into SPLITS, per image
    labels: np.ndarray
    thumbs: np.ndarray  # (N, 32, 32) float32 grey, 0..255
    colour: np.ndarray | None  # colour data: (N, 3, 16, 16) uint8 RGB; grey data: None
    digests: list[str]  # content hashes
    sizes: np.ndarray  # (N, 2) original width, height
    grey: np.ndarray  # (N,) bool: the file itself is grey
    colour_data: bool = False  # the data set is colour (its model takes 3 channels)
    skipped: dict[str, str] = field(default_factory=dict)
    data_hash: str = ""
    layout: str = ""
    pixels: np.ndarray | None = None  # array data: (N, C, H, W) uint8 for the example grids
    left_out: dict[str, int] = field(default_factory=dict)  # images of classes not in data.classes
    multi_label: list[str] | None = None  # multi-label data: its labels (classes: their sets)
    label_sets: list[tuple] | None = None  # multi-label data: each image's labels, by index
    grey_white: int | None = None  # 16-bit greys: the level shown as white (Preprocessing's)


def _digest(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=16).hexdigest()


def _thumbs_from_arrays(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """(grey thumbnails, colour thumbnails or None) of (N, C, H, W) arrays."""
    import torch

    def shrink(x, side: int):
        return torch.nn.functional.interpolate(
            x, size=(side, side), mode="bilinear", antialias=True, align_corners=False
        )

    x = images.float()
    if x.shape[1] != 3:
        return shrink(x, THUMB)[:, 0].numpy(), None
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    colour = shrink(x, COLOUR_THUMB).round().clamp(0, 255).to(torch.uint8).numpy()
    return shrink(grey, THUMB)[:, 0].numpy(), colour


def _file_entry(path: str, colour_data: bool = True, white: int | None = None):
    """(hash, grey thumbnail, colour thumbnail (None for grey data), (w, h), grey, None), or
    Nones and why. `white`: 16-bit greys' white (Preprocessing.grey_white)."""
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
        thumb = to_model_mode(im, 1, white).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
        side = (COLOUR_THUMB, COLOUR_THUMB)
        colour = (
            to_model_mode(im, 3, white).resize(side, Image.Resampling.BILINEAR)
            if colour_data
            else None
        )
    except OSError as e:  # gone or unreadable since the scan
        return None, None, None, None, None, f"{path}: cannot read ({e.strerror or e})"
    except ImageError as e:  # changed since the scan
        return None, None, None, None, None, str(e)
    colour = None if colour is None else np.asarray(colour, dtype=np.uint8).transpose(2, 0, 1)
    return _digest(data), np.asarray(thumb, dtype=np.float32), colour, size, grey, None


def load(cfg) -> AuditData:
    # the splits as training sees them, without the data module (Lightning's import alone took
    # 3 s of an audit's 20 on photos-7)
    from image_classifier.data.splits import load_splits

    datasets, info = load_splits(cfg.data, project_root=cfg.paths.root)
    parts, skipped = [], dict(info.skipped)
    for s, split in enumerate(SPLITS):
        ds = datasets[split]
        if len(ds):
            parts.append(_split_entries(ds, split, s, skipped, info.preprocessing))
    merged = {k: [x for p in parts for x in p[k]] for k in ("names", "digests", "labels")}
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("splits", "thumbs")}
    cat |= {k: np.concatenate([p[k] for p in parts]) for k in ("sizes", "grey")}
    pixels = [p["pixels"] for p in parts if p["pixels"] is not None]
    colour_data = info.preprocessing.channels == 3
    classes, labels = list(info.classes), merged["labels"]
    classes, labels = label_sets(classes, labels) if info.multi_label else (classes, labels)
    return AuditData(
        classes=classes,
        names=merged["names"],
        digests=merged["digests"],
        splits=cat["splits"],
        labels=np.asarray(labels, dtype=np.int64),
        thumbs=cat["thumbs"],
        colour=np.concatenate([p["colour"] for p in parts]) if colour_data else None,
        sizes=cat["sizes"],
        grey=cat["grey"].astype(bool),
        colour_data=colour_data,
        skipped=skipped,
        data_hash=info.data_hash,
        layout=info.layout,
        pixels=np.concatenate(pixels) if pixels else None,
        left_out=info.left_out,
        multi_label=list(info.classes) if info.multi_label else None,
        label_sets=merged["labels"] if info.multi_label else None,
        grey_white=info.preprocessing.grey_white,
    )


def label_sets(classes: list[str], labels: list[tuple]) -> tuple[list[str], np.ndarray]:
    """Multi-label data's classes as its label sets ("cat;dog"): what the report names per image,
    what duplicates with other labels and per-class sharpness compare. The counts and the label
    check read each label (`AuditData.label_sets`)."""
    names = [";".join(classes[j] for j in sorted(t)) or "(no label)" for t in labels]
    combos = sorted(set(names))
    index = {c: i for i, c in enumerate(combos)}
    return combos, np.array([index[n] for n in names], dtype=np.int64)


def _split_entries(ds, split: str, s: int, skipped: dict, pre) -> dict:
    """`pre`: the data's Preprocessing (a dataset read from the decoded cache has none of its
    own: after `train` had built one, the audit stopped on it)."""
    from image_classifier.data.datasets import ArrayDataset, FileDataset

    colour_data = pre.channels == 3

    if isinstance(ds, ArrayDataset) and ds.items is None:  # arrays, not decoded files
        arr = ds.images.numpy()
        n, c, h, w = arr.shape
        thumbs, colour = _thumbs_from_arrays(ds.images)
        return {
            "names": [f"{split}[{i}]" for i in range(n)],
            "digests": [_digest(a.tobytes()) for a in arr],
            "splits": np.full(n, s),
            "labels": ds.labels.tolist(),
            "thumbs": thumbs,
            "colour": colour,
            "sizes": np.tile([w, h], (n, 1)),
            "grey": np.full(n, c == 1),
            "pixels": arr,
        }
    if not isinstance(ds, FileDataset | ArrayDataset):
        raise UserError(f"audit cannot read a {type(ds).__name__} dataset.")
    with ThreadPoolExecutor(max_workers=4) as pool:
        entries = list(
            pool.map(
                partial(_file_entry, colour_data=colour_data, white=pre.grey_white),
                [p for p, _ in ds.items],
            )
        )
    keep = []
    for (path, y), (digest, thumb, colour, size, grey, why) in zip(ds.items, entries, strict=True):
        if thumb is None:
            skipped[path] = why
        else:
            keep.append((path, y, digest, thumb, size, grey, colour))
    side = (COLOUR_THUMB, COLOUR_THUMB)
    return {
        "names": [k[0] for k in keep],
        "digests": [k[2] for k in keep],
        "splits": np.full(len(keep), s),
        "labels": [k[1] for k in keep],
        "thumbs": np.stack([k[3] for k in keep]) if keep else np.zeros((0, THUMB, THUMB), "f4"),
        "sizes": np.array([k[4] for k in keep], dtype=np.int64).reshape(-1, 2),
        "grey": np.array([k[5] for k in keep], dtype=bool),
        "colour": np.stack([k[6] for k in keep])
        if keep and colour_data
        else np.zeros((0, 3, *side), "u1"),
        "pixels": None,
    }
