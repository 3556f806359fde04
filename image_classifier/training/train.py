"""`command=train`: data -> LightningModule -> Trainer.fit, tracked in MLflow."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from omegaconf import OmegaConf

from image_classifier.data.datamodule import ImageDataModule
from image_classifier.models.module import ClassifierModule
from image_classifier.training import tracking
from image_classifier.training.callbacks import History
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


def build_datamodule(cfg, preprocessing=None) -> ImageDataModule:
    return ImageDataModule(
        cfg.data, batch_size=int(cfg.train.batch_size), num_workers=int(cfg.train.num_workers),
        balanced_sampler=bool(cfg.train.balanced_sampler), project_root=cfg.paths.root,
        preprocessing=preprocessing,
    )  # fmt: skip


def progress_bar(cfg) -> list:
    return [TQDMProgressBar(refresh_rate=10)] if cfg.trainer.enable_progress_bar else []


def trainer_kwargs(cfg) -> dict:
    """cfg.trainer as Lightning takes it; unset (null) options are left to Lightning's defaults."""
    return {
        k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None
    }


def run_train(cfg, callbacks: list | None = None) -> dict:
    """`callbacks`: extra Lightning callbacks (benchmarks and tests hook in here)."""
    started = time.perf_counter()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    out = output_dir(cfg)

    dm = build_datamodule(cfg)
    info = dm.prepare()
    t = cfg.train
    model_spec = OmegaConf.to_container(cfg.model, resolve=True)
    if model_spec["name"] == "baseline":
        model_spec["class_counts"] = info.class_counts
    optim = {k: t[k] for k in ("optimizer", "lr", "weight_decay", "momentum", "scheduler", "warmup",
                               "step_size", "gamma", "patience", "label_smoothing", "channels_last")}  # fmt: skip
    data_meta = {"name": info.name, "hash": info.data_hash, "layout": info.layout,
                 "split_sizes": info.split_sizes, "class_counts": info.class_counts,
                 "dvc_md5": tracking.dvc_hash(cfg.paths.root)}  # fmt: skip
    module = ClassifierModule(
        model=model_spec, classes=info.classes, preprocessing=info.preprocessing.to_dict(),
        optim=OmegaConf.to_container(OmegaConf.create(optim)), augment=OmegaConf.to_container(t.augment),
        data=data_meta, config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    if t.channels_last:
        module = module.to(memory_format=torch.channels_last)

    logger = tracking.create_logger(cfg, run_name=f"train-{model_spec['name']}",
                                    tags=tracking.lineage_tags(cfg.paths.root, info.data_hash))  # fmt: skip
    module.mlflow_run_id = logger.run_id if logger is not None else None
    ckpt_dir = out / "checkpoints"
    validating = (
        cfg.trainer.get("limit_val_batches") != 0
    )  # without validation: no "best", only "last"
    monitor = t.monitor if validating else None
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best" if validating else "last",
                                 monitor=monitor, mode="max", save_last=validating,
                                 auto_insert_metric_name=False)  # fmt: skip
    history = History()
    callbacks = [history, checkpoint, *(callbacks or []), *progress_bar(cfg)]
    if int(t.early_stopping) > 0 and validating:
        callbacks.append(
            EarlyStopping(monitor=t.monitor, mode="max", patience=int(t.early_stopping))
        )
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))

    trainer = L.Trainer(max_epochs=int(t.epochs), callbacks=callbacks, logger=logger or False,
                        default_root_dir=out, **trainer_kwargs(cfg))  # fmt: skip
    trainer.fit(module, datamodule=dm)

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
        "metrics": final,
        "epochs": trainer.current_epoch,
        "output_dir": str(out),
        "plots": [str(curves)] if curves else [],
        "skipped_files": len(info.skipped),
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
        f"  mlflow run: {r.get('mlflow_run_id', 'disabled')}",
        "  next: uv run python commands.py command=test",
    ]
    print("\n".join(x for x in lines if x))
