"""Callbacks of our own; everything else is Lightning's (checkpointing, early stopping, LR)."""

import math

from lightning.pytorch.callbacks import Callback


class History(Callback):
    """Per-epoch train and val metrics, kept in the checkpoint so `test` can draw the curves.

    A row is written at validation end, before Lightning's ModelCheckpoint (always run last)
    saves, so a checkpoint holds its own epoch; the train side comes from the module's running
    epoch metrics, which Lightning would only log after the checkpoint is written.
    """

    def __init__(self):
        self.epochs: list[dict] = []

    def _record(self, trainer, pl_module, with_val: bool):
        row = {"epoch": trainer.current_epoch}
        metrics = dict(pl_module.epoch_train_metrics())
        if with_val:
            metrics.update(
                {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            )
        for k, v in metrics.items():
            v = float(v)
            if math.isfinite(v):
                row[k] = v
        self.epochs = [e for e in self.epochs if e["epoch"] != row["epoch"]] + [row]

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._record(trainer, pl_module, with_val=True)

    def on_train_epoch_end(self, trainer, pl_module):
        if not any(
            e["epoch"] == trainer.current_epoch for e in self.epochs
        ):  # no validation this epoch
            self._record(trainer, pl_module, with_val=False)

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict):
        self.epochs = list(state_dict.get("epochs", []))
