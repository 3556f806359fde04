"""The feature cache's format: what `command=cache-features` writes and `model=head` reads.

Building it (running a backbone) is `image_classifier/training/features.py`. Format: one folder
per cache key under `features.dir`, holding `<split>_features.npy` (float16, [n, dim];
`np.load(..., mmap_mode="r")` maps it without reading) and `<split>_labels.npy`, plus
`manifest.json`. The key hashes everything the features depend on: the data's content hash, the
backbone, its weights, the preprocessing and this code's format version. A build writes into a
temporary folder and renames it into place after the manifest, so an interrupted build never
leaves a cache that reads as complete; a second run with nothing changed does nothing and says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch

from image_classifier.data.cachedir import read_manifest
from image_classifier.data.datasets import ArrayDataset
from image_classifier.data.device import collate
from image_classifier.data.identity import DataInfo
from image_classifier.data.images import Preprocessing
from image_classifier.data.layouts import SPLITS
from image_classifier.errors import UserError

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


class FeatureDataModule(L.LightningDataModule):
    """Cached features as in-memory tensors: an epoch of head training is a few matrix products."""

    def __init__(self, folder: str | Path, batch_size: int, balanced_sampler: bool = False):
        super().__init__()
        self.folder = Path(folder)
        self.batch_size = batch_size
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise UserError(
                f"{self.folder} is not a complete feature cache; run command=cache-features."
            )
        self.manifest = manifest
        self.datasets = {
            s: ArrayDataset(
                torch.from_numpy(np.load(self.folder / f"{s}_features.npy").astype(np.float32)),
                torch.from_numpy(np.load(self.folder / f"{s}_labels.npy")),
            )
            for s in SPLITS
        }
        self.info = DataInfo(
            name=manifest["data"]["name"],
            classes=manifest["classes"],
            preprocessing=Preprocessing.from_dict(manifest["preprocessing"]),
            class_counts=manifest["data"]["class_counts"],
            split_sizes=manifest["counts"],
            data_hash=manifest["data"]["hash"],
            layout=f"cached {manifest['backbone']} features",
        )

    def prepare(self) -> DataInfo:
        return self.info

    def dataset(self, split: str):
        return self.datasets[split]

    def loader(self, split: str, shuffle: bool = False):
        from torch.utils.data import DataLoader

        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate
        )

    def train_dataloader(self):
        return self.loader("train", shuffle=True)

    def val_dataloader(self):
        return self.loader("val")

    def test_dataloader(self):
        return self.loader("test")
