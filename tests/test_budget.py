"""train.time_budget: a probe measures this machine, then the run gets the epochs that fit."""

from __future__ import annotations

import pytest
import torch

from image_classifier.errors import UserError
from image_classifier.models.checkpoint import load_module
from image_classifier.training.budget import ProbeTimer, plan, validations_per_epoch
from image_classifier.training.train import run_train


def _timer(first: float, step: float, steps: int, batches: int, val: float) -> ProbeTimer:
    t = ProbeTimer()
    t.gaps = [first] + [step] * (steps - 1)  # the first step costs `first`
    t.train_batches, t.val_batches, t.val_seconds = batches, 10, val
    return t


def test_plan_fills_what_is_left_with_whole_epochs():
    t = _timer(first=2.0, step=0.5, steps=23, batches=100, val=5.0)
    assert t.step_seconds() == pytest.approx(0.5)
    assert t.warmup_seconds() == pytest.approx(1.5)  # paid again by the run
    # 600 s, 20 spent: 600 - 20 - 1.5 (warm-up) - 1 (sanity check: 2 of 10 val batches) = 577.5 s
    # left; 50 s of steps + 5 s of validation an epoch; 95 % of 577.5 / 55 = 9.97
    p = plan(600, 20, t, validations=1)
    assert (p["epochs"], p["epoch_seconds"]) == (9, 55.0)
    assert plan(600, 20, t, validations=0.5)["epochs"] == 10  # validating every other epoch
    assert plan(60, 20, t, validations=1)["epochs"] == 0
    # the sanity check's share: none, 2 batches (1 s) or every batch (a whole validation, 5 s);
    # 603 s: 95 % of 581.5 / 55 = 10.04, of 580.5 / 55 = 10.03, of 576.5 / 55 = 9.96
    assert plan(603, 20, t, validations=1, sanity_steps=0)["epochs"] == 10
    assert plan(603, 20, t, validations=1)["epochs"] == 10
    assert plan(603, 20, t, validations=1, sanity_steps=-1)["epochs"] == 9
    # last.ckpt and best.ckpt written each epoch: 2 x 2.5 s more an epoch, 95 % of 577.5 / 60
    t.save_seconds = 2.5
    assert plan(600, 20, t, validations=1)["epoch_seconds"] == 60.0


def test_an_epoch_of_few_steps_times_all_but_its_first():
    """3 steps an epoch (84 images at batch 32): every step was timed, the first's warm-up with
    them, and a 45 s budget trained 30 s."""
    t = _timer(first=2.0, step=0.5, steps=3, batches=3, val=1.0)
    assert t.step_seconds() == pytest.approx(0.5) and t.warmup_seconds() == pytest.approx(1.5)
    one = _timer(first=2.0, step=0.5, steps=1, batches=1, val=1.0)  # nothing else to time
    assert one.step_seconds() == pytest.approx(2.0) and one.warmup_seconds() == 0.0


def test_validations_per_epoch_follow_the_trainer_settings():
    def per_epoch(every: int, interval):
        cfg = {"check_val_every_n_epoch": every, "val_check_interval": interval}
        return validations_per_epoch(cfg, train_batches=100)

    assert per_epoch(1, None) == 1
    assert per_epoch(2, None) == 0.5
    assert per_epoch(1, 0.25) == 4  # a fraction of an epoch
    assert per_epoch(1, 30) == 3  # every 30 steps: at steps 30, 60, 90


@pytest.fixture
def slow_machine(monkeypatch):
    """Steps timed at one second each, so the plan does not depend on this machine's speed."""
    monkeypatch.setattr(ProbeTimer, "step_seconds", lambda self: 1.0)


def test_budget_plans_the_epochs_and_train_epochs_repeats_the_run(
    make_cfg, folder_data, tmp_path, slow_machine
):
    common = [
        "data=folder",
        f"data.root={folder_data}",
        "logger.enabled=false",
        "trainer.deterministic=true",
        "train.early_stopping=0",
    ]
    r = run_train(make_cfg(*common, "train.time_budget=30", f"paths.output_dir={tmp_path}/b"))
    n = r["time_budget"]["epochs"]
    assert n >= 1 and r["epochs"] == n
    assert r["time_budget"]["step_seconds"] == 1.0
    module = load_module(r["last_checkpoint"])
    assert module.hparams.config["train"]["epochs"] == n  # stored: the run can be repeated
    # the probe left every random generator as it found it: the same run, step for step
    again = run_train(make_cfg(*common, f"train.epochs={n}", f"paths.output_dir={tmp_path}/e"))
    a, b = module.state_dict(), load_module(again["last_checkpoint"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_shorter_than_an_epoch_is_a_clear_error(make_cfg, folder_data, slow_machine):
    cfg = make_cfg("data=folder", f"data.root={folder_data}", "logger.enabled=false")
    cfg.train.time_budget = 2
    with pytest.raises(
        UserError,
        match=r"train.time_budget=2: one epoch takes about \d+ s .*"
        r"not one fits. Raise train.time_budget above \d+",
    ):
        run_train(cfg)


def test_a_probe_without_training_steps_is_a_clear_error(make_cfg, folder_data):
    cfg = make_cfg(
        "data=folder",
        f"data.root={folder_data}",
        "logger.enabled=false",
        "train.time_budget=60",
        "trainer.limit_train_batches=0",
    )
    with pytest.raises(UserError, match="the probe ran no training step"):
        run_train(cfg)


def test_a_budget_is_for_one_device(make_cfg, folder_data):
    cfg = make_cfg(
        "data=folder", f"data.root={folder_data}", "train.time_budget=60", "trainer.devices=2"
    )
    with pytest.raises(UserError, match="train.time_budget plans epochs for one device"):
        run_train(cfg)
