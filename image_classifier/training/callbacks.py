"""Callbacks of our own; everything else is Lightning's (checkpointing, early stopping, LR)."""

import math
import signal
import sys
import time

from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    ModelCheckpoint,
    ProgressBar,
    TQDMProgressBar,
)

from image_classifier.errors import Interrupted


def interruptible(trainer, call, said):
    """`call()`, a Lightning fit or test. Lightning answers Ctrl-C by shutting the trainer down
    and calling sys.exit(1): exit code 1 and not a word. That becomes Interrupted (exit 130)
    with `said()`, what was kept and how to go on."""
    from lightning.pytorch.trainer.states import TrainerStatus

    try:
        return call()
    except SystemExit:
        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores it now
        raise Interrupted(said()) from None


class History(Callback):
    """Per-epoch train and val metrics, kept in the checkpoint so `test` can draw the curves.

    A row is written at validation end, before Lightning's ModelCheckpoint (always run last)
    saves, so a checkpoint holds its own epoch; the train side comes from the module's running
    epoch metrics, which Lightning would only log after the checkpoint is written.
    """

    def __init__(self):
        self.epochs: list[dict] = []
        self.started: float | None = None
        self.first_epoch = 0  # a resumed run: the epochs its checkpoint had finished

    def on_train_start(self, trainer, pl_module):
        import time

        # wall seconds of training so far (resumed runs continue the count): time-to-accuracy
        done = self.epochs[-1].get("seconds", 0.0) if self.epochs else 0.0
        self.started = time.perf_counter() - done
        self.first_epoch = trainer.current_epoch

    def _record(self, trainer, pl_module, with_val: bool):
        import time

        row = {"epoch": trainer.current_epoch}
        if self.started is not None:
            row["seconds"] = round(time.perf_counter() - self.started, 2)
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


class BestCheckpoint(ModelCheckpoint):
    """best.ckpt: the epoch with the best `train.monitor` and, among epochs that tie on it, the
    lowest val/loss. Accuracy on a small validation split saturates early (16 images: 15 right
    from epoch 6 on), and Lightning keeps the first of equal scores: runs of 100 and 250 epochs
    kept their epoch 6, under-trained, with the warm-up not yet over."""

    TIE_BREAKER = "val/loss"

    def __init__(self, **kwargs):
        super().__init__(save_top_k=1, **kwargs)
        self.tie_loss = math.inf  # the saved epoch's val/loss

    def check_monitor_top_k(self, trainer, current=None) -> bool:
        if current is None:
            return False
        loss = trainer.callback_metrics.get(self.TIE_BREAKER)
        loss = math.inf if loss is None else float(loss)
        tied = bool(self.best_k_models) and float(current) == float(self.best_model_score)
        better = super().check_monitor_top_k(trainer, current) or (
            trainer.strategy.reduce_boolean_decision(tied and loss < self.tie_loss)
        )
        if better:
            self.tie_loss = loss
        return better

    @property
    def state_key(self) -> str:  # Lightning's own key, so runs checkpointed before resume too
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tie_loss": self.tie_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.tie_loss = state_dict.get("tie_loss", math.inf)


class ParityImages(Callback):
    """A few validation images (uint8, at the model's input size) carried in every checkpoint
    under "parity_images", so `export-onnx` checks its graph against PyTorch on real images
    without reading the training data again. A head on cached features (model=head) gets those
    its feature cache kept."""

    def __init__(self):
        self.images = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        dm = getattr(trainer, "datamodule", None)
        if self.images is None and dm is not None:
            self.images = getattr(dm, "parity_images", None)
            if self.images is None:
                self.images = pick_parity_images(dm)
        if self.images is not None:
            checkpoint["parity_images"] = self.images


PARITY_MOST, PARITY_BYTES = 64, 1_000_000  # up to 64 images, about 1 MB at most


def pick_parity_images(dm):
    """Up to PARITY_MOST images of the validation split (else train), evenly spaced, as one
    uint8 tensor; None when the data holds none or its items are not images (features)."""
    import torch

    ds = next((d for s in ("val", "train") if len(d := dm.dataset(s))), None)
    if ds is None:
        return None
    first = torch.as_tensor(ds[0][0])
    if first.dtype != torch.uint8:  # cached features (model=head), not images
        return None
    n = min(len(ds), PARITY_MOST, max(4, PARITY_BYTES // max(1, first.numel())))
    idx = torch.linspace(0, len(ds) - 1, n).long().tolist()
    return torch.stack([torch.as_tensor(ds[i][0]) for i in idx])


class FreezeBackbone(BaseFinetuning):
    """Transfer learning: train only the classifier; unfreeze the backbone at `unfreeze_at_epoch`
    (None: never), adding it to the optimiser at a tenth of the head's learning rate."""

    def __init__(self, unfreeze_at_epoch: int | None = None):
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch

    @staticmethod
    def _parts(pl_module):
        net = pl_module.net.net
        head = net.get_classifier()
        head_ids = {id(p) for p in head.parameters()}
        backbone = [m for m in net.children() if not any(id(p) in head_ids for p in m.parameters())]
        return backbone, head

    def freeze_before_training(self, pl_module):
        backbone, _ = self._parts(pl_module)
        self.freeze(backbone, train_bn=False)

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if self.unfreeze_at_epoch is not None and current_epoch == int(self.unfreeze_at_epoch):
            backbone, _ = self._parts(pl_module)
            self.make_trainable(backbone)  # Lightning's helper adds only parameters that need grad
            self.unfreeze_and_add_param_group(
                modules=backbone, optimizer=optimizer, lr=None, initial_denom_lr=10.0, train_bn=True
            )
            # schedulers (OneCycle, cosine) keep per-group fields: give the new group its own
            first, new = optimizer.param_groups[0], optimizer.param_groups[-1]
            for key in ("initial_lr", "max_lr", "min_lr"):
                if key in first and key not in new:
                    new[key] = first[key] / 10.0
            for key in ("base_momentum", "max_momentum"):
                if key in first and key not in new:
                    new[key] = first[key]


def ema_averaging(decay: float) -> Callback:
    """Lightning's WeightAveraging with an exponential moving average of the weights (and of
    BatchNorm's running statistics). Validation, checkpoints and everything after training use
    the average; the optimizer keeps stepping the raw weights.

    The decay warms up as in timm's ModelEmaV3, min(decay, (1 + n) / (10 + n)) after n updates,
    so the random initial weights leave the average within the first few hundred steps even in
    short runs."""
    import torch
    from lightning.pytorch.callbacks import WeightAveraging

    @torch.no_grad()
    def update(averaged: list, current: list, n: torch.Tensor) -> None:
        weight = 1 - torch.clamp((1 + n) / (10 + n), max=decay)
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c, weight.to(a.dtype))
            else:  # counters (BatchNorm's num_batches_tracked): the model's own
                a.copy_(c)

    return WeightAveraging(multi_avg_fn=update)


def progress_bar(cfg) -> list:
    """A bar on a terminal, a line per epoch into a file (EpochLines), or none."""
    if not cfg.trainer.enable_progress_bar:
        return []
    if sys.stdout.isatty():
        return [TQDMProgressBar(refresh_rate=10)]
    return [EpochLines(str(cfg.train.monitor))]


class EpochLines(ProgressBar):
    """Training's progress where stdout is not a terminal (a log file, nohup, Slurm, CI): a line
    per epoch with the count, the metrics and an ETA, at most one each EVERY_S seconds besides
    the first and the last, where tqdm's bar would write a redraw per refresh into the file."""

    EVERY_S = 10.0

    def __init__(self, monitor: str = "val/acc"):
        super().__init__()
        self.shown = dict.fromkeys(("train/loss_epoch", "val/loss", monitor))
        self.enabled, self.started, self.printed, self.first = True, 0.0, 0.0, 0
        self.unprinted = ""  # the latest epoch's line, until it is printed

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.first = time.perf_counter(), trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        now, epoch, total = time.perf_counter(), trainer.current_epoch + 1, trainer.max_epochs
        each = (now - self.started) / (epoch - self.first)
        m = {**trainer.callback_metrics, **pl_module.epoch_train_metrics()}  # this epoch's
        values = "  ".join(
            f"{k.removesuffix('_epoch')} {float(m[k]):.4f}" for k in self.shown if k in m
        )
        planned = total is not None and total > 0
        line = f"epoch {epoch}/{total if planned else '?'}  {values}  ({each:.1f} s/epoch"
        self.unprinted = line + ")"  # printed at the end if this epoch turns out the last
        if epoch == self.first + 1 or now - self.printed >= self.EVERY_S:
            left = f", about {_duration(each * (total - epoch))} left" if planned else ""
            print(f"{line}{left})", flush=True)
            self.printed, self.unprinted = now, ""

    def on_train_end(self, trainer, pl_module) -> None:  # the last epoch, planned or stopped
        if self.enabled and self.unprinted:
            print(self.unprinted, flush=True)


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"
