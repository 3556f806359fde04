"""The feature cache's format: what `command=cache-features` writes and `model=head` reads.

Building it (running a backbone) is `image_classifier/training/features.py`. Format: one folder
per cache key under `features.dir`, holding `<split>_features.npy` (float16, [n, dim];
`np.load(..., mmap_mode="r")` maps it without reading) and `<split>_labels.npy`, plus
`manifest.json`. The key hashes everything the features depend on: the data's content hash, the
backbone, its weights, the preprocessing and this code's format version. A build writes into a
temporary folder and renames it into place after the manifest, so an interrupted build never
leaves a cache that reads as complete; a second run with nothing changed does nothing and says so.
Training reads it through `FeatureDataModule` (data/datamodule.py); this module imports neither
torch nor Lightning, so the audit can look for a cache without them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from image_classifier.data.images import Preprocessing

FORMAT_VERSION = 1


def backbone_preprocessing(fcfg) -> Preprocessing:
    ch = int(fcfg.channels)
    return Preprocessing(
        size=tuple(fcfg.size),
        channels=ch,
        mean=tuple(fcfg.mean),
        std=tuple(fcfg.std),
        resize=fcfg.get("resize", "stretch"),
    )


def cache_key(data_hash: str, fcfg, pre: Preprocessing, weights: str) -> str:
    """The cache's key: everything its features depend on. `weights`: models.pretrained's
    weights_id of the backbone."""
    parts = {
        "format": FORMAT_VERSION,
        "data": data_hash,
        "backbone": fcfg.backbone,
        "weights": weights,
        "preprocessing": pre.to_dict(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_folder(cfg, data_hash: str, weights: str) -> tuple[Path, str]:
    """(folder, key) where the cache for this data and cfg.features lives (built or not)."""
    fcfg = cfg.features
    key = cache_key(data_hash, fcfg, backbone_preprocessing(fcfg), weights)
    return Path(fcfg.dir) / key, key
