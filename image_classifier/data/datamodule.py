"""The LightningDataModule: one class for packaged (Fashion-MNIST) and users' folder datasets.

Batches are uint8 NCHW tensors in 0..255; the model normalises them itself, so what a loader
yields for evaluation is exactly what `infer` and `serve` feed the exported model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from image_classifier.data.datasets import ArrayDataset, AugmentedDataset, FileDataset
from image_classifier.data.device import DeviceBatches, EpochPermutation, collate
from image_classifier.data.identity import (
    DataInfo,
    content_hash,
    detect_channels,
    relative_name,
    stratified_indices,
)
from image_classifier.data.images import Preprocessing
from image_classifier.data.sources import sha256_file
from image_classifier.errors import UserError

log = logging.getLogger(__name__)


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
        self.batching = "DataLoader"  # what train_dataloader chose, for the run summary
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
            self.info = self._prepare_idx() if self.cfg.kind == "idx" else self._prepare_folder()
            self._use_decoded_cache()
            from image_classifier.data.augment import sample_augment

            transform = sample_augment(self.augment_preset, self.info.preprocessing.channels)
            if transform is not None:
                self.datasets["train"] = AugmentedDataset(self.datasets["train"], transform)
        return self.info

    def setup(self, stage: str | None = None):
        self.prepare()

    def _preprocessing(self, channels: int) -> Preprocessing:
        if self.fixed_preprocessing is not None:
            return self.fixed_preprocessing
        c = self.cfg
        mean = list(c.mean) if c.get("mean") is not None else [0.5] * channels
        std = list(c.std) if c.get("std") is not None else [0.5] * channels
        if len(mean) == 1 and channels == 3:
            mean, std = mean * 3, std * 3
        elif len(mean) == 3 and channels == 1:  # RGB statistics (e.g. ImageNet) for grey images
            mean, std = [sum(mean) / 3], [sum(std) / 3]
        size = c.size
        if size == "auto":  # `train` chooses it with the model (training/adapt.py); elsewhere
            from image_classifier.data.profile import auto_size, profile_folder

            size = auto_size(profile_folder(c.root).median_size, pretrained=False)
        return Preprocessing(
            size=tuple(size), channels=channels, mean=tuple(mean), std=tuple(std), resize=c.resize
        )

    def _prepare_idx(self) -> DataInfo:
        from image_classifier.data.idx import read_idx
        from image_classifier.data.sources import download, verify

        c = self.cfg
        d = Path(c.dir)
        source = "local"
        if verify(d, dict(c.files)) is not None:
            source = download(c, self.project_root).source
        x_train = read_idx(d / c.train_images)
        y_train = read_idx(d / c.train_labels).astype(np.int64)
        x_test = read_idx(d / c.test_images)
        y_test = read_idx(d / c.test_labels).astype(np.int64)
        tr, va = stratified_indices(y_train, int(c.val_size), int(c.seed))

        pre = self._preprocessing(int(c.channels))

        def ds(x, y):
            return ArrayDataset(
                torch.from_numpy(np.array(x[:, None])), torch.from_numpy(np.array(y)), pre
            )

        self.datasets = {
            "train": ds(x_train[tr], y_train[tr]),
            "val": ds(x_train[va], y_train[va]),
            "test": ds(x_test, y_test),
        }
        classes = list(c.classes)
        if int(y_train.max()) >= len(classes):
            raise UserError(
                f"data.classes lists {len(classes)} names but labels reach {y_train.max()}."
            )
        return DataInfo(
            name=c.name,
            classes=classes,
            preprocessing=pre,
            class_counts=np.bincount(y_train[tr], minlength=len(classes)).tolist(),
            split_sizes={k: len(v) for k, v in self.datasets.items()},
            data_hash=content_hash(sorted(f"{k}:{v}" for k, v in c.files.items())),
            layout="IDX files",
            source=source,
        )

    def _prepare_folder(self) -> DataInfo:
        from image_classifier.data.layouts import ManifestOptions, discover, label_parts

        c = self.cfg
        if not c.get("root"):
            raise UserError(
                "data=folder needs data.root=PATH (a folder of class subfolders, "
                "train/val/test folders, or a CSV manifest)."
            )
        samples = discover(
            c.root,
            split=tuple(c.split),
            seed=int(c.seed),
            strict=bool(c.strict),
            manifest=ManifestOptions(
                file_column=c.get("csv_file_column"),
                label_column=c.get("csv_label_column"),
                multi_label=c.get("multi_label", "auto"),
                separator=str(c.get("label_separator") or ";"),
                classes=list(c.classes) if c.get("classes") else None,
            ),
            checked=self._checked_file(),
        )
        channels = c.channels
        if self.fixed_preprocessing is not None:
            channels = self.fixed_preprocessing.channels
        elif channels == "auto":
            channels = detect_channels([p for p, _ in samples.splits["train"]])
        pre = self._preprocessing(int(channels))
        n = len(samples.classes)
        self.datasets = {s: FileDataset(items, pre, n) for s, items in samples.splits.items()}
        root = Path(c.root)

        def names(y) -> str:
            return ";".join(samples.classes[i] for i in label_parts(y))

        parts = sorted(
            f"{s}:{relative_name(p, root)}:{names(y)}:{sha256_file(p)}"
            for s, items in samples.splits.items()
            for p, y in items
        )
        return DataInfo(
            name=c.name,
            classes=samples.classes,
            preprocessing=pre,
            class_counts=samples.counts("train"),
            split_sizes={k: len(v) for k, v in samples.splits.items()},
            data_hash=content_hash(parts),
            layout=samples.layout,
            skipped=samples.skipped,
            multi_label=samples.multi_label,
        )

    def _checked_file(self) -> Path | None:
        """With the decoded cache on, where the scan remembers which files it has checked."""
        c = self.cfg
        if c.get("cache", "none") != "decoded":
            return None
        root = str(Path(c.root).expanduser().resolve())
        return Path(c.cache_dir).expanduser() / ".checked" / f"{content_hash([root])}.json"

    def _use_decoded_cache(self) -> None:
        """data.cache=decoded: read the splits from the decoded-image cache, building it first
        when training and it is missing (and fits data.cache_max_gb and the disk)."""
        c, info = self.cfg, self.info
        if c.get("cache", "none") != "decoded" or not any(
            isinstance(d, FileDataset) or getattr(d, "pre", None) for d in self.datasets.values()
        ):
            return  # off, or already uint8 arrays at the model's size: nothing to decode
        from image_classifier.data import decoded

        key = decoded.cache_key(info.data_hash, info.preprocessing)
        folder = Path(c.cache_dir).expanduser() / key
        arrays = decoded.load(folder, key)
        if arrays is None and self.build_cache:
            needed = decoded.size_bytes(info.split_sizes, info.preprocessing)
            if why := decoded.fits(folder, needed, float(c.get("cache_max_gb", 20))):
                log.warning(
                    "Not building the decoded-image cache: %s. Images are decoded every "
                    "epoch instead (data.cache=none silences this).",
                    why,
                )
                return
            print(
                f"Decoding {sum(info.split_sizes.values())} images once into {folder} "
                f"({needed / 1e6:.0f} MB); later runs on the same data read it"
            )
            describe = {
                "data": {"name": info.name, "hash": info.data_hash, "layout": info.layout},
                "classes": info.classes,
                "preprocessing": info.preprocessing.to_dict(),
            }
            decoded.build(folder, key, self.datasets, describe, self.num_workers)
            arrays = decoded.load(folder, key)
        if arrays is not None:
            self.datasets = {
                s: ArrayDataset(x, y, items=getattr(self.datasets[s], "items", None))
                for s, (x, y) in arrays.items()
            }
            info.cache = str(folder)

    # -- access -----------------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """One split's dataset (after prepare); items are (uint8 CHW tensor, label)."""
        self.prepare()
        return self.datasets[split]

    def _world(self) -> int:
        trainer = self.trainer
        return trainer.world_size if trainer is not None else 1

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """A DataLoader over the split. Shuffled in the EpochPermutation order (the same as
        DeviceBatches); under DDP Lightning swaps in its DistributedSampler."""
        ds = self.dataset(split)
        sampler = None
        if shuffle and self._world() == 1:
            sampler = EpochPermutation(len(ds), self.seed)
        if shuffle and self.balanced_sampler:
            if self.info.multi_label:
                raise UserError(
                    "train.balanced_sampler=true balances single-label classes; this data is "
                    "multi-label. Drop the override."
                )
            labels = _labels_of(ds)
            weights = 1.0 / np.bincount(labels)[labels]
            sampler = WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(labels))
        workers = self.num_workers if isinstance(ds, FileDataset | AugmentedDataset) else 0
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=False,
        )

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
            self.batching = f"on the device ({batches.device}, {batches.nbytes() / 1e6:.0f} MB)"
            return batches
        return self.loader("train", shuffle=True)

    def val_dataloader(self):
        return self.device_batches("val") or self.loader("val")

    def test_dataloader(self):
        return self.device_batches("test") or self.loader("test")


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
        batch_size=int(cfg.train.batch_size),
        num_workers=int(cfg.train.num_workers),
        balanced_sampler=bool(cfg.train.balanced_sampler),
        project_root=cfg.paths.root,
        preprocessing=preprocessing,
        augment_preset=augment_preset or "none",
        build_cache=training,
        seed=int(cfg.seed),
        device_budget_gb=float(t.get("device_budget_gb") or 0) if t.get("device_data") else 0.0,
    )


def _labels_of(ds) -> np.ndarray:
    if isinstance(ds, AugmentedDataset):
        ds = ds.base
    if isinstance(ds, ArrayDataset):
        return ds.labels.numpy()
    return np.array([y for _, y in ds.items])
