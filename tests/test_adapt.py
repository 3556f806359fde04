"""Defaults that follow the data (training/adapt.py, data/profile.py): model, size and epochs."""

import re

import pytest
from conftest import compose_cfg, make_class_folders, twelve_bit_folder
from omegaconf import OmegaConf

from image_classifier.data.datamodule import AUTO_BATCH
from image_classifier.data.profile import auto_size, profile_folder
from image_classifier.data.splits import preprocessing_for
from image_classifier.training.adapt import (
    FROZEN_STAGES,
    MAX_EPOCHS,
    MIN_EPOCHS,
    MIN_STEPS,
    annealed_runs_whole,
    choose_batch_size,
    choose_epochs,
    choose_frozen_stages,
    choose_model_and_size,
    small_folder_batch,
)


def colour_folder_cfg(tmp_path, size: int, *overrides: str):
    """The config for a small RGB class-folder tree of `size` px images, with `overrides`."""
    root = make_class_folders(tmp_path / "img", per_class=4, size=size, mode="RGB")
    return compose_cfg(tmp_path, "data=folder", f"data.root={root}", *overrides)


def grey_folder_cfg(tmp_path, *overrides: str):
    """The config for a tiny grey class-folder tree (3 classes of 4 images, 12 px), untracked."""
    root = make_class_folders(tmp_path / "img", per_class=4, size=12)
    return compose_cfg(
        tmp_path, "data=folder", f"data.root={root}", "logger.enabled=false", *overrides
    )


def test_profile_reads_count_colour_and_median_size(tmp_path):
    make_class_folders(tmp_path / "grey", per_class=4, size=20)
    make_class_folders(tmp_path / "rgb", per_class=4, size=40, mode="RGB")
    (tmp_path / "grey" / "cat" / "notes.txt").write_text("not an image")
    grey, rgb = profile_folder(tmp_path / "grey"), profile_folder(tmp_path / "rgb")
    assert (grey.images, grey.colour, grey.median_size) == (12, False, (20, 20))
    assert (rgb.images, rgb.colour, rgb.median_size) == (12, True, (40, 40))


def test_portrait_phone_photos_get_a_portrait_size(tmp_path):
    """A phone stores a portrait photo landscape with an EXIF quarter turn: the profile read the
    stored size, so data.size=auto was landscape (192x224 for these) and every photo,
    turned upright when decoded, was squeezed into it."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400 wide, 300 tall; shown 300 wide, 400 tall
    for c in ("a", "b"):
        (tmp_path / "phone" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (400, 300), (200, 40 * i, 0)).save(
                tmp_path / "phone" / c / f"{i}.jpg", exif=exif
            )
    profile = profile_folder(tmp_path / "phone")
    assert profile.median_size == (400, 300)  # (height, width) as shown
    assert profile.describe().endswith("median 300 px wide, 400 high")  # said as a viewer says it
    assert auto_size(profile.median_size, pretrained=True) == [224, 192]  # portrait


def test_grey_pictures_saved_in_a_colour_mode_are_grey(tmp_path):
    """An X-ray or a scan saved as an RGB JPEG was 'colour' from its header: a 28 px folder was
    fine-tuned at 160 px (118 s) where the small grey rule trains the CNN at 28 px."""
    from PIL import Image

    from image_classifier.data.profile import detect_channels

    grey = make_class_folders(tmp_path / "grey", per_class=4, size=40)
    for p in list(grey.rglob("*.png")):
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    profile = profile_folder(grey)
    assert (profile.images, profile.colour) == (12, False)
    assert detect_channels([str(p) for p in grey.rglob("*.jpg")]) == 1
    rgb = make_class_folders(tmp_path / "rgb", per_class=4, size=40, mode="RGB")
    one = next(rgb.rglob("*.png"))  # a single colour picture among grey ones makes it colour
    for p in list(rgb.rglob("*.png")):
        if p != one:
            Image.open(p).convert("L").convert("RGB").save(p)
    assert profile_folder(rgb).colour and detect_channels([str(p) for p in rgb.rglob("*.png")]) == 3


@pytest.mark.parametrize(
    "median, pretrained, size",
    [
        ((28, 28), False, [28, 28]),  # Fashion-MNIST-like: as it is
        ((8, 8), False, [16, 16]),  # too small for three stages of pooling: up to 16
        ((480, 640), False, [48, 64]),  # photos for a scratch net: longer side 64, in proportion
        ((80, 80), True, [160, 160]),  # pretrained: enlarged to at least 160 ...
        ((100, 300), True, [160, 224]),  # ... a side past 224 clamped ...
        ((1000, 800), True, [224, 192]),  # ... at most 224
    ],
)
def test_auto_size(median, pretrained, size):
    assert auto_size(median, pretrained) == size


def test_colour_folder_gets_the_pretrained_backbone_at_its_own_size(tmp_path):
    root = make_class_folders(tmp_path / "img", per_class=4, size=80, mode="RGB")
    auto = compose_cfg(tmp_path, "data=folder", f"data.root={root}", "model=auto")
    cfg, notes = choose_model_and_size(auto)
    assert cfg.model.name == "tf_efficientnet_lite0" and cfg.model.pretrained
    assert list(cfg.data.size) == [160, 160]
    assert list(cfg.model.mean) == [0.5, 0.5, 0.5]  # the model config's interpolations resolve
    assert notes[0].startswith("model=efficientnet_lite0 (12 colour images, median 80 px wide")
    assert notes[1].startswith("data.size=[160, 160] (median 80 px wide, 80 high; pretrained")
    # 1/12 of 160 px; flips once the data is read (training/mirror.py)
    assert (cfg.train.augment.hflip, cfg.train.augment.shift) == ("auto", 13)
    assert notes[2].startswith("train.augment.shift=13 (fine-tuning: random shifts")
    assert (cfg.train.lr, notes[3]) == (
        6e-3,
        "train.lr=0.006 (fine-tuning: twice the from-scratch rate)",
    )
    assert auto.train.augment.hflip is False and auto.train.lr == 3e-3  # the given config is kept


def test_fine_tuning_flips_and_shifts_yield_to_any_given_augment(tmp_path, monkeypatch):
    """model=auto's fine-tuning augmentation stays off when the config sets flips or shifts, or
    the command line names either (even at its default value), or an experiment is given."""
    from image_classifier.training import adapt

    root = make_class_folders(tmp_path / "img", per_class=4, size=80, mode="RGB")
    common = (tmp_path, "data=folder", f"data.root={root}", "model=auto")
    cfg, notes = choose_model_and_size(compose_cfg(*common, "train.augment.shift=3"))
    assert (cfg.train.augment.hflip, cfg.train.augment.shift, len(notes)) == (False, 3, 3)
    for given in (["train.augment.hflip"], ["experiment"]):
        monkeypatch.setattr(adapt, "command_line_overrides", lambda given=given: given)
        cfg, notes = choose_model_and_size(compose_cfg(*common))
        assert (cfg.train.augment.hflip, cfg.train.augment.shift) == (False, 0)
        rate = [n.split(" (")[0] for n in notes[2:]]  # an experiment keeps its own rate too
        assert rate == ([] if given == ["experiment"] else ["train.lr=0.006"])


def test_fine_tuning_rate_yields_to_a_given_rate_and_a_model_named(tmp_path, monkeypatch):
    """model=auto's fine-tuning takes FINE_TUNE_LR unless the command line names train.lr (even
    at its default) or an experiment; a model named, or trained from scratch, keeps train.lr."""
    from image_classifier.training import adapt

    root = make_class_folders(tmp_path / "img", per_class=4, size=80, mode="RGB")
    common = (tmp_path, "data=folder", f"data.root={root}")
    assert choose_model_and_size(compose_cfg(*common, "model=auto"))[0].train.lr == 6e-3
    named = choose_model_and_size(compose_cfg(*common, "model=efficientnet_lite0"))
    assert named[0].train.lr == 3e-3 and not any("train.lr" in n for n in named[1])
    grey = make_class_folders(tmp_path / "grey", per_class=4, size=12)
    scratch = compose_cfg(tmp_path, "data=folder", f"data.root={grey}", "model=auto")
    assert choose_model_and_size(scratch)[0].train.lr == 3e-3
    for given in (["train.lr"], ["experiment"]):
        monkeypatch.setattr(adapt, "command_line_overrides", lambda given=given: given)
        cfg, notes = choose_model_and_size(compose_cfg(*common, "model=auto", "train.lr=3e-3"))
        assert cfg.train.lr == 3e-3 and not any("train.lr" in n for n in notes)


def test_head_takes_the_size_its_backbone_sees(tmp_path):
    """model=head trains on features computed at features.size: data.size=auto says so, not
    the from-scratch limits of the median size."""
    root = make_class_folders(tmp_path / "img", per_class=4, size=80, mode="RGB")
    head = compose_cfg(tmp_path, "data=folder", f"data.root={root}", "model=head")
    cfg, notes = choose_model_and_size(head)
    assert list(cfg.data.size) == list(cfg.features.size) == [224, 224]
    assert notes == ["data.size=[224, 224] (model=head: the backbone's features.size)"]


def test_small_grey_folder_gets_the_cnn_and_explicit_values_win(tmp_path):
    root = make_class_folders(tmp_path / "img", per_class=4, size=20)
    auto = compose_cfg(tmp_path, "data=folder", f"data.root={root}", "model=auto")
    cfg, notes = choose_model_and_size(auto)
    assert (cfg.model.name, list(cfg.data.size)) == ("cnn", [20, 20])
    assert (cfg.train.augment.hflip, cfg.train.augment.shift) == (False, 0)  # from scratch: off
    given = compose_cfg(
        tmp_path, "data=folder", f"data.root={root}", "model=cnn4", "data.size=[32,32]"
    )
    cfg, notes = choose_model_and_size(given)
    assert notes == [] and cfg.model.name == "cnn" and list(cfg.data.size) == [32, 32]
    assert OmegaConf.select(given, "model.channels") == OmegaConf.select(cfg, "model.channels")
    # one number is a square, for training and for the commands that only read the data
    square = compose_cfg(tmp_path, "data=folder", f"data.root={root}", "data.size=24")
    assert preprocessing_for(square.data, 1).size == (24, 24)
    cfg, notes = choose_model_and_size(square)
    assert list(cfg.data.size) == [24, 24]


def test_fashion_mnist_default_job_keeps_the_cnn_and_gets_four_epochs(tmp_path):
    cfg = compose_cfg(tmp_path, "train.epochs=auto", "train.batch_size=128", "model=auto")
    cfg, notes = choose_model_and_size(cfg)
    assert cfg.model.name == "cnn" and list(cfg.data.size) == [28, 28]
    assert (cfg.train.augment.hflip, cfg.train.augment.shift, notes[1:]) == (False, 0, [])
    cfg, notes = choose_epochs(cfg, 55000)  # 430 steps an epoch: the epochs' floor binds
    assert cfg.train.epochs == MIN_EPOCHS["scratch"] == 4
    assert notes[0].startswith("train.epochs=4 (1720 steps: at least 1000 and 4 epochs for a from")
    tuned = colour_folder_cfg(
        tmp_path, 8, "model=efficientnet_lite0", "train.batch_size=32", "train.epochs=auto"
    )
    big, notes = choose_epochs(tuned, 9600)
    assert big.train.epochs == MIN_EPOCHS["pretrained"] == 3  # 300 steps an epoch at batch 32
    assert notes[0].startswith("train.epochs=3 (900 steps: at least 300 and 3 epochs for a pre")


def test_epochs_give_a_small_folder_enough_steps(tmp_path):
    cfg = compose_cfg(tmp_path, "train.epochs=auto", "train.batch_size=128", "model=cnn")
    small, notes = choose_epochs(cfg, 1433)  # 12 steps an epoch
    assert small.train.epochs == -(-MIN_STEPS["scratch"] // 12) == 84
    # the one-cycle schedule runs whole: stopping early would cut it in its high-rate middle
    assert small.train.early_stopping == 0 and "the whole onecycle schedule" in notes[0]
    stepped, notes = choose_epochs(
        compose_cfg(tmp_path, "train.epochs=auto", "train.batch_size=128", "train.scheduler=step"),
        1433,
    )
    assert stepped.train.early_stopping == 17  # a fifth of the schedule
    assert "early stopping after 17 epochs" in notes[0]
    assert choose_epochs(cfg, 500)[0].train.epochs == 250  # 4 steps an epoch: its 1,000 steps
    # early stopping asked for on the command line is kept as given, whatever the schedule
    from image_classifier.training import adapt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapt, "command_line_overrides", lambda: ["train.early_stopping"])
        asked, notes = choose_epochs(cfg, 1433)
    assert asked.train.early_stopping == 5 and "early stopping after 5 epochs" in notes[0]
    tiny, _ = choose_epochs(cfg, 40)
    assert tiny.train.epochs == MAX_EPOCHS == 250  # capped
    given, notes = choose_epochs(compose_cfg(tmp_path, "train.epochs=2"), 40)
    assert given.train.epochs == 2 and notes == []
    tuned = compose_cfg(
        tmp_path, "train.epochs=auto", "train.batch_size=128", "model=efficientnet_lite0"
    )
    assert choose_epochs(tuned, 1433)[0].train.epochs == -(-MIN_STEPS["pretrained"] // 12)


def test_an_annealed_schedule_runs_whole_with_given_or_budgeted_epochs(tmp_path, monkeypatch):
    """100 images, train.epochs=100 (or train.time_budget=30): early stopping's patience of 5
    stopped the one-cycle schedule after 6 epochs, in its warm-up, at chance (10 %). The rule
    train.epochs=auto follows holds for any epochs: off, unless given on the command line."""
    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.training import adapt
    from image_classifier.training.train import run_train

    given = compose_cfg(tmp_path, "train.epochs=100", "train.early_stopping=5")
    cfg, notes = annealed_runs_whole(given)
    assert cfg.train.early_stopping == 0 and "onecycle schedule anneals" in notes[0]
    stepped = compose_cfg(tmp_path, "train.epochs=100", "train.scheduler=step")
    assert annealed_runs_whole(stepped)[0].train.early_stopping == 5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapt, "command_line_overrides", lambda: ["train.early_stopping"])
        assert annealed_runs_whole(given)[0].train.early_stopping == 5
    # through train: with a patience of one epoch, all 8 epochs run, and the summary says why
    r = run_train(grey_folder_cfg(tmp_path, "train.epochs=8", "train.early_stopping=1"))
    assert ckpt_file.read(r["last_checkpoint"])["epoch"] == 7
    assert any(n.startswith("train.early_stopping=0 (the onecycle") for n in r["chosen"])


def test_a_tiny_folder_gets_a_smaller_batch_to_reach_its_steps(tmp_path):
    """Under train.batch_size=auto, a folder whose MAX_EPOCHS epochs at batch 128 fall short of
    MIN_STEPS gets the batch halved (not below 16) until they do; a given batch is kept, and a
    note that cannot reach its steps says so instead of claiming them."""
    cfg = compose_cfg(tmp_path, "train.epochs=auto", "train.batch_size=128", "model=cnn")

    def chosen(n: int, auto_batch: bool = True):
        halved, notes = small_folder_batch(cfg, n, auto_batch)
        epochs, notes = choose_epochs(halved, n, notes)
        return epochs, notes

    halved, notes = chosen(80)
    assert (halved.train.batch_size, halved.train.epochs) == (16, 200)  # 5 steps an epoch
    assert notes[0] == (
        "train.batch_size=16 (128 halved, not below 16: more steps an epoch for 80 train images)"
    )
    assert notes[1].startswith("train.epochs=200 (1000 steps: at least 1000 for a from-scratch")
    assert chosen(500)[0].train.batch_size == 128  # 4 an epoch
    floor, notes = chosen(20)  # 2 steps an epoch at 16, 1 at 128
    assert floor.train.batch_size == 16 and "500 steps: 1000 wanted, 250 epochs at most" in notes[1]
    same, notes = chosen(10)  # 1 step an epoch at any batch: kept
    assert same.train.batch_size == 128 and len(notes) == 1
    given, notes = chosen(80, auto_batch=False)
    assert given.train.batch_size == 128 and len(notes) == 1
    assert notes[0].startswith("train.epochs=250 (250 steps: 1000 wanted, 250 epochs at most")
    # whatever sets the epochs: given ones (and a time budget's) get the smaller batch too
    fixed = compose_cfg(tmp_path, "train.epochs=100", "train.batch_size=128", "model=cnn")
    assert small_folder_batch(fixed, 80, True)[0].train.batch_size == 16


def test_train_batches_a_tiny_folder_at_the_smaller_batch(tmp_path, monkeypatch):
    """Through `train`: the halved batch replaces the first batch note and is what the loader
    uses (the steps taken match it)."""
    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.training import adapt
    from image_classifier.training.train import run_train

    monkeypatch.setattr(adapt, "MIN_STEPS", {"scratch": 8, "pretrained": 8})
    monkeypatch.setattr(adapt, "MAX_EPOCHS", 3)
    monkeypatch.setattr(adapt, "MIN_AUTO_BATCH", 2)
    cfg = grey_folder_cfg(
        tmp_path, "model=cnn", "train.batch_size=auto", "train.epochs=auto", "train.calibrate=false"
    )
    r = run_train(cfg)
    notes = [n for n in r["chosen"] if n.startswith("train.batch_size=")]
    assert len(notes) == 1 and notes[0].startswith("train.batch_size=2 (128 halved")
    train_images = int(re.search(r"for (\d+) train images", notes[0]).group(1))
    steps = 3 * -(-train_images // 2)
    assert steps >= 8 and ckpt_file.read(r["last_checkpoint"])["global_step"] == steps


def test_batch_size_auto_fine_tunes_in_smaller_steps_and_a_given_size_wins(tmp_path):
    """train.batch_size=auto (the default): 32 fine-tuning a pretrained network, 128 from
    scratch; the note says which; a number is kept as given; epochs=auto counts the steps of
    the batch chosen."""
    auto = colour_folder_cfg(
        tmp_path, 80, "model=auto", "train.batch_size=auto", "train.epochs=auto"
    )
    tuned, notes = choose_batch_size(choose_model_and_size(auto)[0])
    assert tuned.train.batch_size == AUTO_BATCH["pretrained"] == 32
    assert notes == ["train.batch_size=32 (fine-tuning a pretrained network)"]
    epochs, notes = choose_epochs(tuned, 240)  # 8 steps an epoch
    assert epochs.train.epochs == -(-MIN_STEPS["pretrained"] // 8) == 38
    assert notes[0].startswith("train.epochs=38 (304 steps: at least 300 for a pretrained")
    scratch, notes = choose_batch_size(compose_cfg(tmp_path, "model=cnn", "train.batch_size=auto"))
    assert (scratch.train.batch_size, notes) == (128, ["train.batch_size=128 (from scratch)"])
    given, notes = choose_batch_size(
        compose_cfg(tmp_path, "model=efficientnet_lite0", "train.batch_size=64")
    )
    assert (given.train.batch_size, notes) == (64, [])


def test_frozen_stages_auto_keeps_a_fine_tuned_networks_first_stages_and_a_given_number_wins(
    tmp_path,
):
    tuned, notes = choose_frozen_stages(compose_cfg(tmp_path, "model=efficientnet_lite0"))
    assert tuned.train.frozen_stages == FROZEN_STAGES == 2
    assert notes == [
        "train.frozen_stages=2 (fine-tuning: the first 2 feature stages and the stem before "
        "them keep their pretrained weights)"
    ]
    for scratch in ("model=cnn", "model=resnet18_transfer"):  # from scratch; a frozen backbone
        cfg, notes = choose_frozen_stages(compose_cfg(tmp_path, scratch))
        assert (cfg.train.frozen_stages, notes) == (0, [])
    given = compose_cfg(tmp_path, "model=efficientnet_lite0", "train.frozen_stages=0")
    assert choose_frozen_stages(given)[0].train.frozen_stages == 0


def test_frozen_stages_get_no_gradient_and_keep_their_weights_while_the_rest_trains():
    """A training step reaches every weight after the frozen stages and none up to them; batch
    norm statistics in the frozen stages still follow the data."""
    import timm
    import torch

    from image_classifier.errors import UserError
    from image_classifier.models.pretrained import freeze_stages

    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=3)
    assert freeze_stages(net, 2) == "layer1"  # stage 1 is resnet's stem (act1), 2 is layer1
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    stats = net.layer1[0].bn1.running_mean.clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 64, 64)), torch.arange(4) % 3)
    loss.backward()
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n in before if n.split(".")[0] in ("conv1", "bn1", "layer1")}
    assert frozen and not frozen & changed and "fc.weight" in changed
    assert {n for n, p in net.named_parameters() if p.grad is None} == frozen
    assert not torch.equal(stats, net.layer1[0].bn1.running_mean)
    with pytest.raises(UserError, match=r"ResNet has 5 feature stages \(act1, layer1.*up to 5"):
        freeze_stages(net, 6)


def test_fine_tuning_leaves_the_frozen_stages_at_their_pretrained_weights(tmp_path):
    """Through `train`: frozen_stages=auto resolves to 2 for the pretrained network, the run
    stores the number, and its checkpoint keeps the stem and first two stages as they were
    loaded while the later stages moved."""
    import torch

    from image_classifier.models.checkpoint import load_module
    from image_classifier.models.factory import create_model
    from image_classifier.training.train import run_train

    cfg = colour_folder_cfg(
        tmp_path,
        40,
        "model=efficientnet_lite0",
        "data.size=[32,32]",
        "train.frozen_stages=auto",
        "logger.enabled=false",
    )
    r = run_train(cfg)
    assert "train.frozen_stages=2 (fine-tuning" in " ".join(r["chosen"])
    trained = load_module(r["checkpoint"]).net.net.state_dict()
    start = create_model("tf_efficientnet_lite0", num_classes=3, in_chans=3, pretrained=True)
    start = start.state_dict()
    same = {k for k in start if "running" not in k and "num_batches" not in k}
    same = {k for k in same if torch.equal(start[k], trained[k])}
    assert {"conv_stem.weight", "blocks.1.1.conv_pwl.weight"} <= same
    assert "blocks.2.0.conv_pwl.weight" not in same and "classifier.weight" not in same


def test_epochs_auto_given_on_the_command_line_is_left_to_the_data(tmp_path):
    """`train.epochs=auto` spelled out (a sweep `train.epochs=auto,20`) once crashed with
    int('auto'); it asks for no number, so a resumed run keeps its own."""
    from image_classifier.training.resume import asked_epochs

    assert asked_epochs(compose_cfg(tmp_path, "train.epochs=auto")) is None
    assert asked_epochs(compose_cfg(tmp_path, "train.epochs=7")) == 7


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.limit_train_batches=0.5",
            "trainer.limit_train_batches=0.5 of 1 training batch(es) an epoch here is less than "
            "one batch. Raise it to at least 1,",
        ),
        (
            "trainer.val_check_interval=2",
            "trainer.val_check_interval=2 steps is more than the 1 training batch(es) an epoch "
            "here. Give at most 1,",
        ),
        (
            "trainer.check_val_every_n_epoch=3",
            "trainer.check_val_every_n_epoch=3 with 2 epoch(s): validation would never run",
        ),
    ],
)
def test_trainer_settings_this_data_cannot_honour_stop_before_training(tmp_path, override, message):
    """Each once ended in a traceback from Lightning mid-setup, or (validation never run) in
    "Checkpoint last.ckpt does not exist". Now one clear error, before any training."""
    from image_classifier.errors import UserError
    from image_classifier.training.train import run_train

    cfg = grey_folder_cfg(tmp_path, "train.epochs=2", "train.batch_size=128", override)
    with pytest.raises(UserError) as e:
        run_train(cfg)
    assert message in str(e.value)
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_a_time_budget_checks_the_trainer_settings_before_its_probe(tmp_path):
    """train.time_budget probes a Trainer first: it too raised Lightning's traceback."""
    from image_classifier.errors import UserError
    from image_classifier.training.train import run_train

    cfg = grey_folder_cfg(
        tmp_path, "train.time_budget=30", "train.batch_size=128", "trainer.limit_train_batches=0.5"
    )
    with pytest.raises(UserError, match="limit_train_batches=0.5 of 1 training batch"):
        run_train(cfg)


def test_train_refuses_a_split_that_gives_train_or_validation_no_images():
    from image_classifier.errors import UserError
    from image_classifier.training.checks import check_splits

    cfg = OmegaConf.create({"data": {"split": [0, 0, 1]}, "trainer": {}})
    with pytest.raises(UserError, match=r"No training images: data.split=\[0, 0, 1\] gives"):
        check_splits(cfg, {"train": 0, "val": 0, "test": 30})
    cfg.data.split = [0.9, 0, 0.1]
    with pytest.raises(UserError, match="or train without validation: trainer.limit_val_batches=0"):
        check_splits(cfg, {"train": 27, "val": 0, "test": 3})
    cfg.trainer.limit_val_batches = 0
    check_splits(cfg, {"train": 27, "val": 0, "test": 3})


def test_a_resumed_one_cycle_run_cannot_be_stretched_but_other_schedules_can():
    from image_classifier.errors import UserError
    from image_classifier.training.resume import check_stretch

    cfg = OmegaConf.create({"train": {"epochs": 5, "scheduler": "onecycle"}})
    check_stretch(cfg, None)
    check_stretch(cfg, 5)
    with pytest.raises(UserError, match=r"train.epochs=8: .* laid out for 5 epochs and cannot be"):
        check_stretch(cfg, 8)
    cfg.train.scheduler = "cosine"
    check_stretch(cfg, 8)


def test_a_run_resumes_only_on_the_classes_it_was_trained_with(tmp_path, caplog):
    """Resuming after a class folder was added ended in a state_dict size-mismatch traceback."""
    from types import SimpleNamespace

    import torch

    from image_classifier.errors import UserError
    from image_classifier.training.resume import check_resumed_data

    last = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"classes": ["a", "b"], "data": {"hash": "h1"}}}, last)
    check_resumed_data(last, SimpleNamespace(classes=["a", "b"], data_hash="h1"))
    with pytest.raises(
        UserError, match=r"classes changed since .*last.ckpt was written; only in the data: c\."
    ):
        check_resumed_data(last, SimpleNamespace(classes=["a", "b", "c"], data_hash="h2"))
    with pytest.raises(UserError, match="; the same names in another order"):
        check_resumed_data(last, SimpleNamespace(classes=["b", "a"], data_hash="h1"))
    check_resumed_data(last, SimpleNamespace(classes=["a", "b"], data_hash="h2"))
    assert "Resuming on data that changed since last.ckpt was written" in caplog.text


def test_a_given_size_far_past_what_auto_takes_is_warned_of(tmp_path, caplog):
    """data.size=5000 for 40x50 px images (a typo for 500?) built a 4.5 GB cache unasked."""
    root = make_class_folders(tmp_path / "img", per_class=4, size=20)
    for model, size, warned in (("cnn", "400", True), ("cnn", "32", False), ("auto", "400", True)):
        caplog.clear()  # model=auto, the folder default, chooses the network first
        cfg = compose_cfg(
            tmp_path, "data=folder", f"data.root={root}", f"model={model}", f"data.size={size}"
        )
        choose_model_and_size(cfg)
        assert ("400x the pixels data.size=auto would take ([20, 20]" in caplog.text) is warned


def test_a_pretrained_network_given_a_side_under_its_stride_is_warned_of(tmp_path, caplog):
    """data.size=[7,7] fine-tuned EfficientNet-Lite0 without a word, to chance (25 % of 4)."""
    root = make_class_folders(tmp_path / "img", per_class=4, size=40, mode="RGB")
    for model, size, warned in (
        ("efficientnet_lite0", 7, True),
        ("efficientnet_lite0", 32, False),
        ("cnn", 8, False),
    ):
        caplog.clear()
        cfg = compose_cfg(
            tmp_path, "data=folder", f"data.root={root}", f"model={model}", f"data.size={size}"
        )
        choose_model_and_size(cfg)
        said = f"data.size=[{size}, {size}] is under the 32 px stride of the pretrained network"
        assert (said in caplog.text) is warned, caplog.text
        assert ("data.size=auto takes [160, 160] for these images" in caplog.text) is warned


def test_twelve_bit_greys_are_scaled_by_their_own_depth_and_the_model_keeps_it(tmp_path):
    """12-bit scans in 16-bit PNGs were scaled by 65535: 16 grey levels, every audited image
    "dark", and 67.5 % validation accuracy where the same scans as 8-bit PNGs trained to 97.5 %
    (docs/benchmarks.md). data.grey_white=auto takes the images' bit depth from the brightest
    sampled image; the choice is in the summary and in the model's preprocessing."""
    from image_classifier.data.profile import choose_grey_white, grey_white
    from image_classifier.data.splits import load_splits

    root = twelve_bit_folder(tmp_path / "scans")
    cfg = compose_cfg(tmp_path, "data=folder", f"data.root={root}", "data.size=16")
    resolved, notes = choose_grey_white(cfg)
    assert resolved.data.grey_white == 4095 and notes == [
        "data.grey_white=4095 (12 of 12 sampled images 16- or 32-bit grey, the brightest of 12 "
        "read at 3,000: 12-bit values, 4,095 shown as white)"
    ]
    datasets, info = load_splits(resolved.data, project_root=tmp_path)
    assert info.preprocessing.grey_white == 4095 and info.preprocessing.to_dict()["grey_white"]
    brightest = max(int(x.max()) for x, _ in datasets["train"])
    assert brightest == round(3000 * 255 / 4095)  # 187: by 65535 it was 12
    given = compose_cfg(tmp_path, "data=folder", f"data.root={root}", "data.grey_white=1023")
    assert grey_white(given.data) == (1023, "") and choose_grey_white(given)[1] == []
    full = twelve_bit_folder(tmp_path / "full", top=60000)
    assert grey_white(compose_cfg(tmp_path, "data=folder", f"data.root={full}").data)[0] == 65535
    eight = make_class_folders(tmp_path / "eight", per_class=2)
    cfg8 = compose_cfg(tmp_path, "data=folder", f"data.root={eight}")
    assert grey_white(cfg8.data) == (None, "") and choose_grey_white(cfg8)[1] == []
    assert "grey_white" not in preprocessing_for(cfg8.data, 1).to_dict()  # cache keys as before


def png_16bit_rgb(path, rgb) -> None:
    """A 16-bit-a-channel colour PNG (PIL writes none), rows unfiltered."""
    import struct
    import zlib

    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
    head = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    ihdr, idat = chunk(b"IHDR", head), chunk(b"IDAT", zlib.compress(rows))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat + chunk(b"IEND", b""))


@pytest.mark.parametrize(("top", "warned"), [(4095, True), (65535, False)])
def test_12_bit_colour_is_named_before_it_trains_nearly_black(tmp_path, caplog, top, warned):
    """A 12-bit colour camera's 16-bit PNGs read (top 8 bits) as 0-15: a warning names them and
    the conversion; full 16-bit colour reads fine and says nothing."""
    import numpy as np

    from image_classifier.data.profile import choose_grey_white

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(3):
            rgb = rng.integers(0, top + 1, (20, 24, 3)).astype(np.uint16)
            png_16bit_rgb(tmp_path / "img" / name / f"{i}.png", rgb)
    cfg = compose_cfg(tmp_path, "data=folder", f"data.root={tmp_path / 'img'}")
    choose_grey_white(cfg, profile_folder(cfg.data.root))
    said = "6 of 6 sampled images are 16-bit colour (e.g. "
    assert (said in caplog.text) is warned, caplog.text
    assert ("mogrify -evaluate multiply 16 -depth 8" in caplog.text) is warned


def test_a_bad_grey_white_is_refused_with_its_options():
    from image_classifier import CONFIG_DIR
    from image_classifier.config import check_command_line
    from image_classifier.errors import UserError

    with pytest.raises(UserError) as e:
        check_command_line(["command=train", "data=folder", "data.grey_white=bright"], CONFIG_DIR)
    assert "data.grey_white='bright'" in str(e.value) and "auto" in str(e.value)
