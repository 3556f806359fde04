"""What class weights, the balanced sampler, MixUp/CutMix and SupCon do to one fixed batch,
checked against the same quantity computed by hand."""

import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg, make_class_folders

from image_classifier.data.datamodule import build_datamodule
from image_classifier.data.images import Preprocessing
from image_classifier.models.losses import supcon_loss
from image_classifier.models.module import ClassifierModule
from image_classifier.training.train import build_module

PRE = Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,)).to_dict()


def presplit(root, counts: dict[str, int]):
    """train/ with these class counts; val/ and test/ with two images of each class."""
    for i, (name, n) in enumerate(counts.items()):
        make_class_folders(root / "train", classes=(name,), per_class=n, seed=i)
        for split in ("val", "test"):
            make_class_folders(root / split, classes=(name,), per_class=2, seed=10 + i)
    return root


def module(optim: dict | None = None, augment: dict | None = None) -> ClassifierModule:
    return ClassifierModule(
        model={"name": "cnn", "channels": [4, 8, 8]},
        classes=["a", "b", "c"],
        preprocessing=PRE,
        optim={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, **(optim or {})},
        augment=augment,
    )


def test_class_weights_are_inverse_frequency_and_weight_the_cross_entropy(tmp_path):
    root = presplit(tmp_path / "img", {"a": 20, "b": 10, "c": 10})
    cfg = compose_cfg(
        tmp_path,
        "data=folder",
        f"data.root={root}",
        "train.class_weights=true",
        "train.label_smoothing=0",
    )
    dm = build_datamodule(cfg)
    m = build_module(cfg, {"name": "cnn", "channels": [4, 8, 8]}, dm.prepare())
    # counts 20, 10, 10: total / (classes * count) = 40/60, 40/30, 40/30
    assert m.class_weights.tolist() == pytest.approx([2 / 3, 4 / 3, 4 / 3])

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.5]])
    y = torch.tensor([0, 1, 2, 0])
    w = m.class_weights
    nll = -torch.log_softmax(logits, 1)[torch.arange(4), y]
    by_hand = (w[y] * nll).sum() / w[y].sum()  # PyTorch's weighted mean
    assert m._loss(logits, y).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert m._loss(logits, y, training=False).item() == pytest.approx(nll.mean().item())


def test_train_summary_names_an_imbalance_of_ten_times_and_what_weights_it():
    from types import SimpleNamespace

    from image_classifier.training.summary import imbalance_line

    def info(counts, multi=False):
        return SimpleNamespace(
            classes=["cat", "dog", "eel"], class_counts=counts, multi_label=multi
        )

    line = imbalance_line(info([400, 30, 8]), weighted=False)
    assert "400 train images of cat, 8 of eel (50x)" in line
    assert "train.class_weights=true weights the loss" in line
    assert "loss weighted by inverse class frequency" in imbalance_line(info([400, 30, 8]), True)
    assert imbalance_line(info([90, 30, 10]), weighted=False) == ""  # 9x: no line
    # a class without train images is named by the split warnings, not as "100 of cat, 0 of eel
    # (100x)": the ratio is of the classes that have images
    assert imbalance_line(info([100, 30, 0]), weighted=False) == ""
    assert "100 train images of cat, 10 of eel (10x)" in imbalance_line(info([100, 0, 10]), False)
    assert imbalance_line(info([400, 30, 8], multi=True), weighted=False) == ""


def test_balanced_sampler_draws_each_class_equally_often(tmp_path):
    root = presplit(tmp_path / "img", {"a": 30, "b": 6})
    cfg = compose_cfg(
        tmp_path,
        "data=folder",
        f"data.root={root}",
        "train.balanced_sampler=true",
        "data.cache=none",
    )
    dm = build_datamodule(cfg)
    dm.prepare()
    sampler = dm.loader("train", shuffle=True).sampler
    labels = np.array([y for _, y in dm.dataset("train").items])
    weights = sampler.weights.numpy()
    assert weights[labels == 0] == pytest.approx(1 / 30) and weights[labels == 1] == pytest.approx(
        1 / 6
    )
    torch.manual_seed(0)
    drawn = labels[list(iter(sampler))]
    # each class's share of the draws is 1/2 by construction: 36 draws, far from 30:6
    assert abs((drawn == 1).mean() - 0.5) < 0.25


def mixed_batch(augment: dict, seed: int):
    """(images, one-hot targets, mixed images, mixed targets) of one fixed batch of four."""
    torch.manual_seed(seed)
    x = torch.rand(4, 1, 8, 8) * 255
    y = torch.tensor([0, 1, 2, 1])
    mixed, target = module(augment=augment)._mix(x, y)
    return x, torch.nn.functional.one_hot(y, 3).float(), mixed, target


def test_mixup_mixes_images_and_targets_by_the_same_weight():
    x, onehot, mixed, target = mixed_batch({"mixup": 0.4}, seed=0)
    # torchvision mixes each sample with its neighbour in the batch (roll by 1), one lambda
    lam = float(((target - onehot.roll(1, 0)) / (onehot - onehot.roll(1, 0))).nan_to_num(1)[0, 0])
    assert 0 < lam <= 1
    torch.testing.assert_close(target, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area():
    x, onehot, mixed, target = mixed_batch({"cutmix": 1.0}, seed=3)
    pasted = (mixed != x).any(0).any(0)  # pixels taken from the rolled batch
    assert torch.equal(mixed[..., pasted], x.roll(1, 0)[..., pasted])
    assert torch.equal(mixed[..., ~pasted], x[..., ~pasted])
    lam = 1 - pasted.float().mean().item()  # the kept area
    torch.testing.assert_close(target, lam * onehot + (1 - lam) * onehot.roll(1, 0))


def test_supcon_matches_the_formula_on_a_small_batch():
    f = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    t = 0.5
    z = f / f.norm(dim=1, keepdim=True)
    s = (z @ z.T / t).tolist()
    # Khosla et al.: for each anchor i, -mean over its positives p of
    # log(exp(s_ip) / sum over a != i of exp(s_ia))
    total = 0.0
    for i in range(4):
        denom = sum(math.exp(s[i][a]) for a in range(4) if a != i)
        positives = [p for p in range(4) if p != i and y[p] == y[i]]
        total += -sum(s[i][p] - math.log(denom) for p in positives) / len(positives)
    assert supcon_loss(f, y, t).item() == pytest.approx(total / 4, rel=1e-5)
    soft = torch.nn.functional.one_hot(y, 2).float() * 0.7 + 0.15  # mixed targets: argmax class
    assert supcon_loss(f, soft, t).item() == pytest.approx(total / 4, rel=1e-5)


def test_a_compiled_network_trains_through_training_step():
    """train.compile=true: the step chose its network with `compiled or net`, which calls len()
    on the compiled module and raised TypeError on the first step. The compiled network (here
    with the eager backend: the same wrapper, no code generation) now gives the net's loss."""
    m = module({"label_smoothing": 0.0})
    m.eval()  # dropout off: the two forwards agree
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0])
    m.log = lambda *a, **k: None  # no trainer to log into
    plain = m.training_step((x, y), 0)
    object.__setattr__(m, "_compiled", torch.compile(m.net, backend="eager"))
    compiled = m.training_step((x, y), 0)
    assert compiled.item() == pytest.approx(plain.item(), rel=1e-5)
