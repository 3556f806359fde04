"""Callbacks of our own; everything else is Lightning's (checkpointing, early stopping, LR)."""

import math

from lightning.pytorch.callbacks import Callback


class History(Callback):
    """Per-epoch metrics, kept in the checkpoint so `test` can draw the curves from it alone."""

    def __init__(self):
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            v = float(v)
            if math.isfinite(v) and not k.endswith("_step"):
                row[k] = v
        self.epochs = [e for e in self.epochs if e["epoch"] != row["epoch"]] + [row]

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict):
        self.epochs = list(state_dict.get("epochs", []))
