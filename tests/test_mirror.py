"""train.augment.hflip=auto: flips unless a mirrored image looks like another class, checked on
the train split through the pretrained backbone (training/mirror.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from image_classifier.data.datamodule import build_datamodule
from image_classifier.training.mirror import choose_flips
from tests.conftest import compose_cfg, make_class_folders


def stripes(root: Path, angles: dict[str, float], per_class: int = 24, size: int = 64) -> Path:
    """Colour stripes at each class's angle (degrees), of random period, phase and colours."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for name, angle in angles.items():
        (root / name).mkdir(parents=True)
        a = np.deg2rad(angle)
        for i in range(per_class):
            period, phase = rng.uniform(7, 14), rng.uniform(0, 2 * np.pi)
            wave = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period + phase) > 0
            fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            rgb = np.where(wave[..., None], fg, bg) + rng.normal(0, 10, (size, size, 3))
            Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def flips_for(tmp_path: Path, root: Path, *overrides: str):
    cfg = compose_cfg(
        tmp_path, "data=folder", f"data.root={root}", "data.size=[64,64]",
        "model=efficientnet_lite0", "train.augment.hflip=auto", *overrides,
    )  # fmt: skip
    dm = build_datamodule(cfg)
    return choose_flips(cfg, dm, dm.prepare(), [])


def test_mirrored_classes_turn_flips_off(tmp_path):
    """`/` and `\\` stripes: each mirrored is the other class."""
    cfg, notes = flips_for(tmp_path, stripes(tmp_path / "img", {"rising": 45, "falling": -45}))
    assert cfg.train.augment.hflip is False
    assert notes[0].startswith("train.augment.hflip=false (no flips: mirrored images look like")


def test_classes_that_survive_the_mirror_keep_flips(tmp_path):
    """Upright and level stripes stay what they are mirrored; the check leaves torch's random
    state as it found it, so a run that keeps its flips trains as it did before."""
    import torch

    angles = {"upright": 0, "level": 90}
    root = stripes(tmp_path / "img", angles)
    before = torch.get_rng_state()
    cfg, notes = flips_for(tmp_path, root)
    assert torch.equal(torch.get_rng_state(), before)  # training draws as it did without it
    assert cfg.train.augment.hflip is True
    assert notes[0].startswith("train.augment.hflip=true (random flips: mirrored images keep")


def test_given_flips_and_tiny_classes_are_not_checked(tmp_path):
    root = make_class_folders(tmp_path / "img", per_class=3, size=64, mode="RGB")  # 1 to train
    cfg, notes = flips_for(tmp_path, root)
    assert cfg.train.augment.hflip is True
    assert "too few images a class to check" in notes[0]
    for given in ("true", "false"):
        cfg, notes = flips_for(tmp_path, root, f"train.augment.hflip={given}")
        assert (cfg.train.augment.hflip, notes) == (given == "true", [])


def test_the_sample_keeps_every_class_share_and_its_size():
    from image_classifier.training.mirror import PROBE_IMAGES, _sample

    labels = np.repeat(np.arange(4), [1000, 500, 60, 2])  # most of the images in one class
    rows = _sample(labels, 0)
    assert abs(len(rows) - PROBE_IMAGES) <= 4 and len(set(rows)) == len(rows)
    assert np.bincount(labels[rows]).tolist() == [256, 128, 15, 2]  # the smallest keeps 2
    many = _sample(np.repeat(np.arange(1000), 3), 0)  # 1,000 classes: 200 of them, 2 each
    assert len(many) == PROBE_IMAGES and len(set(np.repeat(np.arange(1000), 3)[many])) == 200
    assert _sample(np.array([0, 0, 1]), 0) is None  # a class of one image: not checked


def test_train_settles_auto_before_the_model_is_built(tmp_path):
    """Through `train`: the note is on the summary's chosen line, and the run stores the verdict
    (the model file never holds `auto`, which augmentation would read as true)."""
    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.training.train import run_train

    root = stripes(tmp_path / "img", {"rising": 45, "falling": -45}, per_class=40)
    cfg = compose_cfg(
        tmp_path, "data=folder", f"data.root={root}", "data.size=[64,64]", "model=cnn",
        "train.augment.hflip=auto", "train.calibrate=false",
    )  # fmt: skip
    r = run_train(cfg)
    assert any(n.startswith("train.augment.hflip=false (no flips") for n in r["chosen"])
    stored = ckpt_file.read(r["checkpoint"])["hyper_parameters"]
    assert stored["augment"]["hflip"] is False
    assert stored["config"]["train"]["augment"]["hflip"] is False
