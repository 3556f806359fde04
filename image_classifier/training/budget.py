"""`train.time_budget=SECONDS`: as many epochs as fit that long, the schedule laid out for them.

A fixed number of epochs leaves a fast machine's spare minutes unused and overruns a slow one.
With a budget, a probe measures this machine first: a throwaway instance of the model goes
through the same Lightning loop (precision, device batches, augmentation, callbacks that cost
time) for a few training steps and one full validation. The run then gets the epochs that fit
what is left, and every random generator is put back as the probe found it, so it is the very
run `train.epochs=N` gives (N is printed and stored in the run's config). Ultralytics' `time=`
re-plans after every epoch instead; planning once keeps the one-cycle schedule smooth and the
run reproducible.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from image_classifier.errors import UserError
from image_classifier.training.callbacks import interruptible

SKIP_STEPS = 3  # the first steps pay for kernel selection, allocation and compilation
TIMED_STEPS = 20
MARGIN = 0.95  # epochs are planned to fill this share of what is left (logging)
CHECKPOINTS_PER_EPOCH = 2


class ProbeTimer(Callback):
    """Times training steps (stopping the probe after SKIP_STEPS + TIMED_STEPS) and the one
    validation that follows. A step's time runs from the end of the one before, the first from
    the epoch's start (the loader's start is paid by the steps)."""

    def __init__(self):
        self.last = self.val_start = 0.0
        self.gaps: list[float] = []  # each training step's seconds
        self.val_seconds = 0.0
        self.train_batches = self.val_batches = 0
        self.save_seconds = 0.0  # one checkpoint written (timed after the probe)

    def on_train_start(self, trainer, pl_module):
        self.train_batches = int(trainer.num_training_batches)

    def on_train_epoch_start(self, trainer, pl_module):
        self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.gaps.append(now - self.last)
        self.last = now
        if len(self.gaps) >= SKIP_STEPS + TIMED_STEPS:
            trainer.should_stop = True  # Lightning still validates once, as the probe wants

    def on_validation_start(self, trainer, pl_module):
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self.val_seconds = time.perf_counter() - self.val_start
        self.val_batches = int(sum(trainer.num_val_batches))

    def warming(self) -> int:
        """How many first steps are warm-up, not timed: SKIP_STEPS, but only the first in an
        epoch of SKIP_STEPS steps or fewer (a small folder; timing every one, a 45 s budget of 3
        steps an epoch planned 1.3 s an epoch and trained 30 s), none when there is one step."""
        n = len(self.gaps)
        return SKIP_STEPS if n > SKIP_STEPS else int(n > 1)

    def step_seconds(self) -> float:
        """Seconds per training step once warm."""
        timed = self.gaps[self.warming() :]
        return sum(timed) / len(timed)

    def warmup_seconds(self) -> float:
        """What the first steps cost beyond steady steps: paid again by the real run."""
        first = self.gaps[: self.warming()]
        return max(0.0, sum(first) - len(first) * self.step_seconds())


def validations_per_epoch(trainer_cfg, train_batches: int) -> float:
    """How often Lightning validates per epoch: trainer.val_check_interval as a fraction of an
    epoch or a number of steps, trainer.check_val_every_n_epoch."""
    every = int(trainer_cfg.get("check_val_every_n_epoch") or 1)
    interval = trainer_cfg.get("val_check_interval")
    per_epoch = 1.0
    if isinstance(interval, float) and 0 < interval < 1:
        per_epoch = math.floor(1 / interval)
    elif isinstance(interval, int) and 0 < interval < train_batches:
        per_epoch = train_batches // interval
    return per_epoch / every


def plan(
    budget: float, spent: float, timer: ProbeTimer, validations: float, sanity_steps: int = 2
) -> dict:
    """The epochs that fit `budget` seconds when `spent` are gone, from what the probe measured
    (`sanity_steps`: the validation batches Lightning's sanity check runs first; -1: all)."""
    train = timer.train_batches * timer.step_seconds()
    per_batch = timer.val_seconds / timer.val_batches if timer.val_batches else 0.0
    val = timer.val_seconds * validations
    sanity = per_batch * (
        timer.val_batches if sanity_steps < 0 else min(sanity_steps, timer.val_batches)
    )
    # last.ckpt every epoch and best.ckpt on each gain: on a tiny folder, whose epoch is a few
    # steps, the writes were a third of it (80 images: 0.10 s planned, 0.15 s taken)
    epoch = train + val + CHECKPOINTS_PER_EPOCH * timer.save_seconds
    left = budget - spent - timer.warmup_seconds() - sanity
    epochs = math.floor(MARGIN * left / epoch) if epoch > 0 else 0
    return {
        "budget_seconds": budget,
        "probe_seconds": round(spent, 2),
        "epoch_seconds": round(epoch, 2),
        "step_seconds": round(timer.step_seconds(), 4),
        "epochs": epochs,
    }


def fit_to_budget(cfg, make_module, make_callbacks, dm, started: float, trainer_kwargs: dict):
    """Probe a module from `make_module()` (with `make_callbacks()`, those that change a step's
    cost) on `dm`, then plan cfg.train.time_budget seconds counted from `started` (the run's
    perf_counter start). Every random generator is left as the probe found it. Raises UserError
    when not one epoch fits."""
    budget = float(cfg.train.time_budget)
    timer = ProbeTimer()
    probe_kwargs = {
        **trainer_kwargs,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "val_check_interval": None,
        "check_val_every_n_epoch": 1,
        "max_time": None,
    }
    probe = L.Trainer(callbacks=[timer, *make_callbacks()], **probe_kwargs)
    if probe.world_size > 1:  # Lightning's own reading of trainer.devices and num_nodes
        raise UserError(
            f"train.time_budget plans epochs for one device, not {probe.world_size} "
            f"(trainer.devices={cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes}): "
            "set train.epochs instead, or trainer.devices=1."
        )
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():  # the CPU generator and every CUDA one
        interruptible(
            probe,
            lambda: probe.fit(make_module(), datamodule=dm),
            lambda: (
                "train interrupted while it timed steps for train.time_budget: no epoch "
                "was trained, nothing was kept."
            ),
        )
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
    with tempfile.TemporaryDirectory() as folder:  # the first write pays one-time costs
        for _ in range(2):
            saving = time.perf_counter()
            probe.save_checkpoint(Path(folder) / "probe.ckpt")
            timer.save_seconds = time.perf_counter() - saving
    if not timer.gaps:
        raise UserError(
            f"train.time_budget={budget:g}: the probe ran no training step, so there is nothing "
            "to plan with (trainer.limit_train_batches=0, or no training images?)."
        )
    validations = validations_per_epoch(cfg.trainer, timer.train_batches)
    sanity = int(trainer_kwargs.get("num_sanity_val_steps", 2))  # Lightning's default: 2
    result = plan(budget, time.perf_counter() - started, timer, validations, sanity)
    if result["epochs"] < 1:
        raise UserError(
            f"train.time_budget={budget:g}: one epoch takes about {result['epoch_seconds']:.0f} s "
            f"on this machine, after {result['probe_seconds']:.0f} s of setup and probing, so "
            f"not one fits. Raise train.time_budget above {budget_for(result, 1):.0f}, or set "
            "train.time_budget=null and train.epochs."
        )
    return result


def budget_for(planned: dict, epochs: int) -> float:
    """The train.time_budget in seconds that fits `epochs` epochs, by what `plan` measured."""
    return planned["probe_seconds"] + epochs * planned["epoch_seconds"] / MARGIN
