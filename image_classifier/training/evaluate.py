"""`command=test`: a checkpoint on the test split -> metrics, JSON report, plots, MLflow."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf, open_dict

from image_classifier.data.images import Preprocessing
from image_classifier.data.layouts import write_unusable
from image_classifier.errors import UserError
from image_classifier.training import tracking
from image_classifier.training.checkpoints import load_module, newest_best
from image_classifier.training.plots import plot_confusion, plot_curves
from image_classifier.training.train import (
    build_datamodule,
    output_dir,
    progress_bar,
    trainer_kwargs,
)

log = logging.getLogger(__name__)


def _extras(path: Path) -> tuple[list[dict], str | None]:
    """(per-epoch history, training MLflow run id) stored in the checkpoint by `train`."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    history = next((list(s.get("epochs", [])) for k, s in ckpt.get("callbacks", {}).items()
                    if k.startswith("History")), [])  # fmt: skip
    return history, ckpt.get("image_classifier", {}).get("mlflow_run_id")


def run_test(cfg, use_checkpoint_data: bool = True) -> dict:
    """Evaluate; the data config stored in the checkpoint is used unless the caller set its own."""
    started = time.perf_counter()
    path = (
        Path(cfg.test.checkpoint)
        if cfg.test.get("checkpoint")
        else newest_best(cfg.paths.root, cfg.paths.search, "test.checkpoint")
    )
    module = load_module(path)
    hp = module.hparams
    pre = Preprocessing.from_dict(hp.preprocessing)
    data_cfg = cfg.data
    if use_checkpoint_data and hp.get("config") and "data" in hp.config:
        data_cfg = OmegaConf.create(hp.config["data"])
    cfg = cfg.copy()
    with open_dict(cfg):  # the checkpoint's data config replaces (not merges into) the current one
        cfg.data = data_cfg
        cfg.train.batch_size = int(cfg.test.batch_size)
    out = output_dir(cfg)

    if hp.model["name"] == "head":  # evaluate the head on the cached test features
        from image_classifier.data.features import FeatureDataModule, build_cache

        if use_checkpoint_data and "features" in (hp.get("config") or {}):
            with open_dict(cfg):
                cfg.features = OmegaConf.create(hp.config["features"])
        dm = FeatureDataModule(build_cache(cfg)["dir"], int(cfg.test.batch_size))
    else:
        dm = build_datamodule(cfg, preprocessing=pre)
    info = dm.prepare()
    if info.classes != module.classes:
        extra = sorted(set(info.classes) - set(module.classes))
        missing = sorted(set(module.classes) - set(info.classes))
        raise UserError(
            f"The checkpoint's classes do not match the data's: the checkpoint {str(path)!r} knows "
            f"{len(module.classes)} classes, the data ({info.name}) has {len(info.classes)}"
            + (f"; only in the data: {extra[:10]}" if extra else "")
            + (f"; only in the checkpoint: {missing[:10]}" if missing else "")
            + ("; same names, different order" if not extra and not missing else "")
            + ". Test on the data the model was trained on (drop the data overrides), or train a new model."
        )
    trained_hash = (hp.get("data") or {}).get("hash")
    hash_note = ""
    if trained_hash and trained_hash != info.data_hash:
        hash_note = (f"the test data (hash {info.data_hash}) differs from the data this model was "
                     f"trained on (hash {trained_hash})")  # fmt: skip
        log.warning("Data mismatch: %s; metrics may not be comparable.", hash_note)

    history, train_run = _extras(path)
    logger = tracking.create_logger(
        cfg, run_name=f"test-{hp.model['name']}",
        tags={**tracking.lineage_tags(cfg.paths.root, info.data_hash), "checkpoint": str(path)},
    )  # fmt: skip
    kwargs = {**trainer_kwargs(cfg), "devices": 1, "num_nodes": 1, "strategy": "auto"}
    trainer = L.Trainer(
        logger=logger or False, default_root_dir=out, callbacks=progress_bar(cfg), **kwargs
    )
    trainer.test(module, datamodule=dm, verbose=False)

    m = {k.removeprefix("test/"): v.cpu() for k, v in module.test_metrics.compute().items()}
    cm = m["confusion"].numpy()
    support = cm.sum(axis=1)
    report = {
        "checkpoint": str(path),
        "data": {
            "name": info.name,
            "hash": info.data_hash,
            "test_images": int(support.sum()),
            "trained_on_hash": trained_hash,
            "warning": hash_note or None,
        },  # fmt: skip
        "accuracy": float(m["acc"]),
        "f1_macro": float(m["f1_macro"]),
        "loss": float(trainer.callback_metrics.get("test/loss", float("nan"))),
        "per_class": {
            c: {
                "precision": float(m["precision"][i]),
                "recall": float(m["recall"][i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(module.classes)
        },
        "classes": module.classes,
        "confusion_matrix": cm.astype(int).tolist(),
    }
    report_path = out / "test_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    plots = [plot_confusion(cm, module.classes, out / "plots" / "confusion_matrix.png")]
    if curves := plot_curves(history, out / "plots" / "curves.png"):
        plots.append(curves)
    shared = Path(cfg.paths.plots)
    shared.mkdir(parents=True, exist_ok=True)
    for p in [*plots, report_path]:
        shutil.copyfile(p, shared / p.name)

    result = {"report": str(report_path), "plots": [str(p) for p in plots], "shared_plots": str(shared),
              "accuracy": report["accuracy"], "f1_macro": report["f1_macro"], "checkpoint": str(path),
              "seconds": round(time.perf_counter() - started, 1), "skipped_files": len(info.skipped),
              "unusable_files": str(write_unusable(info.skipped, out) or "")}  # fmt: skip
    if logger is not None:
        run = logger.experiment
        run.log_metric(logger.run_id, "test/acc", report["accuracy"])
        run.log_metric(logger.run_id, "test/f1_macro", report["f1_macro"])
        for i, c in enumerate(module.classes):
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c)
            run.log_metric(logger.run_id, f"test/precision/{safe}", float(m["precision"][i]))
            run.log_metric(logger.run_id, f"test/recall/{safe}", float(m["recall"][i]))
        for p in [*plots, report_path]:
            run.log_artifact(logger.run_id, str(p))
        if train_run:
            run.set_tag(logger.run_id, "train_run_id", train_run)
        result["mlflow_run_id"] = logger.run_id

    worst = sorted(report["per_class"].items(), key=lambda kv: kv[1]["recall"])[:3]
    print("\n".join([
        f"Tested {path} on {report['data']['test_images']} {info.name} test images "
        f"in {result['seconds']:.0f}s",
        f"  accuracy {report['accuracy']:.4f}   macro F1 {report['f1_macro']:.4f}",
        "  lowest recall: " + ", ".join(f"{c} {v['recall']:.3f}" for c, v in worst),
        *([f"  WARNING: {hash_note}"] if hash_note else []),
        *([f"  unusable: {len(info.skipped)} file(s) skipped, each with its reason in "
           f"{result['unusable_files']}"] if info.skipped else []),
        f"  report: {report_path}",
        f"  plots:  {', '.join(str(p) for p in plots)} (copies in {shared}/)",
        f"  mlflow run: {result.get('mlflow_run_id', 'disabled')}",
    ]))  # fmt: skip
    return result
