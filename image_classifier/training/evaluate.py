"""`command=test`: a checkpoint on the test split -> metrics, JSON report, plots, MLflow."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from image_classifier import lineage, rules, runs, tracking
from image_classifier.data.datamodule import ImageDataModule, build_datamodule
from image_classifier.data.identity import (
    check_classes,
    check_test_split,
    data_mismatch,
    left_out_line,
)
from image_classifier.data.images import Preprocessing
from image_classifier.data.layouts import write_unusable
from image_classifier.errors import UserError, listed, shown
from image_classifier.models import checkpoint as ckpt_file
from image_classifier.models.metrics import (
    at_chance,
    by_confidence,
    chance_text,
    confidence_text,
    interval_text,
    lowest_recall_text,
    mistaken_for,
    wilson_interval,
)
from image_classifier.models.multilabel import compute_quietly
from image_classifier.models.tta import chosen_tta, describe, mirror_warning
from image_classifier.training.callbacks import interruptible, progress_bar
from image_classifier.training.plots import plot_confusion, plot_curves
from image_classifier.training.train import trainer_kwargs

log = logging.getLogger(__name__)


def run_test(cfg, use_checkpoint_data: bool = True, use_checkpoint_tta: bool = False) -> dict:
    """Evaluate; the data config stored in the checkpoint is used unless the caller set its own,
    and with `use_checkpoint_tta` (the command line when test.tta is not on it) the test-time
    augmentation the training config named (a recipe's, e.g. experiment=fmnist_fast)."""
    started = time.perf_counter()
    path = runs.checkpoint(cfg, cfg.test.get("checkpoint"), "test.checkpoint")
    module = ckpt_file.load_module(path)
    module.tta = chosen_tta(module, "test", cfg.test.get("tta"), use_checkpoint_tta)
    cfg = test_config(cfg, module.hparams, use_checkpoint_data)
    out = runs.output_dir(cfg)
    dm, info = test_data(cfg, module, path)
    check_test_split(info, cfg.data.get("split"))
    digests = ckpt_file.train_digests(path)
    hash_note = data_mismatch(module.hparams, info, digests, asked=not use_checkpoint_data)
    logger = tracking.create_logger(
        cfg,
        run_name=f"test-{module.hparams.model['name']}",
        tags={**lineage.lineage_tags(cfg.paths.root, info.data_hash), "checkpoint": str(path)},
    )
    kwargs = {**trainer_kwargs(cfg, training=False), "devices": 1, "num_nodes": 1}
    kwargs["strategy"] = "auto"  # one process tests, whatever trained
    trainer = L.Trainer(
        logger=logger or False, default_root_dir=out, callbacks=progress_bar(cfg), **kwargs
    )
    interruptible(
        trainer,
        lambda: trainer.test(module, datamodule=dm, verbose=False),
        lambda: "test interrupted before its report was written.",
    )
    loss = trainer.callback_metrics.get("test/loss")
    run = {"logger": logger, "train_run": ckpt_file.mlflow_run_id(path), "started": started}
    run |= {"hash_note": hash_note, "loss": None if loss is None else float(loss)}
    return finish(cfg, path, module, dm, info, out, run)


def finish(cfg, path: Path, module, dm, info, out: Path, run: dict) -> dict:
    """The report, its files, the MLflow run and the summary, once `module` (a ClassifierModule
    after trainer.test, or test_export's ExportedModel) holds the test metrics and outputs.
    `run`: logger, train_run (its MLflow id), started (perf_counter), hash_note, loss (None for
    an export)."""
    logger, train_run, started = run["logger"], run["train_run"], run["started"]
    hash_note, loss = run["hash_note"], run["loss"]
    report = report_for(path, module, info, loss, hash_note)
    report["tta"] = module.tta
    if warning := mirror_warning(module.hparams, module.tta, "test.tta"):
        report["tta_warning"] = warning
    report_path, plots, shared = write_outputs(cfg, report, path, out)
    per_image = write_per_image(out, dm, module, report)
    result = {
        "report": str(report_path),
        "plots": [str(p) for p in plots],
        "shared_plots": str(shared),
        "accuracy": report["accuracy"],
        "f1_macro": report["f1_macro"],
        "checkpoint": str(path),
        "seconds": round(time.perf_counter() - started, 1),
        "skipped_files": len(info.skipped),
        "unusable_files": str(write_unusable(info.skipped, out) or ""),
        "ece": report["ece"],
        "predictions": str(per_image[0]),
        **({"mAP": report["mAP"], "f1_micro": report["f1_micro"]} if "mAP" in report else {}),
    }
    plots += per_image[1:]
    if logger is not None:
        files = [*plots, report_path, per_image[0]]
        log_run(logger, report, files, train_run)
        result["mlflow_run_id"] = logger.run_id
    _print_summary(report, result, info, hash_note, plots, shared)
    return result


def run_calibrate(cfg) -> dict:
    """`command=calibrate`: fit a checkpoint's temperature (multi-label: tune its thresholds) on
    the validation split of the data it was trained on; stored in the checkpoint."""
    from image_classifier.training.calibrate import fitted_line, stored_line
    from image_classifier.training.summary import calibrate_best, thresholds_for_best

    path = runs.checkpoint(cfg, cfg.calibrate.get("checkpoint"), "calibrate.checkpoint")
    module = ckpt_file.load_module(path)
    cfg = test_config(cfg, module.hparams, use_checkpoint_data=True)
    dm = datamodule_for(cfg, module.hparams)
    check_classes(path, module.classes, dm.prepare())
    before = module.thresholds.tolist() if module.multi_label else float(module.temperature)
    if module.multi_label:
        result = {"thresholds": thresholds_for_best(str(path), dm, cfg.train)}
        tuned = zip(module.classes, result["thresholds"], strict=True)
        each = ", ".join(f"{shown(c)} {t:.2f}" for c, t in tuned)
        done = f"thresholds tuned on {len(dm.dataset('val'))} validation images ({each})"
    else:
        result = calibrate_best(str(path), dm)
        done = fitted_line(result)
    after = result.get("thresholds", result.get("temperature"))
    print(f"Calibrated {path}: {done}\n  {stored_line(before, after)}")
    return {"checkpoint": str(path), **result}


def test_config(cfg, hp, use_checkpoint_data: bool):
    """The checkpoint's data (and features) config replaces, not merges into, the current one."""
    data_cfg = cfg.data
    stored = hp.get("config") or {}
    if use_checkpoint_data and "data" in stored:
        data_cfg = OmegaConf.create(stored["data"])
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data = data_cfg
        cfg.train.batch_size = int(cfg.test.batch_size)
        if hp.model["name"] == "head" and use_checkpoint_data and "features" in stored:
            cfg.features = OmegaConf.create(stored["features"])
    return cfg


def datamodule_for(cfg, hp):
    """The test images at the model's preprocessing; a head evaluates on the cached features."""
    if hp.model["name"] != "head":
        return build_datamodule(cfg, preprocessing=Preprocessing.from_dict(hp.preprocessing))
    from image_classifier.data.datamodule import FeatureDataModule
    from image_classifier.training.features import build_cache

    return FeatureDataModule(build_cache(cfg)["dir"], int(cfg.test.batch_size))


def test_data(cfg, module, path: Path):
    """(datamodule, DataInfo) of the test data in the model's class indices: a folder is read
    with the model's classes as data.classes, or with the data.classes given (some of them),
    its labels renumbered (use_classes); a class the model does not know, check_classes refuses."""
    given = cfg.data.get("classes")
    if cfg.data.kind == "folder" and not given:
        as_model = cfg.copy()
        with open_dict(as_model):
            as_model.data.classes = list(module.classes)
        try:
            dm = datamodule_for(as_model, module.hparams)
            if not (info := dm.prepare()).left_out:
                return dm, info
        except UserError:
            pass  # read as it is below: a class the model does not know, or the same error again
    dm = datamodule_for(cfg, module.hparams)
    info = dm.prepare()
    if given and set(given) <= set(module.classes) and isinstance(dm, ImageDataModule):
        info = dm.use_classes(list(module.classes))  # not a feature cache's fixed labels
    check_classes(path, module.classes, info)
    return dm, info


def report_for(path: Path, module, info, loss: float | None, hash_note: str) -> dict:
    """test_report.json's content: single-label or multi-label metrics."""
    collections = [module.test_metrics, *([module.test_ranking] if module.multi_label else [])]
    m = {
        k.removeprefix("test/"): v.cpu() for c in collections for k, v in compute_quietly(c).items()
    }
    if not module.multi_label:
        report = build_report(path, module, info, m, loss, hash_note)
        probs, targets = (torch.cat(t).numpy() for t in zip(*module.test_outputs, strict=True))
        return {**report, "by_confidence": by_confidence(probs, targets)}
    from image_classifier.training import multilabel_report

    return multilabel_report.build_report(path, module, info, m, loss, hash_note)


def build_report(path: Path, module, info, m: dict, loss: float | None, hash_note: str) -> dict:
    cm, raw = m["confusion"].numpy(), module.test_ece_raw
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)

    def defined(value, n: int) -> float | None:  # None: no image (or prediction) to measure
        return float(value) if n else None

    return {
        "checkpoint": str(path),
        "data": {
            "name": info.name,
            "hash": info.data_hash,
            "test_images": int(support.sum()),
            "trained_on_hash": (module.hparams.get("data") or {}).get("hash"),
            "warning": hash_note or None,
        },
        "accuracy": float(m["acc"]),
        "accuracy_interval": list(wilson_interval(float(m["acc"]), int(support.sum()))),
        "accuracy_top5": float(m["acc_top5"]) if "acc_top5" in m else None,
        "f1_macro": float(m["f1_macro"]),
        "ece": float(m["ece"]),
        "ece_uncalibrated": None if raw is None else float(raw.compute()),  # None: an export
        "temperature": float(module.temperature),
        "loss": loss,
        "per_class": {
            c: {
                "precision": defined(m["precision"][i], predicted[i]),
                "recall": defined(m["recall"][i], support[i]),
                "support": int(support[i]),
                "mistaken_for": mistaken_for(cm, i, module.classes),
            }
            for i, c in enumerate(module.classes)
        },
        "classes": module.classes,
        "confusion_matrix": cm.astype(int).tolist(),
        "at_chance": None  # model=baseline is that rule
        if (module.hparams.get("model") or {}).get("name") == "baseline"
        else at_chance(float(m["acc"]), support.tolist(), module.classes),
    }


def write_outputs(cfg, report: dict, path: Path, out: Path):
    """test_report.json and the plots in the run folder, with copies in paths.plots."""
    report_path = out / "test_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    if report.get("multi_label"):
        from image_classifier.training.multilabel_report import plot_per_class

        plots = [plot_per_class(report, out / "plots" / "per_class.png")]
    else:
        cm = np.asarray(report["confusion_matrix"])
        plots = [plot_confusion(cm, report["classes"], out / "plots" / "confusion_matrix.png")]
    history = ckpt_file.history(path) if path.suffix == ".ckpt" else []  # an export has none
    if curves := plot_curves(history, out / "plots" / "curves.png"):
        plots.append(curves)
    shared = Path(cfg.paths.plots)
    shared.mkdir(parents=True, exist_ok=True)
    for p in [*plots, report_path]:
        shutil.copyfile(p, shared / p.name)
    return report_path, plots, shared


def write_per_image(out: Path, dm, module, report: dict) -> list[Path]:
    """[predictions.csv, reliability.png, mistakes.png and mistakes_explained.png (image models
    only)]; multi-label: [predictions.csv, mistakes.png (image models)]."""
    from image_classifier.training import predictions

    probs = torch.cat([p for p, _ in module.test_outputs]).numpy()
    targets = torch.cat([y for _, y in module.test_outputs]).numpy()
    dataset, classes, ece = dm.dataset("test"), module.classes, report["ece"]
    names = predictions.image_names(dataset, len(targets))
    images = module.hparams.model["name"] != "head"  # a head's test set is features
    if module.multi_label:
        from image_classifier.training.multilabel_report import per_image

        return per_image(out, dataset, names, probs, targets, report["thresholds"], classes, images)
    made = [
        predictions.write_predictions(out / "predictions.csv", names, probs, targets, classes),
        predictions.plot_reliability(probs, targets, ece, out / "plots" / "reliability.png"),
    ]
    if images:
        made += predictions.mistake_galleries(module, dataset, probs, targets, out / "plots")
    return made


def log_run(logger, report: dict, files: list, train_run: str | None) -> None:
    keys = ("acc", "acc_top5", "f1_macro", "f1_micro", "mAP", "ece", "ece_uncalibrated")
    named = {**report, "acc": report["accuracy"], "acc_top5": report.get("accuracy_top5")}
    metrics = {f"test/{k}": named[k] for k in keys if named.get(k) is not None}
    for c, v in report["per_class"].items():
        for k in ("precision", "recall", "ap"):
            if v.get(k) is not None:
                metrics[f"test/{k}/{rules.safe_name(c)}"] = v[k]
    tracking.log_metrics(logger, metrics)
    tracking.log_artifacts(logger, files)
    if train_run:
        tracking.set_tags(logger, {"train_run_id": train_run})


def _metric_lines(report) -> list[str]:
    if report.get("multi_label"):
        from image_classifier.training.multilabel_report import summary_lines

        return summary_lines(report)
    per = report["per_class"]
    absent = [c for c in per if not per[c]["support"]]
    lines = [
        f"  accuracy {report['accuracy']:.4f} ("
        + interval_text(report["accuracy_interval"], report["data"]["test_images"])
        + (f"; top-5 {top5:.4f}" if (top5 := report.get("accuracy_top5")) is not None else "")
        + f")   macro F1 {report['f1_macro']:.4f}   "
        f"ECE {report['ece']:.4f} (temperature {report['temperature']:.3f}"
        + (f"; without it {raw:.4f})" if (raw := report["ece_uncalibrated"]) is not None else ")"),
        "  " + lowest_recall_text(per),
    ]
    if absent:
        lines.append(f"  no test images of {listed(absent)}: their recall is not measured")
    if c := report.get("at_chance"):
        lines.append("  WARNING: " + chance_text(f"accuracy {report['accuracy']:.4f}", c, "test"))
    if rows := report.get("by_confidence"):
        lines.append(f"  answered at a confidence floor: {confidence_text(rows)}")
    return lines


def _print_summary(report, result, info, hash_note, plots, shared) -> None:
    lines = [
        f"Tested {result['checkpoint']} on {report['data']['test_images']} {info.name} test "
        f"images in {result['seconds']:.0f}s"
        + (f" with {describe(report['tta'])}" if report.get("tta") else ""),
        *_metric_lines(report),
        f"  WARNING: {warning}" if (warning := report.get("tta_warning")) else "",
        f"  WARNING: {hash_note}" if hash_note else "",
        left_out_line(info.left_out),
        f"  unusable: {len(info.skipped)} file(s) skipped, each with its reason in "
        f"{result['unusable_files']}"
        if info.skipped
        else "",
        f"  report: {result['report']}",
        f"  predictions: {result['predictions']} (one row per image)",
        f"  plots:  {', '.join(str(p) for p in plots)} (copies in {shared}/)",
        f"  mlflow run: {result.get('mlflow_run_id', 'disabled')}",
    ]
    print("\n".join(x for x in lines if x))
