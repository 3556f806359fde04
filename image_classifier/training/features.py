"""`command=cache-features`: a frozen pretrained backbone run once over every split, on disk.

The format (folders, manifest) is `image_classifier/data/features.py`; this
module builds it. The key hashes everything the features depend on: the data's content hash, the
backbone, its weights, the preprocessing and the format version. A build writes into a temporary
folder and renames it into place after the manifest, so an interrupted build never leaves a cache
that reads as complete; a second run with nothing changed does nothing and says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from image_classifier.data.cachedir import building, one_builder, read_manifest, write_manifest
from image_classifier.data.datamodule import build_datamodule
from image_classifier.data.features import (
    FORMAT_VERSION,
    PARITY_FILE,
    backbone_preprocessing,
    cache_folder,
)
from image_classifier.data.identity import SPLITS, left_out_line
from image_classifier.data.layouts import write_unusable
from image_classifier.data.profile import choose_grey_white
from image_classifier.errors import shell_word
from image_classifier.models.factory import create_backbone
from image_classifier.models.pretrained import weights_id
from image_classifier.training.callbacks import pick_parity_images
from image_classifier.training.resume import given_overrides


def build_cache(cfg, quiet: bool = False) -> dict:
    """Build (or find) the cache for cfg.data and cfg.features; returns its manifest and folder."""
    started = time.perf_counter()
    cfg, _ = choose_grey_white(cfg)  # once: the data module, the key and the manifest use it
    dm = _datamodule(cfg)
    info = dm.prepare()
    folder, key = cache_folder(cfg, info.data_hash, weights_id(cfg.features), info.classes)
    with one_builder(folder, f"Waiting for another process computing features into {folder}"):
        return _read_or_build(cfg, dm, info, (folder, key), started, quiet)


def _read_or_build(cfg, dm, info, where: tuple[Path, str], started: float, quiet: bool) -> dict:
    folder, key = where
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("key") == key:
        if not quiet:
            print(
                f"Feature cache {folder} is up to date (key {key}: same data, backbone, weights "
                "and preprocessing): read, not computed again."
            )
        return {
            "dir": str(folder),
            "manifest": manifest,
            "built": False,
            "seconds": 0.0,
            "skipped": info.skipped,
            "left_out": info.left_out,
        }
    import lightning as L

    L.seed_everything(int(cfg.seed), verbose=False)

    def describe(counts: dict, dim: int) -> dict:
        return _manifest(cfg, key, info, counts, dim, time.perf_counter() - started)

    manifest = _write_atomically(folder, dm, create_backbone(cfg.features), describe, quiet)
    counts, dim = manifest["counts"], manifest["dim"]
    seconds = time.perf_counter() - started
    if not quiet:
        print(
            f"Cached {cfg.features.backbone} features ({dim} dims, float16) for "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f" images in {seconds:.0f}s -> {folder}"
        )
    return {
        "dir": str(folder),
        "manifest": manifest,
        "built": True,
        "seconds": seconds,
        "skipped": info.skipped,
        "left_out": info.left_out,
    }


def _datamodule(cfg):
    """The data at the backbone's preprocessing, in batches of features.batch_size."""
    c = cfg.copy()
    OmegaConf.set_struct(c, False)
    c.train.batch_size = int(cfg.features.batch_size)
    return build_datamodule(c, preprocessing=backbone_preprocessing(cfg.features, cfg.data))


def _manifest(cfg, key: str, info, counts: dict, dim: int, seconds: float) -> dict:
    fcfg = cfg.features
    return {
        "key": key,
        "format": FORMAT_VERSION,
        "data": {
            "name": info.name,
            "hash": info.data_hash,
            "layout": info.layout,
            "class_counts": info.class_counts,
        },
        "classes": info.classes,
        "backbone": fcfg.backbone,
        "weights": weights_id(fcfg),
        "preprocessing": backbone_preprocessing(fcfg, cfg.data).to_dict(),
        "dim": dim,
        "dtype": "float16",
        "counts": counts,
        "seconds": round(seconds, 1),
    }


def _write_atomically(folder: Path, dm, backbone, describe, quiet: bool) -> dict:
    """Every split's features and then the manifest (`describe(counts, dim)`) into a temporary
    folder, renamed into place only when complete; returns the manifest."""
    with building(folder) as tmp:
        counts, dim = {}, None
        with torch.inference_mode():
            for split in [s for s in SPLITS if len(dm.dataset(s))]:
                counts[split], dim = _write_split(tmp, split, dm, backbone, quiet)
        for split in [s for s in SPLITS if s not in counts]:  # data.split=[0,0,1]: test only
            np.save(tmp / f"{split}_features.npy", np.zeros((0, dim), np.float16))
            np.save(tmp / f"{split}_labels.npy", np.zeros(0, np.int64))
            counts[split] = 0
        if (images := pick_parity_images(dm)) is not None:  # the head's export checks on them
            np.save(tmp / PARITY_FILE, images.numpy())
        manifest = describe(counts, dim)
        write_manifest(tmp, manifest)
    return manifest


def _write_split(tmp: Path, split: str, dm, backbone, quiet: bool) -> tuple[int, int]:
    from tqdm.auto import tqdm

    n = len(dm.dataset(split))
    feats = labels = None
    i = 0
    batches = tqdm(dm.loader(split), desc=f"features {split}", leave=False, disable=quiet or None)
    for x, y in batches:
        f = backbone(x).float().numpy()
        if feats is None:
            feats = np.lib.format.open_memmap(
                tmp / f"{split}_features.npy", mode="w+", dtype=np.float16, shape=(n, f.shape[1])
            )
            labels = np.zeros(n, dtype=np.int64)
        feats[i : i + len(f)] = f
        labels[i : i + len(f)] = np.asarray(y)
        i += len(f)
    dim = feats.shape[1]
    feats.flush()
    del feats
    np.save(tmp / f"{split}_labels.npy", labels)
    return n, dim


def run_cache_features(cfg) -> dict:
    result = build_cache(cfg)
    if line := left_out_line(result["left_out"]):
        print(line)
    if skipped := result["skipped"]:
        listed = write_unusable(skipped, cfg.paths.output_dir or result["dir"])
        print(f"  unusable: {len(skipped)} file(s) skipped, each with its reason in {listed}")
    same = " ".join(shell_word(o) for o in given_overrides("data", "features", "paths", "seed"))
    print(f"  next: uv run python commands.py command=train model=head {same}".rstrip())
    return result
