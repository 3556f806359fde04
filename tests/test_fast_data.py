"""The decoded-image cache, batches formed on the device, and whole-batch augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, make_class_folders

from image_classifier.data.augment import augment_batch, random_erase
from image_classifier.data.datamodule import build_datamodule
from image_classifier.data.datasets import ArrayDataset, FileDataset
from image_classifier.data.device import DeviceBatches, EpochPermutation
from image_classifier.training.train import run_train


def _cache_dirs(root: Path) -> list[Path]:
    d = root / "cache" / "decoded"
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def _datamodule(root: Path, *overrides: str, training: bool = True):
    cfg = compose_cfg(root, "data=folder", f"data.root={root / 'images'}", *overrides)
    if training:
        return build_datamodule(cfg)
    from image_classifier.data.images import Preprocessing

    pre = Preprocessing(size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    return build_datamodule(cfg, preprocessing=pre)


def test_decoded_cache_builds_once_matches_decoding_and_keeps_file_names(tmp_path, capsys):
    make_class_folders(tmp_path / "images", size=20)
    (tmp_path / "images" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    dm = _datamodule(tmp_path, "data.size=[16,16]")
    info = dm.prepare()
    assert "Decoding 30 images once" in capsys.readouterr().out
    [folder] = _cache_dirs(tmp_path)
    assert info.cache == str(folder)
    # the corrupt file is skipped and reported as without the cache, and not in the arrays
    assert [Path(p).name for p in info.skipped] == ["broken.png"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 30 == sum(info.split_sizes.values())
    train = dm.dataset("train")
    assert isinstance(train, ArrayDataset) and train.images.dtype == torch.uint8
    assert tuple(train.images.shape[1:]) == (1, 16, 16)
    # every row is exactly what decoding its file gives, labels included
    plain = FileDataset(train.items, info.preprocessing, len(info.classes))
    for i in range(len(plain)):
        x, y = plain[i]
        assert torch.equal(train.images[i], x) and int(train.labels[i]) == y

    # a second run reuses it: nothing decoded, the same folder untouched
    stamp = (folder / "train_images.npy").stat().st_mtime_ns
    again = _datamodule(tmp_path, "data.size=[16,16]")
    again.prepare()
    assert "Decoding" not in capsys.readouterr().out
    assert _cache_dirs(tmp_path) == [folder]
    assert (folder / "train_images.npy").stat().st_mtime_ns == stamp
    assert torch.equal(again.dataset("train").images, train.images)


def test_a_second_process_waits_for_the_cache_being_built_and_reads_it(tmp_path, capsys):
    """Two processes on one cache (torchrun's ranks, a parallel sweep's jobs) decoded everything
    twice. One holds the build (here the test); the other waits, then reads what it wrote."""
    import shutil
    import threading
    import time

    from image_classifier.data.cachedir import one_builder

    make_class_folders(tmp_path / "images", size=20)
    _datamodule(tmp_path, "data.size=[16,16]").prepare()
    [folder] = _cache_dirs(tmp_path)
    shutil.move(folder, tmp_path / "built")
    capsys.readouterr()
    second = _datamodule(tmp_path, "data.size=[16,16]")
    with one_builder(folder, "the test builds"):
        waiter = threading.Thread(target=second.prepare)
        waiter.start()
        deadline = time.monotonic() + 60
        while "Waiting for another process" not in capsys.readouterr().err:
            assert waiter.is_alive() and time.monotonic() < deadline, "it did not wait"
            time.sleep(0.05)
        shutil.move(tmp_path / "built", folder)  # the first process's build lands
    waiter.join(60)
    assert "Decoding" not in capsys.readouterr().out  # read, not decoded again
    assert second.info.cache == str(folder) and _cache_dirs(tmp_path) == [folder]


def test_a_cache_is_built_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    """flock fails with ENOLCK on some NFS mounts: the cache is built as before, unlocked."""
    import errno

    from image_classifier.data import cachedir

    def no_locks(f, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cachedir.fcntl, "flock", no_locks)
    make_class_folders(tmp_path / "images")
    assert _datamodule(tmp_path, "data.size=[16,16]").prepare().cache


def test_evaluation_under_ddp_reads_each_image_once_and_calibration_reads_all(tmp_path):
    """Lightning's DistributedSampler padded 9 validation images to 10 on 2 processes (val/acc
    0.3000 "on 9 images"). Each process now evaluates its share, each image once; a loader
    asked for without `shard` (calibration, thresholds on rank 0) still reads the whole split."""
    from types import SimpleNamespace

    make_class_folders(tmp_path / "images", per_class=10)  # 30 images, 9 of them val
    dm = _datamodule(tmp_path, "data.size=[16,16]", "data.split=[0.4,0.3,0.3]")
    n = len(dm.dataset("val"))
    assert n % 2 == 1, n  # an odd split: padding would repeat one image
    shares = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        assert dm.device_batches("val") is None  # several processes: through a DataLoader
        shares.append(list(dm.val_dataloader().sampler))
        assert list(dm.loader("val").sampler) == list(range(n))  # unsharded: the whole split
    assert sorted(shares[0] + shares[1]) == list(range(n)) and len(shares[0]) == n // 2 + 1


def test_decoded_cache_is_rebuilt_when_data_or_preprocessing_change(tmp_path):
    make_class_folders(tmp_path / "images", size=20)
    _datamodule(tmp_path, "data.size=[16,16]").prepare()
    [first] = _cache_dirs(tmp_path)
    _datamodule(tmp_path, "data.size=[12,12]").prepare()  # preprocessing changed
    assert len(_cache_dirs(tmp_path)) == 2
    from PIL import Image

    Image.new("L", (20, 20), 7).save(tmp_path / "images" / "dog" / "000.png")  # a file changed
    dm = _datamodule(tmp_path, "data.size=[16,16]")
    dm.prepare()
    assert len(_cache_dirs(tmp_path)) == 3 and dm.info.cache != str(first)


def test_evaluation_reads_an_existing_cache_but_never_builds_one(tmp_path):
    make_class_folders(tmp_path / "images")
    dm = _datamodule(tmp_path, training=False)
    dm.prepare()
    assert isinstance(dm.dataset("test"), FileDataset) and _cache_dirs(tmp_path) == []
    _datamodule(tmp_path, "data.size=[16,16]").prepare()  # training builds it
    dm = _datamodule(tmp_path, training=False)
    dm.prepare()
    assert isinstance(dm.dataset("test"), ArrayDataset) and dm.info.cache


def test_interrupted_build_leaves_nothing_that_reads_as_a_cache(tmp_path, monkeypatch):
    from image_classifier.data import decoded

    make_class_folders(tmp_path / "images")
    calls = []

    def fail_on_test(tmp, split, ds, workers):
        calls.append(split)
        if split == "test":
            raise KeyboardInterrupt
        return real(tmp, split, ds, workers)

    real = decoded._write_split
    monkeypatch.setattr(decoded, "_write_split", fail_on_test)
    with pytest.raises(KeyboardInterrupt):
        _datamodule(tmp_path, "data.size=[16,16]").prepare()
    assert calls == ["train", "val", "test"]
    assert _cache_dirs(tmp_path) == []
    left = [p.name for p in (tmp_path / "cache" / "decoded").iterdir()]
    left = [name for name in left if not name.endswith(".lock")]  # one_builder's empty lock
    assert left == [".checked"]  # the scan's memo; no partial folder left
    monkeypatch.setattr(decoded, "_write_split", real)
    dm = _datamodule(tmp_path, "data.size=[16,16]")
    assert dm.prepare().cache  # the next run builds it whole


def test_a_cache_folder_that_cannot_be_written_falls_back_to_decoding(tmp_path, caplog):
    """data.cache_dir on a read-only mount (or, here, under a file) ended training in an
    OSError traceback from the scan's memo: a cache is worth having, not worth stopping for."""
    make_class_folders(tmp_path / "images")
    (tmp_path / "afile").write_text("in the way")
    dm = _datamodule(tmp_path, f"data.cache_dir={tmp_path / 'afile' / 'cache'}")
    info = dm.prepare()
    assert isinstance(dm.dataset("train"), FileDataset) and not info.cache
    assert len(dm.dataset("train")) == info.split_sizes["train"] > 0
    said = f"Not building the decoded-image cache: {tmp_path / 'afile' / 'cache'} cannot be written"
    assert said in caplog.text and f": a file is in the way ({tmp_path / 'afile'})" in caplog.text
    assert "data.cache_dir=DIR names a folder that can be" in caplog.text


def test_cache_over_the_budget_falls_back_to_decoding_with_a_warning(tmp_path, caplog):
    make_class_folders(tmp_path / "images")
    dm = _datamodule(tmp_path, "data.cache_max_gb=0.000001")
    info = dm.prepare()
    assert isinstance(dm.dataset("train"), FileDataset) and not info.cache
    assert "over data.cache_max_gb=1e-06" in caplog.text
    assert "decoded every epoch" in caplog.text
    # a small cache on a nearly full disk said "it would take 0.0 GB and ... has 0.0 GB free"
    assert "it would take 0.0" not in caplog.text and " kB, over data.cache_max_gb" in caplog.text
    from image_classifier.data.decoded import size_text

    assert [size_text(n) for n in (2.6e9, 14.2e6, 2.4e5)] == ["2.6 GB", "14 MB", "240 kB"]


def test_device_batches_are_the_loader_batches_for_the_same_seed_and_epoch(tmp_path):
    make_class_folders(tmp_path / "images", per_class=20)
    dm = _datamodule(tmp_path, "train.batch_size=7", "data.size=[16,16]")
    dm.prepare()
    loader = dm.loader("train", shuffle=True)
    device = dm.device_batches("train", shuffle=True)
    assert device is not None and len(device) == len(loader)
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        device.sampler.set_epoch(epoch)
        pairs = list(zip(loader, device, strict=True))
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        orders.append(torch.cat([y for _, y in device]))
    assert not torch.equal(orders[0], orders[1]) or len(set(orders[0].tolist())) == 1
    # evaluation splits: the fixed order, the same as the loader's
    for (xa, ya), (xb, yb) in zip(dm.loader("val"), dm.device_batches("val"), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_device_batches_shard_like_distributed_sampler():
    images = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1)
    labels = torch.arange(11)
    sampler = EpochPermutation(11, seed=3)
    ranks = [DeviceBatches(images, labels, 4, sampler, "cpu", r, 2) for r in (0, 1)]
    seen = [torch.cat([y for _, y in r]) for r in ranks]
    assert [len(s) for s in seen] == [6, 6] and [len(r) for r in ranks] == [2, 2]
    assert set(torch.cat(seen).tolist()) == set(range(11))  # one index repeated to pad, as DDP


def test_device_batches_fall_back_to_the_loader_when_they_cannot_apply(tmp_path):
    make_class_folders(tmp_path / "images")
    sized = "data.size=[16,16]"
    assert _datamodule(tmp_path, sized).device_batches("train", shuffle=True) is not None
    for override in (
        "train.device_data=false",
        "train.device_budget_gb=0.000001",
        "train.balanced_sampler=true",
        "train.augment.preset=light",  # per-image transforms need the DataLoader's workers
        "data.cache=none",  # files decoded every epoch
    ):
        dm = _datamodule(tmp_path, sized, override)
        assert dm.device_batches("train", shuffle=True) is None, override


def test_training_batches_on_the_device_and_says_so(tmp_path, capsys):
    make_class_folders(tmp_path / "images")
    base = ("data=folder", f"data.root={tmp_path / 'images'}", "logger.enabled=false")
    r = run_train(compose_cfg(tmp_path, *base, "train.augment.erase=0.5"))
    assert r["batching"].startswith("on the device (cpu") and r["decoded_cache"]
    assert "batches on the device (cpu" in capsys.readouterr().out
    loader = ("train.device_data=false", f"paths.output_dir={tmp_path}/o2")
    r = run_train(compose_cfg(tmp_path, *base, *loader))
    assert r["batching"] == "from a DataLoader"


# -- whole-batch augmentation matches torchvision's per-image transforms in distribution ------


def _chi2_same(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of a chi-square test that two count vectors come from one distribution."""
    from scipy.stats import chi2_contingency

    keep = (a + b) > 0
    return chi2_contingency(np.stack([a[keep], b[keep]]))[1]


def test_batch_flip_and_shift_match_per_image_flip_and_random_crop():
    from torchvision.transforms import v2

    torch.manual_seed(0)
    n, shift = 4000, 2
    x = torch.zeros(n, 1, 9, 9, dtype=torch.uint8)
    x[:, 0, 4, 3] = 255  # one bright pixel left of centre: where it lands shows flip and shift
    per_image = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(9, padding=shift)])
    ours = augment_batch(x, hflip=True, shift=shift)
    theirs = torch.stack([per_image(img) for img in x])

    def landing(batch):
        flat = batch.view(n, -1).float()
        where = flat.argmax(1)
        where[flat.max(1).values == 0] = 81  # shifted out of the frame
        return np.bincount(where.numpy(), minlength=82)

    a, b = landing(ours), landing(theirs)
    # rows 2..6 x columns 1..7 (column 3 or its mirror 5, each shifted by up to 2): all reached
    assert (a > 0).sum() == 35 and (b > 0).sum() == 35
    assert _chi2_same(a, b) > 0.001


def test_batch_erasing_matches_random_erasing():
    from torchvision.transforms import v2

    torch.manual_seed(0)
    n = 3000
    x = torch.full((n, 1, 28, 28), 200, dtype=torch.uint8)
    ours = random_erase(x, p=0.5)
    per_image = v2.RandomErasing(p=0.5, value=0)
    theirs = torch.stack([per_image(img) for img in x])

    def erased_area(batch):
        return (batch == 0).view(n, -1).float().mean(1).numpy()

    a, b = erased_area(ours), erased_area(theirs)
    assert abs((a > 0).mean() - 0.5) < 0.05 and abs((b > 0).mean() - 0.5) < 0.05
    from scipy.stats import ks_2samp

    assert ks_2samp(a[a > 0], b[b > 0]).pvalue > 0.001  # same distribution of erased areas
    # erased pixels form one rectangle per image
    img = ours[(ours == 0).view(n, -1).any(1)][0, 0]
    rows, cols = torch.nonzero(img == 0, as_tuple=True)
    box = img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert (box == 0).all()


def test_scan_checks_only_new_or_changed_files_and_still_reports_bad_ones(tmp_path, monkeypatch):
    from image_classifier.data import scan

    make_class_folders(tmp_path / "images")
    bad = tmp_path / "images" / "cat" / "broken.png"
    bad.write_bytes(b"not an image")
    checked = []
    real = scan._check_one
    monkeypatch.setattr(scan, "_check_one", lambda p: checked.append(p) or real(p))
    first = _datamodule(tmp_path, "data.size=[16,16]")
    first.prepare()
    assert len(checked) == 31
    checked.clear()
    again = _datamodule(tmp_path, "data.size=[16,16]")
    assert list(again.prepare().skipped) == list(first.info.skipped) == [str(bad)]
    assert checked == []  # nothing changed: nothing decoded to check it
    from PIL import Image

    Image.new("L", (16, 16), 3).save(bad, format="PNG")  # the broken file is fixed
    third = _datamodule(tmp_path, "data.size=[16,16]")
    assert third.prepare().skipped == {} and checked == [str(bad)]
    assert sum(third.info.split_sizes.values()) == 31
