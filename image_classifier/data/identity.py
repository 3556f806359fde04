"""What a data set is, independent of how it is batched: what the model file records about it
(`DataInfo`), the content hash that names it (and its caches), its files' names relative to its
root, and the stratified split of a training set into train and
validation, and how imbalanced its classes are."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from image_classifier.data.images import Preprocessing


def stratified_indices(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = []
    frac = n_val / len(labels)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(rng.permutation(idx)[: round(len(idx) * frac)])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def content_hash(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def relative_name(p: str, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return str(p)


def class_change(model: list[str], data: list[str], sides=("the model", "the data")) -> str:
    """How the data's class names differ from a model's: '; only in the data: ...; only in the
    model: ...', or '; the same names in another order' (`sides`: what to call the two)."""
    extra = [c for c in data if c not in model]
    missing = [c for c in model if c not in data]
    if not extra and not missing:
        return "; the same names in another order"
    return (f"; only in {sides[1]}: {', '.join(extra[:10])}" if extra else "") + (
        f"; only in {sides[0]}: {', '.join(missing[:10])}" if missing else ""
    )


IMBALANCED = 10  # largest/smallest train class at which train's summary says so


def imbalance_ratio(counts) -> float | None:
    """Images in the largest class over the smallest (an empty class counts as 1); None for no
    classes. One figure for train's summary and the audit."""
    counts = np.asarray(list(counts), dtype=float)
    return float(counts.max() / max(counts.min(), 1)) if len(counts) else None


@dataclass
class DataInfo:
    """What the model file records about its data."""

    name: str
    classes: list[str]
    preprocessing: Preprocessing
    class_counts: list[int]
    split_sizes: dict[str, int]
    data_hash: str
    layout: str
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = ""
    multi_label: bool = False
    cache: str = ""  # the decoded-image cache folder the splits are read from, if any
