"""The LightningModule. Its hyperparameters are everything needed to rebuild it from the
checkpoint alone: model spec, class names, preprocessing, optimisation and the resolved config."""

from __future__ import annotations

import re
import warnings

import lightning as L
import torch

from image_classifier.data.augment import augment_batch
from image_classifier.models import multilabel
from image_classifier.models.factory import build_network, probabilities
from image_classifier.models.losses import forward_loss, task_loss
from image_classifier.models.metrics import metric_set
from image_classifier.models.optim import create_optimizer, create_scheduler
from image_classifier.models.tta import tta_views
from image_classifier.rules import fine_tunes


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        model: dict,
        classes: list[str],
        preprocessing: dict,
        optim: dict,
        augment: dict | None = None,
        data: dict | None = None,
        config: dict | None = None,
        multi_label: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.multi_label = bool(multi_label)
        self.net = build_network(model, classes, preprocessing)
        self.classes = list(classes)
        n = len(classes)
        for attribute, metric in metric_set(n, self.multi_label).items():
            setattr(self, attribute, metric)  # registered as submodules: they move with the module
        # a head is trained on cached features and deployed on images
        self.feature_input = model["name"] == "head"
        if self.feature_input:
            self.net.net.backbone.requires_grad_(False)
        self.channels_last = bool(optim.get("channels_last", False)) and not self.feature_input
        weights = optim.get("class_weights")
        self.register_buffer(
            "class_weights",
            torch.tensor(weights, dtype=torch.float32) if weights else None,
            persistent=False,
        )
        self._mix = None if self.multi_label else _mixer(augment or {}, n)
        # logits / temperature before the softmax: 1 until `train` fits it on the validation
        # split (train.calibrate); saved with the weights, so every backend uses it
        self.register_buffer("temperature", torch.ones(()))
        if self.multi_label:  # per-class decision thresholds, tuned on validation by `train`
            self.register_buffer("thresholds", torch.full((n,), multilabel.DEFAULT_THRESHOLD))
        self._compiled = None  # torch.compile'd forward for training, not a submodule
        # test-time augmentation (a mode of models/tta.py or None): evaluation averages the logits
        # of the mode's views; `test.tta` sets it, export.tta puts the same into the ONNX graph
        self.tta = None

    def forward(self, x):
        return self.net(x)

    def logits(self, x, tta: str | None = None):
        """The network's logits; with a `tta` mode (models/tta.py), the mean of those of the
        mode's views of x (its mirror, shifted copies)."""
        if not tta:
            return self.net(x)
        views = tta_views(x, tta)
        return sum(self.net(v) for v in views) / len(views)

    def _step(self, batch):
        x, y = batch
        if self.feature_input:  # batches of cached backbone features: only the head runs
            return self.net.net.head(x.float()), y
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.logits(x, self.tta), y

    def on_fit_start(self):
        if self.hparams.optim.get("compile") and self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.net))

    def _loss(self, logits, target, training: bool = True):
        o = self.hparams.optim if training else {}
        weight = self.class_weights if training else None
        return task_loss(logits, target, self.multi_label, weight, o.get("label_smoothing"))

    def _track(self, metrics, logits, y) -> None:
        """Update thresholded metrics: multi-label ones get the 0/1 decisions."""
        if self.multi_label:
            probs = self.probabilities(logits)
            metrics.update(multilabel.decide(probs, self.thresholds), y.int())
        else:
            metrics.update(logits, y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.feature_input:
            logits, _ = self._step(batch)
            return self._train_loss(self._loss(logits, y), logits, y)
        if self.hparams.augment:
            x = augment_batch(x, **self.hparams.augment)
        target = y
        if self._mix is not None:
            x, target = self._mix(x.float(), y)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self.net if self._compiled is None else self._compiled  # `or` would call len()
        loss, logits = forward_loss(net, x, target, self._loss, self.hparams.optim)
        loss = self._train_loss(loss, logits, y)
        if not loss.requires_grad:  # the baseline has nothing to learn
            return None
        return loss

    def _train_loss(self, loss, logits, y):
        self._track(self.train_metrics, logits.detach(), y)
        self.train_loss.update(loss.detach(), len(y))
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        return loss

    def epoch_train_metrics(self) -> dict:
        """Train metrics over the epoch so far (History reads them at validation end)."""
        if self.train_loss.update_count == 0:
            return {}
        return {"train/loss_epoch": self.train_loss.compute(), **self.train_metrics.compute()}

    # Epoch values are reduced across processes (DDP): torchmetrics' compute() already agrees on
    # every rank, and the loss means become the whole split's rather than rank 0's shard's.
    def on_train_epoch_end(self):
        self.log_dict(self.epoch_train_metrics(), sync_dist=True)
        self.train_metrics.reset()
        self.train_loss.reset()

    def validation_step(self, batch, batch_idx):
        logits, y = self._step(batch)
        loss = self._loss(logits, y, training=False)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self._track(self.val_metrics, logits, y)
        if self.multi_label:
            self.val_map.update(self.probabilities(logits), y.int())

    def on_validation_epoch_end(self):
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        if self.multi_label:
            mean_ap = multilabel.compute_quietly(self.val_map)
            self.log("val/mAP", mean_ap, prog_bar=True, sync_dist=True)
            self.val_map.reset()

    def on_test_epoch_start(self):
        self.test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def test_step(self, batch, batch_idx):
        logits, y = self._step(batch)
        loss = self._loss(logits, y, training=False)
        self.log("test/loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
        if self.multi_label:
            probs = self.probabilities(logits)
            self._track(self.test_metrics, logits, y)
            self.test_ranking.update(probs, y.int())
            self.test_outputs.append((probs.cpu(), y.cpu()))
            return
        calibrated = logits.float() / self.temperature
        self.test_metrics.update(calibrated, y)
        self.test_ece_raw.update(logits.float(), y)
        # per-image probabilities, in the loader's order, for the predictions file and gallery
        self.test_outputs.append((torch.softmax(calibrated, 1).cpu(), y.cpu()))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What every backend returns (`factory.probabilities`)."""
        return probabilities(logits, self.temperature, self.multi_label)

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.probabilities(self(x))

    def configure_optimizers(self):
        o = self.hparams.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:  # the baseline learns nothing, on purpose: Lightning's notes of it go
            for note in ("`LightningModule.configure_optimizers` returned", "`training_step` re"):
                warnings.filterwarnings("ignore", re.escape(note))
            return None
        # Muon suits weights trained from scratch; pretrained ones are fine-tuned with AdamW
        scratch = None if fine_tunes(self.hparams.model) else self.net.net
        opt = create_optimizer(params, o, net=scratch)
        sched = create_scheduler(opt, o, lambda: int(self.trainer.estimated_stepping_batches))
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    def on_load_checkpoint(self, checkpoint):
        # checkpoints written before calibration existed have no temperature: 1 is what they meant
        checkpoint["state_dict"].setdefault("temperature", torch.ones(()))

    def on_save_checkpoint(self, checkpoint):
        # a plain-dict summary, readable with torch.load alone (no Lightning needed)
        checkpoint["image_classifier"] = {
            "classes": self.classes,
            "preprocessing": self.hparams.preprocessing,
            "model": self.hparams.model,
            "data": self.hparams.data,
            "mlflow_run_id": getattr(self, "mlflow_run_id", None),
            "multi_label": self.multi_label,
            "train_digests": getattr(self, "train_digests", None),  # not an hparam: not logged
        }


def _mixer(augment: dict, num_classes: int):
    """torchvision's batch MixUp/CutMix (soft targets), or None when both are off."""
    mixup, cutmix = float(augment.get("mixup") or 0.0), float(augment.get("cutmix") or 0.0)
    if mixup <= 0 and cutmix <= 0:
        return None
    from torchvision.transforms import v2

    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
