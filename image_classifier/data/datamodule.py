"""The LightningDataModule: how the splits (data/splits.py: what the data is and how it is
split, for packaged Fashion-MNIST and users' folders alike) are batched: DataLoaders, on-device
batches, the balanced sampler, per-image augmentation; and the cached-feature data module
(`FeatureDataModule`, the format in data/features.py) that `model=head` trains on.

Batches are uint8 NCHW tensors in 0..255; the model normalises them itself, so what a loader
yields for evaluation is exactly what `infer` and `serve` feed the exported model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from image_classifier.data.cachedir import read_manifest
from image_classifier.data.datasets import ArrayDataset, AugmentedDataset, FileDataset
from image_classifier.data.decoded import size_text
from image_classifier.data.device import DeviceBatches, EpochPermutation, collate
from image_classifier.data.features import PARITY_FILE
from image_classifier.data.identity import SPLITS, DataInfo
from image_classifier.data.images import Preprocessing
from image_classifier.data.splits import load_splits
from image_classifier.errors import UserError
from image_classifier.rules import fine_tunes

# train.batch_size=auto: a pretrained network fine-tuned takes more, smaller steps. Chosen on
# validation (docs/benchmarks.md): at 32 with 300 steps, colour-96's subsets of 300 and 1,000
# images reached 57.2 and 70.4 % against 42.4 and 60.4 % at 128 with 100 steps, in less time.
AUTO_BATCH = {"scratch": 128, "pretrained": 32}


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_cfg,
        batch_size: int = 128,
        num_workers: int = 0,
        balanced_sampler: bool = False,
        project_root: str | Path = ".",
        preprocessing: Preprocessing | None = None,
        augment_preset: str = "none",
        build_cache: bool = False,
        seed: int = 0,
        device_budget_gb: float = 0.0,
    ):
        """`preprocessing`: a model's own (for test/predict); None derives it from the config.
        `build_cache`: build the decoded-image cache when missing (training); otherwise it is
        used only when present. `device_budget_gb`: splits up to this size are moved to the
        training device and batched there (`DeviceBatches`); 0 keeps DataLoaders."""
        super().__init__()
        self.fixed_preprocessing = preprocessing
        self.augment_preset = augment_preset
        self.build_cache = build_cache
        self.seed = int(seed)
        self.device_budget_gb = float(device_budget_gb)
        self.batching = "from a DataLoader"  # what train_dataloader chose, for the run summary
        self.cfg = data_cfg
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.balanced_sampler = balanced_sampler
        self.project_root = Path(project_root)
        self.datasets: dict[str, Dataset] = {}
        self.info: DataInfo | None = None

    # -- building ---------------------------------------------------------------------------
    def prepare(self) -> DataInfo:
        """Load or scan the data once (idempotent); Lightning's setup() calls this too."""
        if self.info is None:
            self.datasets, self.info = load_splits(
                self.cfg,
                self.fixed_preprocessing,
                self.project_root,
                self.build_cache,
                self.num_workers,
            )
            from image_classifier.data.augment import sample_augment

            transform = sample_augment(self.augment_preset, self.info.preprocessing.channels)
            if transform is not None:
                self.datasets["train"] = AugmentedDataset(self.datasets["train"], transform)
        return self.info

    def setup(self, stage: str | None = None):
        self.prepare()

    def use_classes(self, classes: list[str]) -> DataInfo:
        """Single-label data read with some of `classes` (`test` with data.classes): each label
        becomes its class's index in `classes`, a model's indices; returns the DataInfo."""
        if self.prepare().multi_label:
            return self.info
        index = [classes.index(c) for c in self.info.classes]
        for ds in self.datasets.values():
            ds = ds.base if isinstance(ds, AugmentedDataset) else ds
            if isinstance(ds, ArrayDataset):
                ds.labels = torch.as_tensor(index)[ds.labels]
            if getattr(ds, "items", None) is not None:
                ds.items = [(p, index[y]) for p, y in ds.items]
        counts = [0] * len(classes)
        for k, n in zip(index, self.info.class_counts, strict=True):
            counts[k] = n
        self.info = replace(self.info, classes=list(classes), class_counts=counts)
        return self.info

    # -- access -----------------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """One split's dataset (after prepare); items are (uint8 CHW tensor, label)."""
        self.prepare()
        return self.datasets[split]

    def _world(self) -> int:
        return world_size(self.trainer)

    def loader(self, split: str, shuffle: bool = False, shard: bool = False) -> DataLoader:
        """A DataLoader over the split. Shuffled in the EpochPermutation order (the same as
        DeviceBatches); under DDP Lightning swaps in its DistributedSampler for training, and
        `shard` (its evaluation loops) gives this process its share of the split, each image
        once (`unrepeated`). Without `shard` every process reads the whole split
        (calibration, thresholds)."""
        ds = self.dataset(split)
        sampler = None
        if shuffle and self._world() == 1:
            sampler = EpochPermutation(len(ds), self.seed)
        if shuffle and self.balanced_sampler:
            sampler = balanced_sampler(labels_of(ds), self.info.multi_label)
        if shard and (share := unrepeated(ds, self.trainer)) is not None:  # Lightning's eval
            sampler = share
        workers = self.num_workers if isinstance(ds, FileDataset | AugmentedDataset) else 0
        return batch_loader(ds, self.batch_size, shuffle, sampler, workers)

    def device_batches(self, split: str, shuffle: bool = False) -> DeviceBatches | None:
        """The split as DeviceBatches on the trainer's device, or None when it must go through
        a DataLoader: per-image augmentation, the balanced sampler, decoding per epoch, over
        the device budget, or evaluation under several processes (Lightning shards those)."""
        ds = self.dataset(split)
        trainer, world = self.trainer, self._world()
        if (
            not isinstance(ds, ArrayDataset)
            or ds.pre is not None
            or (shuffle and self.balanced_sampler)
            or (world > 1 and not shuffle)
            or ds.images.nbytes + ds.labels.nbytes > self.device_budget_gb * 1e9
        ):
            return None
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        sampler = EpochPermutation(len(ds), self.seed) if shuffle else None
        rank = trainer.global_rank if trainer is not None else 0
        return DeviceBatches(ds.images, ds.labels, self.batch_size, sampler, device, rank, world)

    def train_dataloader(self):
        batches = self.device_batches("train", shuffle=True)
        if batches is not None:
            self.batching = f"on the device ({batches.device}, {size_text(batches.nbytes())})"
            return batches
        return self.loader("train", shuffle=True)

    def val_dataloader(self):
        return self.device_batches("val") or self.loader("val", shard=True)

    def test_dataloader(self):
        return self.device_batches("test") or self.loader("test", shard=True)


class FeatureDataModule(L.LightningDataModule):
    """Cached features as in-memory tensors: an epoch of head training is a few matrix products."""

    def __init__(self, folder: str | Path, batch_size: int, balanced_sampler: bool = False):
        super().__init__()
        self.folder = Path(folder)
        self.batch_size, self.balanced_sampler = batch_size, balanced_sampler
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise UserError(
                f"{self.folder} is not a complete feature cache; run command=cache-features."
            )
        self.manifest = manifest
        parity = self.folder / PARITY_FILE
        self.parity_images = torch.from_numpy(np.load(parity)) if parity.exists() else None
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

    def loader(self, split: str, shuffle: bool = False, shard: bool = False):
        ds, sampler = self.datasets[split], None
        if shuffle and self.balanced_sampler:
            sampler = balanced_sampler(labels_of(ds), ds.labels.ndim > 1)
        if shard:
            sampler = unrepeated(ds, self.trainer)
        return batch_loader(ds, self.batch_size, shuffle, sampler)

    def train_dataloader(self):
        return self.loader("train", shuffle=True)

    def val_dataloader(self):
        return self.loader("val", shard=True)

    def test_dataloader(self):
        return self.loader("test", shard=True)


def world_size(trainer) -> int:
    """How many processes train (1 before a trainer is attached)."""
    return trainer.world_size if trainer is not None else 1


def unrepeated(ds, trainer):
    """Evaluation under several processes, each image once; None for one process (or fewer
    images than processes: Lightning's padded sampler then). Lightning's DistributedSampler pads
    the split to a multiple of the processes, so 9 validation images on 2 read as 10 (val/acc
    0.3000 "on 9 images"). Ranks may differ by one batch; evaluation is safe with that (DDP
    syncs buffers on the first batch only), and every rank gets one."""
    world = world_size(trainer)
    if not len(ds) >= world > 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(
        ds, num_replicas=world, rank=trainer.global_rank, shuffle=False
    )


def train_batch_size(cfg) -> int:
    """cfg.train.batch_size, with `auto` resolved by whether cfg.model is fine-tuned."""
    size = cfg.train.batch_size
    if isinstance(size, str) and size == "auto":
        return AUTO_BATCH["pretrained" if fine_tunes(cfg.model) else "scratch"]
    return int(size)


def build_datamodule(cfg, preprocessing=None, augment_preset: str | None = None) -> ImageDataModule:
    """The data module for cfg.data with cfg.train's loader settings. For training pass no
    preprocessing (derived from the data) and the configured augmentation preset: it builds the
    decoded cache when missing and batches on the device. For test, export and audit pass the
    model's preprocessing (no augmentation; the decoded cache is read when present)."""
    training = preprocessing is None
    if augment_preset is None and training:
        augment_preset = cfg.train.augment.get("preset", "none")
    t = cfg.train
    return ImageDataModule(
        cfg.data,
        batch_size=train_batch_size(cfg),
        num_workers=int(cfg.train.num_workers),
        balanced_sampler=bool(cfg.train.balanced_sampler),
        project_root=cfg.paths.root,
        preprocessing=preprocessing,
        augment_preset=augment_preset or "none",
        build_cache=training,
        seed=int(cfg.seed),
        device_budget_gb=float(t.get("device_budget_gb") or 0) if t.get("device_data") else 0.0,
    )


def batch_loader(ds, batch_size: int, shuffle: bool, sampler=None, workers: int = 0):
    """A DataLoader of `collate`d batches: shuffled unless a sampler orders the draws."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=False,
    )


def balanced_sampler(labels: np.ndarray, multi_label: bool) -> WeightedRandomSampler:
    """train.balanced_sampler: draws every class equally often (each image weighted by
    1 / its class's count), as many draws as images per epoch."""
    if multi_label:
        raise UserError(
            "train.balanced_sampler=true balances single-label classes; this data is "
            "multi-label. Drop the override."
        )
    weights = 1.0 / np.bincount(labels)[labels]
    return WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(labels))


def labels_of(ds) -> np.ndarray:
    """A split's labels (class indices; multi-label: 0/1 rows) without reading its images."""
    if isinstance(ds, AugmentedDataset):
        ds = ds.base
    if isinstance(ds, ArrayDataset):
        return ds.labels.numpy()
    return np.array([y for _, y in ds.items])
