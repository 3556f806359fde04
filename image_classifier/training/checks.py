"""Checks of a training run's settings against its data, before anything is built: splits
that leave train or validation empty, trainer.* limits that this data's batches cannot honour.
Each answers with one clear error (Lightning would raise mid-setup, with a traceback)."""

from __future__ import annotations

from image_classifier.errors import UserError


def validates(cfg) -> bool:
    """Whether training validates (trainer.limit_val_batches=0 turns it off)."""
    return cfg.trainer.get("limit_val_batches") != 0


def check_splits(cfg, sizes: dict) -> None:
    """train needs training images, and validation images unless validation is off
    (data.split may give either none: [0, 0, 1] tests a model on a whole folder)."""
    split = f"data.split={list(cfg.data.get('split') or [])}"
    if not sizes["train"]:
        raise UserError(
            f"No training images: {split} gives train none. Give train a ratio above 0, e.g. "
            "data.split=[0.8,0.1,0.1] (a split of [0,0,1] is for command=test on a whole folder)."
        )
    if not sizes["val"] and validates(cfg):
        raise UserError(
            f"No validation images: {split} gives val none, and train keeps its best epoch on "
            "validation and calibrates there. Give val a ratio above 0, or train without "
            "validation: trainer.limit_val_batches=0."
        )


def check_schedule_fits(cfg, per_epoch: int, epochs: int | None = None) -> None:
    """trainer.* settings that this data's batches (and `epochs`, once known) cannot honour, as
    one clear error before training starts (Lightning would raise mid-setup, with a
    traceback)."""
    t, fix = cfg.trainer, f"{per_epoch} training batch(es) an epoch here"
    limit = t.get("limit_train_batches")
    if isinstance(limit, float) and 0 < limit < 1 and int(per_epoch * limit) < 1:
        raise UserError(
            f"trainer.limit_train_batches={limit:g} of {fix} is less than one batch. Raise it "
            f"to at least {1 / per_epoch:.2g}, give a number of batches, or drop it."
        )
    interval, every = t.get("val_check_interval"), t.get("check_val_every_n_epoch")
    if isinstance(interval, int) and every is not None and interval > per_epoch:
        raise UserError(
            f"trainer.val_check_interval={interval} steps is more than the {fix}. Give at most "
            f"{per_epoch}, or a fraction of an epoch (trainer.val_check_interval=0.5)."
        )
    if every is not None and epochs is not None and int(every) > epochs:
        raise UserError(
            f"trainer.check_val_every_n_epoch={every} with {epochs} epoch(s): validation would "
            "never run, and train keeps its best epoch on validation and calibrates there. "
            f"Give at most {epochs}, or more train.epochs."
        )
