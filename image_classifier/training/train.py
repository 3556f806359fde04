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
)
from omegaconf import OmegaConf, open_dict

from image_classifier import lineage, runs, tracking
from image_classifier.data.datamodule import build_datamodule
from image_classifier.errors import UserError
from image_classifier.models import checkpoint as ckpt_file
from image_classifier.models.factory import check_input_size
from image_classifier.models.module import ClassifierModule
from image_classifier.models.pretrained import freeze_stages, start_from
from image_classifier.rules import is_auto
from image_classifier.training.adapt import (
    annealed_runs_whole,
    choose_before_data,
    choose_epochs,
    choose_frozen_stages,
    small_folder_batch,
    steps_per_epoch,
)
from image_classifier.training.budget import fit_to_budget
from image_classifier.training.callbacks import (
    BestCheckpoint,
    FreezeBackbone,
    History,
    ParityImages,
    ema_averaging,
    progress_bar,
)
from image_classifier.training.checks import check_schedule_fits, check_splits, validates
from image_classifier.training.memory import keep_freed_memory
from image_classifier.training.mirror import choose_flips
from image_classifier.training.resume import (
    asked_epochs,
    check_resumed_data,
    check_stretch,
    fit,
    init_point,
    resume_point,
)
from image_classifier.training.summary import (
    announce,
    calibrate_best,
    log_run,
    print_summary,
    shard_steps,
    summarise,
    thresholds_for_best,
)

for _name in ("lightning.pytorch", "lightning.fabric"):  # no tips and device banners
    logging.getLogger(_name).setLevel(logging.WARNING)

OPTIM_KEYS = ("optimizer", "monitor", "lr", "muon_lr_scale", "weight_decay", "momentum")
OPTIM_KEYS += ("scheduler", "warmup", "step_size", "gamma", "patience", "label_smoothing")
OPTIM_KEYS += ("channels_last", "compile", "supcon_weight", "supcon_temperature")


def trainer_kwargs(cfg, training: bool = True, steps_per_epoch: int | None = None) -> dict:
    """cfg.trainer as Lightning takes it; unset (null) options are left to Lightning's defaults,
    except precision: null means default_precision for training, and 32-true for evaluation
    (`test` scores the weights as they are exported, in float32). With `steps_per_epoch`, the
    logging interval is at most one epoch (of trainer.limit_train_batches, when set): a small
    folder's training loss is logged each epoch."""
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    if options.get("precision") is None:
        accelerator = str(options.get("accelerator", "auto"))
        options["precision"] = default_precision(accelerator) if training else "32-true"
    limit = options.get("limit_train_batches")  # Lightning's: a number of batches, or a fraction
    if steps_per_epoch and isinstance(limit, int):
        steps_per_epoch = min(steps_per_epoch, limit)
    elif steps_per_epoch and isinstance(limit, float):
        steps_per_epoch = max(1, int(steps_per_epoch * limit))
    if steps_per_epoch and options.get("log_every_n_steps"):
        options["log_every_n_steps"] = max(1, min(options["log_every_n_steps"], steps_per_epoch))
    return {k: v for k, v in options.items() if v is not None}


def default_precision(accelerator: str) -> str:
    """bf16-mixed on a CUDA GPU that computes bfloat16; 32-true everywhere else. On a CPU,
    bf16-mixed is opt-in (`trainer.precision=bf16-mixed`): it trained the default job 1.3x faster
    on two CPUs with bfloat16 instructions, but it was compared on validation on only one of them
    (docs/figures.md), it ran matrix products 17x slower on a CPU without those instructions, and
    networks with depthwise convolutions trained 2.1x slower in it even with AMX."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "32-true"


def run_train(cfg, callbacks: list | None = None) -> dict:
    """`callbacks`: extra Lightning callbacks (benchmarks and tests hook in here)."""
    started = time.perf_counter()
    asked = asked_epochs(cfg)
    cfg, resume_from = resume_point(cfg)
    if resume_from is not None:  # the stored config's epochs, or more when asked for
        check_stretch(cfg, asked)
    set_up_process(cfg)
    out = runs.output_dir(cfg)
    auto_batch = is_auto(cfg.train.get("batch_size"))
    cfg, start, chosen = init_point(cfg) if resume_from is None else (cfg, None, [])
    cfg, chosen = choose_before_data(cfg, chosen)
    cfg, model_spec = model_normalisation(cfg)
    dm, model_spec = datamodule_for(cfg, model_spec)
    info = dm.prepare()
    check_splits(cfg, info.split_sizes)
    cfg, chosen = choose_flips(cfg, dm, info, chosen)
    budget, n = None, info.split_sizes["train"]
    cfg, chosen = small_folder_batch(cfg, n, auto_batch, chosen)
    dm.batch_size = int(cfg.train.batch_size)
    if cfg.train.get("time_budget") and resume_from is None:  # resumed: the epochs it planned
        cfg, budget = budgeted(cfg, model_spec, info, dm, started)
    else:
        cfg, chosen = choose_epochs(cfg, n, chosen)
    if resume_from is None:  # resumed: as it was stored
        cfg, stopping = annealed_runs_whole(cfg)
        chosen = [*chosen, *stopping]
    epochs = int(cfg.train.epochs)
    if resume_from is not None:
        epochs = max(asked or 0, epochs)
        check_resumed_data(resume_from, info)
    check_schedule_fits(cfg, steps_per_epoch(n, int(cfg.train.batch_size)), epochs)  # pre-MLflow
    module = build_module(cfg, model_spec, info)
    start_note = start_from(module.net.net, start, info.classes) if start else ""
    logger = create_logger(cfg, model_spec["name"], info, resume_from)
    module.mlflow_run_id = logger.run_id if logger is not None else None
    checkpoint, last, cbs = build_callbacks(cfg, out / "checkpoints", logger, callbacks)
    trainer, steps = build_trainer(cfg, epochs, cbs, logger, out, n)
    spec = model_spec | {"resumed": str(resume_from or "")}  # what the announcement says
    announce(trainer, module, spec, info, int(cfg.train.batch_size), steps)
    if start_note and trainer.is_global_zero:
        print(start_note)
    fit(trainer, module, dm, resume_from, checkpoint, last)
    result = summarise(cfg, trainer, checkpoint, last, cbs[0], dm, out, started)
    result |= {"time_budget": budget, "chosen": chosen}
    if trainer.is_global_zero and checkpoint is not last:
        if info.multi_label:
            result["thresholds"] = thresholds_for_best(result["checkpoint"], dm, cfg.train)
        elif cfg.train.get("calibrate", True):
            result["calibration"] = calibrate_best(result["checkpoint"], dm)
    if trainer.is_global_zero:
        log_run(logger, result, module.hparams.data)
        print_summary(result, info)
    return result


def build_trainer(cfg, epochs: int, callbacks, logger, out, train_images: int):
    """(the Trainer, optimizer steps an epoch in each of its processes: with DDP each takes its
    shard of the train split); the logging interval is kept within one such epoch."""
    batch = int(cfg.train.batch_size)
    kwargs = trainer_kwargs(cfg, steps_per_epoch=steps_per_epoch(train_images, batch))
    kwargs |= {"max_epochs": epochs, "callbacks": callbacks, "logger": logger or False}
    trainer = L.Trainer(default_root_dir=out, **kwargs)
    steps = shard_steps(trainer, train_images, batch)
    trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, steps))
    return trainer, steps


def set_up_process(cfg) -> None:
    """Seeds, torch's threads and the allocator, before anything is built."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    if cfg.train.get("keep_freed_memory", True):
        keep_freed_memory()


def budgeted(cfg, model_spec: dict, info, dm, started: float):
    """(config with the epochs that fit train.time_budget, the plan); see training/budget.py."""
    check_schedule_fits(cfg, steps_per_epoch(info.split_sizes["train"], int(cfg.train.batch_size)))
    plan = fit_to_budget(
        cfg,
        lambda: build_module(cfg, model_spec, info),
        lambda: step_callbacks(cfg),
        dm,
        started,
        trainer_kwargs(cfg),
    )
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.train.epochs = plan["epochs"]  # stored with the run: train.epochs=N repeats it
    print(
        f"train.time_budget={plan['budget_seconds']:g}s: {plan['epochs']} epoch(s) of about "
        f"{plan['epoch_seconds']:.1f} s fit on this machine"
    )
    return cfg, plan


def model_normalisation(cfg):
    """(config, model spec): pretrained models bring their own mean/std, which the data takes."""
    model_spec = OmegaConf.to_container(cfg.model, resolve=True)
    if model_spec.get("mean") is not None:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.data.mean, cfg.data.std = model_spec["mean"], model_spec["std"]
    return cfg, model_spec


def datamodule_for(cfg, model_spec: dict):
    """Images for every model but `head`, which trains on cached backbone features (built here
    when missing) and records the backbone it needs at deployment."""
    if model_spec["name"] != "head":
        return build_datamodule(cfg), model_spec
    from image_classifier.data.datamodule import FeatureDataModule
    from image_classifier.training.features import build_cache

    cache = build_cache(cfg)
    t = cfg.train
    dm = FeatureDataModule(cache["dir"], int(t.batch_size), bool(t.balanced_sampler))
    spec = {
        **model_spec,
        "backbone": cfg.features.backbone,
        "pretrained": cfg.features.pretrained,
        "dim": cache["manifest"]["dim"],
    }
    return dm, spec


def build_module(cfg, model_spec: dict, info) -> ClassifierModule:
    t = cfg.train
    if model_spec["name"] == "baseline":
        model_spec = {**model_spec, "class_counts": info.class_counts}
    optim = {k: t.get(k) for k in OPTIM_KEYS}
    optim["label_smoothing"] = label_smoothing(t, info)
    if t.get("class_weights"):
        counts = np.maximum(np.asarray(info.class_counts, dtype=float), 1)
        optim["class_weights"] = (counts.sum() / (len(counts) * counts)).tolist()
    data_meta = {
        "name": info.name,
        "hash": info.data_hash,
        "layout": info.layout,
        "split_sizes": info.split_sizes,
        "class_counts": info.class_counts,
        "dvc_md5": lineage.dvc_hash(cfg.paths.root),
    }
    check_multi_label(cfg, model_spec, info)
    module = ClassifierModule(
        model=model_spec,
        classes=info.classes,
        preprocessing=info.preprocessing.to_dict(),
        optim=OmegaConf.to_container(OmegaConf.create(optim)),
        augment={} if model_spec["name"] == "head" else OmegaConf.to_container(t.augment),
        data=data_meta,
        config=OmegaConf.to_container(cfg, resolve=True),
        multi_label=info.multi_label,
    )
    if t.channels_last:
        module = module.to(memory_format=torch.channels_last)
    stages = choose_frozen_stages(cfg)[0].train.get("frozen_stages", 0)  # run_train's, or auto's
    freeze_stages(module.net.net, int(stages))
    check_input_size(module.net, info.preprocessing, model_spec["name"])
    module.train_digests = info.digests.get("train")  # test counts these among its images
    return module


def label_smoothing(t, info) -> float:
    """train.label_smoothing, where null means 0.1 for single-label data (fewer epochs to the
    same accuracy on Fashion-MNIST; the temperature fitted after training undoes the
    under-confidence it leaves) and 0 for multi-label data, which it does not apply to."""
    if t.get("label_smoothing") is None:
        return 0.0 if info.multi_label else 0.1
    return float(t.label_smoothing)


def check_multi_label(cfg, model_spec: dict, info) -> None:
    """The options that only make sense for one label per image, refused for multi-label data."""
    t = cfg.train
    if not info.multi_label:
        if t.monitor == "val/mAP":
            raise UserError(
                "train.monitor=val/mAP is the multi-label metric; for single-label data use "
                "val/acc or val/f1_macro."
            )
        return
    single = {
        "train.augment.mixup": float(t.augment.get("mixup") or 0) > 0,
        "train.augment.cutmix": float(t.augment.get("cutmix") or 0) > 0,
        "train.supcon_weight": float(t.get("supcon_weight") or 0) > 0,
        "train.class_weights": bool(t.get("class_weights")),
        "train.label_smoothing": float(t.get("label_smoothing") or 0) > 0,
        "model=head": model_spec["name"] == "head",
    }
    if bad := [k for k, on in single.items() if on]:
        raise UserError(
            f"{', '.join(bad)}: single-label only, and {info.layout} is multi-label. Drop "
            f"{'that override' if len(bad) == 1 else 'those overrides'} (or set "
            "data.multi_label=false if each image has one label)."
        )


def create_logger(cfg, model_name: str, info, resume_from: Path | None):
    """The run's MLflow logger; a resumed run continues its own MLflow run."""
    run_id = ckpt_file.mlflow_run_id(resume_from) if resume_from is not None else None
    return tracking.create_logger(
        cfg,
        run_name=f"train-{model_name}",
        run_id=run_id,
        tags=lineage.lineage_tags(cfg.paths.root, info.data_hash),
    )


def build_callbacks(cfg, ckpt_dir: Path, logger, extra: list | None):
    """(best checkpoint, last checkpoint, all callbacks with History first)."""
    t = cfg.train
    validating = validates(cfg)  # without validation: only "last"
    # "last" is written after every epoch (what train.resume continues from); "best" on
    # improvement. (Lightning's save_last only refreshes last.ckpt when another one is saved.)
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1)
    best = last
    if validating:
        best = BestCheckpoint(dirpath=ckpt_dir, filename="best", monitor=t.monitor, mode="max")
    callbacks = [
        History(),
        ParityImages(),
        *{id(c): c for c in (best, last)}.values(),
        *(extra or []),
    ]
    callbacks += progress_bar(cfg)
    if int(t.early_stopping) > 0 and validating:
        callbacks.append(
            EarlyStopping(monitor=t.monitor, mode="max", patience=int(t.early_stopping))
        )
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    return best, last, callbacks + step_callbacks(cfg)


def step_callbacks(cfg) -> list:
    """New instances of the callbacks that change what a training step does (and costs)."""
    callbacks = []
    if cfg.model.get("freeze_backbone"):
        callbacks.append(FreezeBackbone(cfg.model.get("unfreeze_at_epoch")))
    if cfg.train.get("ema"):
        callbacks.append(ema_averaging(float(cfg.train.ema)))
    return callbacks
