"""Optimisers and learning-rate schedules by name.

These tables build the objects and are also the options that config validation offers
(`train.optimizer`, `train.scheduler`), so the two never disagree. Torch is imported only when
something is built: validating a config stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from image_classifier.errors import UserError, did_you_mean


def _adam(params, o: dict, net=None):
    import torch

    return torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])


def _adamw(params, o: dict, net=None):
    import torch

    return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])


def _sgd(params, o: dict, net=None):
    import torch

    return torch.optim.SGD(
        params,
        lr=o["lr"],
        momentum=o.get("momentum", 0.9),
        weight_decay=o["weight_decay"],
        nesterov=True,
    )


def _muon(params, o: dict, net=None):
    from image_classifier.models.muon import MuonAdamW

    scale = o.get("muon_lr_scale", 1.0)  # > 0: config.py's rule
    return MuonAdamW(params, lr=o["lr"], weight_decay=o["weight_decay"], net=net, lr_scale=scale)


OPTIMIZERS: dict[str, Callable] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd, "muon": _muon}


def _plateau(opt, o: dict, steps: Callable[[], int]) -> dict:
    import torch

    s = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=o.get("gamma", 0.5), patience=o.get("patience", 2)
    )
    return {"scheduler": s, "monitor": o.get("monitor") or "val/acc"}  # train.monitor


def _step(opt, o: dict, steps: Callable[[], int]) -> dict:
    import torch

    s = torch.optim.lr_scheduler.StepLR(
        opt, step_size=o.get("step_size", 2), gamma=o.get("gamma", 0.8)
    )
    return {"scheduler": s, "interval": "epoch"}


def _cosine(opt, o: dict, steps: Callable[[], int]) -> dict:
    import torch

    s = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps()))
    return {"scheduler": s, "interval": "step"}


def _onecycle(opt, o: dict, steps: Callable[[], int]) -> dict:
    import torch

    total = max(2, steps())
    # OneCycleLR divides by each phase's length: warmup x total - 1 steps up, zero at 4 steps
    # and the default 0.25 (a 500-image folder with train.epochs=1), and the rest down. At least
    # 1.5 steps up, and half a step down.
    warmup = min(max(float(o.get("warmup", 0.25)), 1.5 / total), 1 - 0.5 / total)
    s = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=o["lr"], total_steps=total, pct_start=warmup
    )
    return {"scheduler": s, "interval": "step"}


SCHEDULERS: dict[str, Callable | None] = {
    "none": None,
    "plateau": _plateau,
    "step": _step,
    "cosine": _cosine,
    "onecycle": _onecycle,
}


# train.monitor: what picks the best checkpoint and drives early stopping (higher is better); the
# module logs these validation metrics
MONITORS = ("val/acc", "val/f1_macro", "val/mAP")  # val/mAP: multi-label data only


def _lookup(table: dict, name: str, setting: str):
    key = str(name).lower()
    if key not in table:
        raise UserError(
            f"Unknown {setting.split('.')[-1]} {name!r}.{did_you_mean(key, table)} {setting} takes "
            f"{', '.join(table)}."
        )
    return table[key]


def create_optimizer(params, o: dict, net=None):
    """The optimizer `o["optimizer"]` names over `params`; `net` (the network) tells Muon which
    weights are hidden layers (None: Muon leaves every weight to AdamW)."""
    return _lookup(OPTIMIZERS, o["optimizer"], "train.optimizer")(params, o, net)


def create_scheduler(opt, o: dict, steps: Callable[[], int]) -> dict | None:
    """Lightning's lr_scheduler dict, or None for `none`; `steps()` is the total step count."""
    build = _lookup(SCHEDULERS, o.get("scheduler", "none"), "train.scheduler")
    return build(opt, o, steps) if build is not None else None
