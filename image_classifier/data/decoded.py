"""The decoded-image cache (`data.cache=decoded`): every image decoded once, reused every epoch.

Decoding JPEG/PNG files and resizing them costs the same on every epoch; FFCV and DALI avoid it by
decoding once into a compact array format. Here the first use runs every image through the one
preprocessing (`images.load_array`, what `infer` and `serve` run too) into a uint8 array at the
training size, and training reads batches from that array by indexing.

Format: one folder per key under `data.cache_dir` holding `<split>_images.npy` (uint8
[n, channels, height, width]; opened memory-mapped, so it costs page cache, not process memory),
`<split>_labels.npy` (int64 [n], or float32 [n, classes] for multi-label data) and
`manifest.json`. The key hashes what the pixels depend on: the data's content hash (every file's
SHA-256, path, label and split), the preprocessing and `FORMAT_VERSION`; change any and a new
folder is built. A build writes into a temporary folder renamed into place after the manifest, so
an interrupted build never leaves a cache that reads as complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from image_classifier.data.cachedir import building, read_manifest, write_manifest
from image_classifier.data.images import Preprocessing

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: JPEGs decoded at a reduced scale (images.open_image's fit)


def cache_key(data_hash: str, pre: Preprocessing, classes: list[str]) -> str:
    """The labels are indices into `classes`: the same files read with another class list
    (data.classes, a model's classes in `test`) are another cache."""
    parts = {
        "format": FORMAT_VERSION,
        "data": data_hash,
        "preprocessing": pre.to_dict(),
        "classes": list(classes),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def size_bytes(counts: dict[str, int], pre: Preprocessing) -> int:
    """The cache's size on disk: one uint8 per pixel and channel."""
    h, w = pre.size
    return sum(counts.values()) * pre.channels * h * w


def load(folder: Path, key: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{split: (images, labels)} from a complete cache with this key, else None. Images stay
    memory-mapped (copy-on-write, so torch gets a writable view without a copy)."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("key") != key:
        return None
    out = {}
    for split in manifest["counts"]:
        images = np.load(folder / f"{split}_images.npy", mmap_mode="c")
        labels = np.load(folder / f"{split}_labels.npy")
        out[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    return out


def fits(folder: Path, needed: int, max_gb: float) -> str | None:
    """Why a cache of `needed` bytes should not be built here, or None when it fits."""
    if needed > max_gb * 1e9:
        return f"it would take {size_text(needed)}, over data.cache_max_gb={max_gb:g}"
    probe = folder.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * 1.1 > free:
        return f"it would take {size_text(needed)} and {probe} has {size_text(free)} free"
    return None


def size_text(n: float) -> str:
    """'1.2 GB', '14 MB', '240 kB': a small cache on a full disk read "0.0 GB and 0.0 GB free"."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def build(folder: Path, key: str, datasets: dict, describe: dict, workers: int) -> None:
    """Decode every split of `datasets` ({split: Dataset of (uint8 CHW, label)}) into `folder`,
    atomically; `describe` goes into the manifest."""
    started = time.perf_counter()
    with building(folder) as tmp:
        counts = {s: _write_split(tmp, s, ds, workers) for s, ds in datasets.items()}
        manifest = {
            "key": key,
            "format": FORMAT_VERSION,
            **describe,
            "counts": counts,
            "dtype": "uint8",
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_manifest(tmp, manifest)


def _write_split(tmp: Path, split: str, ds, workers: int) -> int:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from image_classifier.data.device import collate

    n = len(ds)
    # its own generator: building must not move the global RNG (a run that builds the cache and
    # one that reads it start training from the same random state)
    loader = DataLoader(
        ds, batch_size=256, num_workers=workers, collate_fn=collate, generator=torch.Generator()
    )
    images = labels = None
    i = 0
    for x, y in tqdm(loader, desc=f"decoding {split}", leave=False, disable=n < 2000 or None):
        if images is None:
            images = np.lib.format.open_memmap(
                tmp / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(n, *x.shape[1:])
            )
            y = torch.as_tensor(y)
            labels = np.zeros((n, *y.shape[1:]), dtype=np.float32 if y.ndim > 1 else np.int64)
        images[i : i + len(x)] = x.numpy()
        labels[i : i + len(x)] = np.asarray(y)
        i += len(x)
    if images is None:  # an empty split (e.g. no test images): zero rows of the right shape
        images = np.zeros((0, 1, 1, 1), dtype=np.uint8)
        labels = np.zeros(0, dtype=np.int64)
        np.save(tmp / f"{split}_images.npy", images)
    else:
        images.flush()
        del images
    np.save(tmp / f"{split}_labels.npy", labels)
    return n
