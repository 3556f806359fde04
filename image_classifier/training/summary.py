"""What a finished `train` leaves: the best checkpoint calibrated (temperature, multi-label
thresholds), the curves, the result dict, its MLflow record and the one-screen summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from image_classifier import lineage, runs, tracking
from image_classifier.data.datamodule import labels_of
from image_classifier.data.identity import IMBALANCED, imbalance_ratio, left_out_line
from image_classifier.data.layouts import write_unusable
from image_classifier.errors import shown
from image_classifier.models import checkpoint as ckpt_file
from image_classifier.models import metrics
from image_classifier.models.metrics import confidence_text, interval_text, wilson_interval
from image_classifier.rules import fine_tunes
from image_classifier.training.adapt import MIN_STEPS, steps_per_epoch
from image_classifier.training.budget import budget_for
from image_classifier.training.calibrate import calibrate, fitted_line, validation_logits
from image_classifier.training.checks import validates
from image_classifier.training.plots import plot_curves


def summarise(cfg, trainer, checkpoint, last, history, dm, out: Path, started: float) -> dict:
    info = dm.info
    best = (
        Path(checkpoint.best_model_path)
        if checkpoint.best_model_path
        else Path(last.dirpath) / "last.ckpt"
    )
    curves = plot_curves(history.epochs, out / "plots" / "curves.png")
    score = checkpoint.best_model_score
    tie_loss = getattr(checkpoint, "tie_loss", math.inf)  # BestCheckpoint's val/loss
    return {
        "checkpoint": str(best),
        "last_checkpoint": str(Path(last.dirpath) / "last.ckpt"),
        "next": runs.next_test(cfg, best, info.split_sizes.get("test", 1)),
        "best_score": float(score) if score is not None else None,
        "best_val_loss": tie_loss if math.isfinite(tie_loss) else None,
        "monitor": cfg.train.monitor,
        "at_chance": at_chance(cfg, dm, score, trainer),
        "class_weights": bool(cfg.train.get("class_weights")),
        "objective": float(score) if score is not None else None,
        "metrics": {
            k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_step")
        },
        "epochs": trainer.current_epoch,
        "resumed_after": history.first_epoch,
        "output_dir": str(out),
        "plots": [str(curves)] if curves else [],
        "skipped_files": len(info.skipped),
        "unusable_files": str(write_unusable(info.skipped, out) or ""),
        "data_source": info.source,
        "decoded_cache": info.cache,
        "precision": str(trainer.precision),
        "batching": getattr(dm, "batching", "from a DataLoader"),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": lineage.describe_machine(lineage.machine_info()),
    }


def calibrate_best(path: str, dm) -> dict:
    """Fit the temperature of the best checkpoint on the validation split and store it there
    (the file read once and written once)."""
    module, ckpt = ckpt_file.open_module(path)
    fitted = calibrate(module, dm.loader("val"))
    ckpt_file.store_buffers(path, ckpt, temperature=float(fitted["temperature"]))
    return fitted


def thresholds_for_best(path: str, dm, t) -> list[float]:
    """Multi-label: per-class thresholds tuned on the validation split (train.threshold=tune), or
    the one given for every class; stored in the best checkpoint (read once, written once)."""
    from image_classifier.models.multilabel import tune_thresholds

    module, ckpt = ckpt_file.open_module(path)
    if str(t.get("threshold", "tune")) == "tune":
        logits, targets = validation_logits(module, dm.loader("val"))
        chosen = tune_thresholds(module.probabilities(logits), targets)
    else:
        chosen = [float(t.threshold)] * len(module.classes)
    ckpt_file.store_buffers(path, ckpt, thresholds=chosen)
    return chosen


def log_run(logger, result: dict, data_meta: dict) -> None:
    """The summary into the run folder (train_summary.json); it, the checkpoint and the curves
    into the training run."""
    path = Path(result["output_dir"]) / "train_summary.json"
    result["summary"] = str(path)
    if logger is not None:
        result["mlflow_run_id"] = logger.run_id
    path.write_text(
        json.dumps({**result, "data": data_meta}, indent=2, default=str, ensure_ascii=False)
    )
    if logger is None:
        return
    if c := result.get("calibration"):
        nll_ece = ("nll_before", "nll_after", "ece_before", "ece_after")
        calibration = {"temperature": c["temperature"], **{f"val/{k}": c[k] for k in nll_ece}}
        tracking.log_metrics(logger, calibration)
    # what a sweep's summary ranks trials by: the score, then the lower val/loss among ties
    ranks = {k: result[k] for k in ("best_score", "best_val_loss") if result.get(k) is not None}
    ranks["val_images"] = data_meta["split_sizes"].get("val", 0)  # how finely trials differ
    tracking.log_metrics(logger, ranks)
    tracking.log_artifacts(logger, [result["checkpoint"], *result["plots"], path])


def shard_steps(trainer, train_images: int, batch: int) -> int:
    """Optimizer steps an epoch in each process: with DDP each of trainer.world_size processes
    takes its shard of the train split (2 processes, 120 images in batches of 32: 2 steps)."""
    return steps_per_epoch(train_images, batch * trainer.world_size)


def announce(trainer, module, spec, info, batch: int, steps: int) -> None:
    """What is about to train and from which weights, in one line (in place of Lightning's table
    of layers), printed by the first process of a distributed run only."""
    if not trainer.is_global_zero:
        return
    params = sum(p.numel() for p in module.parameters())
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    sizes = info.split_sizes
    given = spec.get("pretrained")
    start = (
        f" from {spec['resumed']}, resumed"
        if spec.get("resumed")
        else ""  # model=head: its backbone's weights are the feature cache's
        if spec["name"] == "head"
        else f" from the weights of {spec['init_from']}"
        if spec.get("init_from")
        else " from random weights"
        if not given
        else " from pretrained weights"
        if given is True
        else f" from {Path(str(given)).name}"
    )
    print(
        f"Training {spec['name']}{start} ({params / 1e6:.2f} M parameters"
        + (f", {frozen / 1e6:.2f} M of them frozen" if frozen else "")
        + f") on {info.name}: {sizes['train']} train and {sizes.get('val', 0)} validation "
        f"images, {trainer.max_epochs} epoch(s) of {steps} step(s) in batches of {batch}"
    )


def at_chance(cfg, dm, score, trainer) -> dict | None:
    """metrics.at_chance for the best val/acc (single-label data, validated, monitored on
    val/acc; not model=baseline, which is that rule), with the optimizer steps each process took
    over the epochs trained (early stopping may end sooner) and those a network of this kind
    wants."""
    info = dm.info
    if info.multi_label or cfg.train.monitor != "val/acc" or score is None or not validates(cfg):
        return None
    if cfg.model.name == "baseline":
        return None
    counts = np.bincount(labels_of(dm.dataset("val")), minlength=len(info.classes)).tolist()
    if not (found := metrics.at_chance(float(score), counts, info.classes)):
        return None
    kind = "pretrained" if fine_tunes(cfg.model) else "scratch"
    steps = shard_steps(trainer, info.split_sizes["train"], int(cfg.train.batch_size))
    return found | {
        "steps": steps * trainer.current_epoch,
        "steps_per_epoch": steps,
        "steps_wanted": MIN_STEPS[kind],
        "kind": kind,
    }


def chance_line(r: dict) -> str:
    """at_chance's finding as a warning line with its likely cause and the fix."""
    if not (c := r.get("at_chance")):
        return ""
    score = f"best val/acc {r['best_score']:.4f}"
    if c.get("too_few"):  # the split is the cause: the steps or labels may be fine
        return f"  WARNING:    {metrics.chance_text(score, c, 'validation')}"
    why = (
        f"it took {c['steps']} optimizer steps, where a network like this wants about "
        f"{c['steps_wanted']}: " + steps_fix(c, r.get("time_budget"))
        if c["steps"] < c["steps_wanted"]
        else "check the labels (command=audit)"
        + (
            ""
            if c.get("kind") == "pretrained"
            else "; a pretrained model (model=efficientnet_lite0) learns from fewer images"
        )
    )
    return f"  WARNING:    {metrics.chance_text(score, c, 'validation')}; {why}"


def steps_fix(c: dict, budget: dict | None) -> str:
    """How to get at_chance's `c` the steps it wants: train.epochs=auto, or under a time budget
    (`budget`: budget.plan's result) the budget that fits them (20 s gave 15 steps of 300)."""
    if not budget:
        return "train.epochs=auto chooses enough for the data"
    per = max(1, c["steps_per_epoch"])  # 0 only when no step ran (then a budget stops first)
    need = budget_for(budget, math.ceil(c["steps_wanted"] / per))
    return (
        f"train.time_budget={budget['budget_seconds']:g} fitted {budget['epochs']} epoch(s) of "
        f"{per} step(s); about train.time_budget={math.ceil(need)} fits them on this machine "
        "(or train.time_budget=null: train.epochs=auto chooses enough for the data)"
    )


def best_line(r: dict, n_val: int) -> str:
    """The best validation score; an accuracy with its 95 % interval on the validation images
    (on a small folder's split: how far apart two epochs or runs must be to differ)."""
    if r["best_score"] is None:
        return ""
    line = f"  best {r['monitor']} = {r['best_score']:.4f}"
    if r["monitor"] == "val/acc" and n_val:
        line += f" ({interval_text(wilson_interval(r['best_score'], n_val), n_val)})"
    return line


def trained_text(r: dict) -> str:
    """'6 epoch(s)'; resumed: '1 more epoch(s) (6 in all)' (the time is this run's)."""
    more = r["epochs"] - r.get("resumed_after", 0)
    if more == r["epochs"]:
        return f"{more} epoch(s)"
    return f"{more} more epoch(s) ({r['epochs']} in all)"


def print_summary(r: dict, info) -> None:
    m = r["metrics"]
    notes = [f"{len(info.classes)} classes", f"{info.split_sizes['train']} train images"]
    if r["skipped_files"]:
        notes.append(f"{r['skipped_files']} unusable files skipped")
    if r["data_source"] not in ("", "local"):
        notes.append(f"data fetched from {r['data_source']}")
    val = ", ".join(
        f"{k.split('/')[1]} {v:.4f}" for k, v in sorted(m.items()) if k.startswith("val/")
    )
    lines = [
        f"Trained {trained_text(r)} in {r['seconds']:.0f}s on {info.name} ({info.layout}, "
        + ", ".join(notes)
        + ")",
        best_line(r, info.split_sizes.get("val", 0)),
        chance_line(r),
        f"  last epoch: val {val}",
        f"  calibration: {fitted_line(c)}" if (c := r.get("calibration")) else "",
        f"  confidence: on validation, answered at a floor: {confidence_text(c['by_confidence'])}"
        if c
        else "",
        f"  chosen:     {'; '.join(r['chosen'])}" if r.get("chosen") else "",
        imbalance_line(info, r.get("class_weights", False)),
        left_out_line(info.left_out),
        "  thresholds: "
        + ", ".join(f"{shown(c)} {x:.2f}" for c, x in zip(info.classes, th, strict=True))
        + " (per class, tuned on val)"
        if (th := r.get("thresholds"))
        else "",
        f"  budget:     {b['budget_seconds']:g} s: {b['epochs']} epoch(s) planned at "
        f"{b['epoch_seconds']:.1f} s each after {b['probe_seconds']:.1f} s of setup and probing"
        if (b := r.get("time_budget"))
        else "",
        f"  data:       batches {r['batching']}, precision {r['precision']}"
        + (f", decoded cache {r['decoded_cache']}" if r["decoded_cache"] else ""),
        f"  machine:    {r['machine']}",
        f"  checkpoint: {r['checkpoint']}",
        f"  plots:      {', '.join(r['plots']) or '-'}",
        f"  summary:    {r['summary']} (this summary as JSON)" if "summary" in r else "",
        f"  unusable:   {r['skipped_files']} file(s) skipped, each with its reason in "
        f"{r['unusable_files']}"
        if r["skipped_files"]
        else "",
        f"  mlflow run: {r.get('mlflow_run_id', 'disabled')}",
        f"  next: {r['next']}",
    ]
    print("\n".join(x for x in lines if x))


def imbalance_line(info, weighted: bool) -> str:
    """A summary line when the largest train class has IMBALANCED times the images of the
    smallest: accuracy, and best.ckpt chosen on it, then favour the large classes."""
    counts, ratio = info.class_counts, imbalance_ratio(info.class_counts)
    if info.multi_label or ratio is None or ratio < IMBALANCED:
        return ""
    big, small = counts.index(max(counts)), counts.index(min(c for c in counts if c))
    how = (
        "the loss weighted by inverse class frequency (train.class_weights=true)"
        if weighted
        else "val/acc, and best.ckpt chosen on it, favour the large classes; "
        "train.class_weights=true weights the loss by inverse class frequency, for more recall "
        "on the small ones (docs/models-and-recipes.md)"
    )
    return (
        f"  imbalance:  {counts[big]} train images of {info.classes[big]}, {counts[small]} of "
        f"{info.classes[small]} ({ratio:.0f}x); {how}"
    )
