"""The feature cache's format: what `command=cache-features` writes and `model=head` reads.

Building it (running a backbone) is `image_classifier/training/features.py`. Format: one folder
per cache key under `features.dir`, holding `<split>_features.npy` (float16, [n, dim];
`np.load(..., mmap_mode="r")` maps it without reading) and `<split>_labels.npy`, plus
`manifest.json` and `parity_images.npy` (up to 64 validation images, uint8 at the backbone's
input size: a head's checkpoint carries them, so its ONNX export is checked on real images).
The key hashes everything the features depend on: the data's content hash, the backbone, its
weights, the preprocessing and this code's format version. A build writes into a
temporary folder and renames it into place after the manifest, so an interrupted build never
leaves a cache that reads as complete; a second run with nothing changed does nothing and says so.
Training reads it through `FeatureDataModule` (data/datamodule.py); this module imports neither
torch nor Lightning, so the audit can look for a cache without them. Below it, the audit's store
of backbone features per image content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from image_classifier.data.cachedir import building, one_builder, read_manifest, write_manifest
from image_classifier.data.images import Preprocessing

# 2: JPEGs decoded at a reduced scale (images.open_image's fit); 3: the audit's decoded so too
FORMAT_VERSION = 3
PARITY_FILE = "parity_images.npy"  # absent from caches built before 2026-12-04


def backbone_preprocessing(fcfg, data=None) -> Preprocessing:
    """cfg.features' preprocessing; with `data` (cfg.data), 16-bit greys read by its grey white
    (profile.grey_white), as training reads them."""
    from image_classifier.data.profile import grey_white

    ch = int(fcfg.channels)
    return Preprocessing(
        size=tuple(fcfg.size),
        channels=ch,
        mean=tuple(fcfg.mean),
        std=tuple(fcfg.std),
        resize=fcfg.get("resize", "stretch"),
        grey_white=grey_white(data)[0] if data is not None else None,
    )


def cache_key(data_hash: str, fcfg, pre: Preprocessing, weights: str, classes: list) -> str:
    """The cache's key: everything its features and labels depend on. `weights`:
    models.pretrained's weights_id of the backbone; `classes`: the list its labels index."""
    parts = {
        "format": FORMAT_VERSION,
        "data": data_hash,
        "classes": list(classes),
        "backbone": fcfg.backbone,
        "weights": weights,
        "preprocessing": pre.to_dict(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_folder(cfg, data_hash: str, weights: str, classes: list) -> tuple[Path, str]:
    """(folder, key) where the cache for this data and cfg.features lives (built or not)."""
    fcfg = cfg.features
    key = cache_key(data_hash, fcfg, backbone_preprocessing(fcfg, cfg.data), weights, classes)
    return Path(fcfg.dir) / key, key


# -- the audit's backbone features, kept per image content ------------------------------------
# The audit computes a backbone's features of every image it audits. They depend only on the
# image's bytes, the backbone, its weights and the input side, not on the image's label, name or
# folder; kept under `<features.dir>/by-image/<key>/` by content hash, the audit that follows a
# relabelling (move a file to its right class, audit again) computes only the images it has not
# seen. 2 KB an image for EfficientNet-Lite0 (432 float32 values: its last two stages); delete the
# folder to reclaim the space.
def image_store_folder(fcfg, weights: str, side: int, view: str) -> Path:
    """The per-image store for cfg.features' backbone with these weights (weights_id) at this
    input side; `view` names which of its outputs are kept."""
    parts = {
        "format": FORMAT_VERSION,
        "view": view,
        "backbone": fcfg.backbone,
        "weights": weights,
        "side": int(side),
        "channels": int(fcfg.channels),
        "mean": [float(m) for m in fcfg.mean],
        "std": [float(s) for s in fcfg.std],
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return Path(fcfg.dir) / "by-image" / key


def _load_store(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(digests, features memory-mapped) of a complete, readable store, else None."""
    try:
        if read_manifest(folder) is None:
            return None
        digests = np.load(folder / "digests.npy")
        features = np.load(folder / "features.npy", mmap_mode="r")
    except (OSError, ValueError):  # unreadable: every image is computed again
        return None
    return (digests, features) if len(features) == len(digests) else None


def read_image_features(folder: Path, digests: list[str]) -> tuple[list[int], np.ndarray]:
    """(the positions in `digests` the store holds, their features [m, dim] float32)."""
    store = _load_store(folder)
    if store is None:
        return [], np.zeros((0, 0), np.float32)
    row = {d: i for i, d in enumerate(store[0].tolist())}
    found = [k for k, d in enumerate(digests) if d in row]
    return found, np.asarray(store[1][[row[digests[k]] for k in found]], np.float32)


def add_image_features(folder: Path, digests: list[str], features: np.ndarray) -> None:
    """Add these images' features to the store (written whole into a temporary folder, then
    renamed into place: an interrupted write leaves the previous store). Two audits at once
    take turns (`one_builder`): each had read the store, added its own and written it whole,
    and the later write dropped the earlier one's images."""
    with one_builder(folder, f"Waiting for another process adding features to {folder}"):
        store = _load_store(folder)
        if store is None or store[1].shape[1:] != features.shape[1:]:  # none, or another dim
            store = (np.zeros(0, "U32"), np.zeros((0, features.shape[1]), np.float32))
        known = set(store[0].tolist())
        new = {d: i for i, d in enumerate(digests) if d not in known}
        with building(folder) as tmp:
            np.save(tmp / "digests.npy", np.concatenate([store[0], np.array(list(new), "U32")]))
            np.save(tmp / "features.npy", np.concatenate([store[1], features[list(new.values())]]))
            write_manifest(tmp, {"images": len(store[0]) + len(new), "dim": features.shape[1]})
