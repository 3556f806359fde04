"""`command=train`: data -> LightningModule -> Trainer.fit, tracked in MLflow."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from omegaconf import OmegaConf, open_dict

from image_classifier.data.datamodule import ImageDataModule
from image_classifier.data.layouts import write_unusable
from image_classifier.errors import UserError
from image_classifier.models.module import ClassifierModule
from image_classifier.training import tracking
from image_classifier.training.callbacks import FreezeBackbone, History
from image_classifier.training.plots import plot_curves

log = logging.getLogger(__name__)
for _name in (
    "lightning.pytorch",
    "lightning.fabric",
):  # keep tips and device banners out of the output
    logging.getLogger(_name).setLevel(logging.WARNING)


def output_dir(cfg) -> Path:
    out = Path(
        cfg.paths.output_dir
        or Path(cfg.paths.root) / "outputs" / time.strftime("%Y-%m-%d/%H-%M-%S")
    )
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_datamodule(cfg, preprocessing=None, augment_preset: str | None = None) -> ImageDataModule:
    """For training pass no preprocessing (derived from the data) and the configured preset."""
    if augment_preset is None and preprocessing is None:
        augment_preset = cfg.train.augment.get("preset", "none")
    return ImageDataModule(
        cfg.data, batch_size=int(cfg.train.batch_size), num_workers=int(cfg.train.num_workers),
        balanced_sampler=bool(cfg.train.balanced_sampler), project_root=cfg.paths.root,
        preprocessing=preprocessing, augment_preset=augment_preset,
    )  # fmt: skip


def progress_bar(cfg) -> list:
    return [TQDMProgressBar(refresh_rate=10)] if cfg.trainer.enable_progress_bar else []


def trainer_kwargs(cfg) -> dict:
    """cfg.trainer as Lightning takes it; unset (null) options are left to Lightning's defaults."""
    return {
        k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None
    }


OPTIM_KEYS = ("optimizer", "lr", "weight_decay", "momentum", "scheduler", "warmup", "step_size", "gamma",
              "patience", "label_smoothing", "channels_last", "compile", "supcon_weight", "supcon_temperature")  # fmt: skip


def resume_point(cfg):
    """(checkpoint, its stored config) for train.resume=last|PATH, or (None, None)."""
    from image_classifier.training.checkpoints import newest

    r = cfg.train.get("resume")
    if not r:
        return None, None
    ckpt = (
        newest(cfg.paths.root, cfg.paths.search, "last.ckpt", "train.resume")
        if r == "last"
        else Path(r)
    )
    if not ckpt.is_file():
        raise UserError(f"train.resume={r!r}: no such checkpoint.")
    stored = (
        torch.load(ckpt, map_location="cpu", weights_only=True)
        .get("hyper_parameters", {})
        .get("config")
    )
    if not stored:
        raise UserError(f"train.resume={r!r}: {ckpt} holds no training config to resume from.")
    return ckpt, stored


def run_train(cfg, callbacks: list | None = None) -> dict:
    """`callbacks`: extra Lightning callbacks (benchmarks and tests hook in here)."""
    started = time.perf_counter()
    resume_from, stored = resume_point(cfg)
    if resume_from is not None:  # same data, model, optimiser and folder as the interrupted run
        epochs = int(cfg.train.epochs)
        cfg = OmegaConf.create(stored)
        with open_dict(cfg):
            cfg.train.epochs = max(epochs, int(cfg.train.epochs))
            cfg.paths.output_dir = str(resume_from.parent.parent)
        log.warning("Resuming %s from %s", cfg.paths.output_dir, resume_from)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    out = output_dir(cfg)
    t = cfg.train
    model_spec = OmegaConf.to_container(cfg.model, resolve=True)
    if model_spec.get("mean") is not None:  # pretrained models bring their own normalisation
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.data.mean, cfg.data.std = model_spec["mean"], model_spec["std"]

    if model_spec["name"] == "head":  # train on cached backbone features (built here if needed)
        from image_classifier.data.features import FeatureDataModule, build_cache

        cache = build_cache(cfg)
        dm = FeatureDataModule(cache["dir"], int(t.batch_size), bool(t.balanced_sampler))
        model_spec.update(backbone=cfg.features.backbone, pretrained=cfg.features.pretrained,
                          dim=cache["manifest"]["dim"])  # fmt: skip
    else:
        dm = build_datamodule(cfg)
    info = dm.prepare()
    if model_spec["name"] == "baseline":
        model_spec["class_counts"] = info.class_counts
    optim = {k: t.get(k) for k in OPTIM_KEYS}
    if t.get("class_weights"):
        counts = np.maximum(np.asarray(info.class_counts, dtype=float), 1)
        optim["class_weights"] = (counts.sum() / (len(counts) * counts)).tolist()
    data_meta = {"name": info.name, "hash": info.data_hash, "layout": info.layout,
                 "split_sizes": info.split_sizes, "class_counts": info.class_counts,
                 "dvc_md5": tracking.dvc_hash(cfg.paths.root)}  # fmt: skip
    module = ClassifierModule(
        model=model_spec, classes=info.classes, preprocessing=info.preprocessing.to_dict(),
        optim=OmegaConf.to_container(OmegaConf.create(optim)),
        augment={} if model_spec["name"] == "head" else OmegaConf.to_container(t.augment),
        data=data_meta, config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    if t.channels_last:
        module = module.to(memory_format=torch.channels_last)

    run_id = None
    if resume_from is not None:
        run_id = (
            torch.load(resume_from, map_location="cpu", weights_only=True)
            .get("image_classifier", {})
            .get("mlflow_run_id")
        )
    logger = tracking.create_logger(cfg, run_name=f"train-{model_spec['name']}", run_id=run_id,
                                    tags=tracking.lineage_tags(cfg.paths.root, info.data_hash))  # fmt: skip
    module.mlflow_run_id = logger.run_id if logger is not None else None
    ckpt_dir = out / "checkpoints"
    validating = (
        cfg.trainer.get("limit_val_batches") != 0
    )  # without validation: no "best", only "last"
    monitor = t.monitor if validating else None
    # "last" is written after every epoch (what train.resume continues from); "best" on improvement.
    # (Lightning's save_last only refreshes last.ckpt when another checkpoint is saved.)
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max",
                                 auto_insert_metric_name=False) if validating else last  # fmt: skip
    history = History()
    callbacks = [
        history,
        *{id(c): c for c in (checkpoint, last)}.values(),
        *(callbacks or []),
        *progress_bar(cfg),
    ]
    if int(t.early_stopping) > 0 and validating:
        callbacks.append(
            EarlyStopping(monitor=t.monitor, mode="max", patience=int(t.early_stopping))
        )
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cfg.model.get("freeze_backbone"):
        callbacks.append(FreezeBackbone(cfg.model.get("unfreeze_at_epoch")))

    trainer = L.Trainer(max_epochs=int(t.epochs), callbacks=callbacks, logger=logger or False,
                        default_root_dir=out, **trainer_kwargs(cfg))  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)

    best = (
        Path(checkpoint.best_model_path) if checkpoint.best_model_path else ckpt_dir / "last.ckpt"
    )
    curves = plot_curves(history.epochs, out / "plots" / "curves.png")
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")}
    result = {
        "checkpoint": str(best),
        "last_checkpoint": str(ckpt_dir / "last.ckpt"),
        "best_score": float(checkpoint.best_model_score)
        if checkpoint.best_model_score is not None
        else None,
        "monitor": t.monitor,
        "objective": float(checkpoint.best_model_score)
        if checkpoint.best_model_score is not None
        else None,
        "metrics": final,
        "epochs": trainer.current_epoch,
        "output_dir": str(out),
        "plots": [str(curves)] if curves else [],
        "skipped_files": len(info.skipped),
        "unusable_files": str(write_unusable(info.skipped, out) or ""),
        "data_source": info.source,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if logger is not None and trainer.is_global_zero:
        run = logger.experiment
        for path in [best, *(p for p in [curves] if p)]:
            run.log_artifact(logger.run_id, str(path))
        run.log_dict(logger.run_id, {**result, "data": data_meta}, "train_summary.json")
        result["mlflow_run_id"] = logger.run_id
    if trainer.is_global_zero:
        _print_summary(result, info)
    return result


def _print_summary(r: dict, info) -> None:
    m = r["metrics"]
    lines = [
        f"Trained {r['epochs']} epoch(s) in {r['seconds']:.0f}s on {info.name} ({info.layout}, "
        f"{len(info.classes)} classes, {info.split_sizes['train']} train images"
        + (f", {r['skipped_files']} unusable files skipped" if r["skipped_files"] else "")
        + (
            f", data fetched from {r['data_source']}"
            if r["data_source"] not in ("", "local")
            else ""
        )
        + ")",
        f"  best {r['monitor']} = {r['best_score']:.4f}" if r["best_score"] is not None else "",
        "  val: "
        + ", ".join(
            f"{k.split('/')[1]} {v:.4f}" for k, v in sorted(m.items()) if k.startswith("val/")
        ),
        f"  checkpoint: {r['checkpoint']}",
        f"  plots:      {', '.join(r['plots']) or '-'}",
        f"  unusable:   {r['skipped_files']} file(s) skipped, each with its reason in "
        f"{r['unusable_files']}"
        if r["skipped_files"]
        else "",
        f"  mlflow run: {r.get('mlflow_run_id', 'disabled')}",
        "  next: uv run python commands.py command=test",
    ]
    print("\n".join(x for x in lines if x))
