"""The table of settings: every config key and the kind of value it takes (a range, choices, a
file suffix, a switch, a path or name), or where else it is checked (CHECKED_ELSEWHERE). Choices
come from the registries that build the objects (optimisers, schedules, augmentation presets,
download sources, output writers, ...), so an option cannot be offered here and refused later or
the other way round. `config.py` applies it.
"""

from __future__ import annotations

from image_classifier.rules import (
    COUNT,
    FLAG,
    FRACTION,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    Choice,
    Each,
    Either,
    Entries,
    Number,
    Suffix,
    Text,
)


def rule_table() -> dict:
    """key -> rule, for every setting that has a type, a range or choices."""
    return {
        "seed": Number(integer=True),
        **_train_rules(),
        **_data_rules(),
        **_inference_rules(),
        **_export_rules(),
        **_audit_rules(),
        **_free_form_rules(),
        "logger.connect_timeout": POSITIVE,
    }


# keys whose values another part checks, where the check knows more than a rule could
CHECKED_ELSEWHERE = {
    "trainer.": "Lightning's Trainer (passed to it unchanged)",
    "hydra.": "Hydra",
    "command": "commands.py (the command table, with the closest match)",
    "infer.address": "cluster.py (resolved as Ray resolves it, then a TCP connect)",
    "model.": "models/factory.py and timm (a network's own options)",
}


def _free_form_rules() -> dict:
    """Switches, paths, names and lists: the kind of value, not a range."""
    from image_classifier.data.images import RESIZE_MODES

    numbers = Either(None, Each(Number()))
    text = """data.name data.dir data.train_images data.train_labels data.test_images
        data.test_labels data.cache_dir data.root data.csv_file_column data.csv_label_column
        data.label_pattern
        data.download.system_dir data.download.apt_package data.download.record
        features.backbone features.dir logger.tracking_uri logger.experiment logger.run_name
        export.checkpoint export.trt.onnx export.trt.output export.triton.onnx
        export.triton.output export.triton.name register.model register.name register.alias
        infer.model infer.sort_into infer.file_column serve.model test.checkpoint
        explain.model explain.input explain.file_column explain.output
        calibrate.checkpoint train.resume train.init_from paths.root paths.data_dir
        paths.output_dir paths.plots"""
    flags = """train.class_weights train.compile train.calibrate train.device_data
        train.balanced_sampler train.channels_last train.keep_freed_memory data.strict
        data.download.track logger.enabled export.mlflow_model features.pretrained
        register.new_classes"""
    return {
        **dict.fromkeys(text.split(), Text()),
        **dict.fromkeys(flags.split(), FLAG),
        **dict.fromkeys(("data.mean", "data.std", "features.mean", "features.std"), numbers),
        "normalization": Entries(Entries(Each(Number()))),
        "data.kind": Choice(("idx", "folder")),
        "data.seed": Number(integer=True),
        "data.files": Entries(Text(optional=False)),
        # a classifier tells two classes apart at least ([] or null: every class the data has)
        "data.classes": Either(
            None, Each(Text(optional=False), means="classes", least=2, distinct=True)
        ),
        "data.label_separator": Text(optional=False),
        "data.download.urls": Each(Text(optional=False)),
        "data.download.timeout": POSITIVE,
        "paths.search": Each(Text(optional=False)),
        "infer.input": Text(),
        "serve.host": Text(optional=False),
        "features.resize": Choice(RESIZE_MODES),
        "export.register": Either(True, Text()),
        "export.trt.tolerance": POSITIVE,
        "export.triton.max_queue_delay_us": COUNT,
    }


def _train_rules() -> dict:
    from image_classifier.data.augment import HFLIP, PRESETS
    from image_classifier.models.optim import MONITORS, OPTIMIZERS, SCHEDULERS
    from image_classifier.models.tta import TTA_VALUES

    return {
        "train.epochs": Either("auto", POSITIVE_INT),
        "train.time_budget": Number(0, open_lo=True, optional=True),
        "train.batch_size": Either("auto", POSITIVE_INT),
        "train.frozen_stages": Either("auto", COUNT),
        "train.optimizer": Choice(tuple(OPTIMIZERS)),
        "train.lr": POSITIVE,
        "train.muon_lr_scale": POSITIVE,
        "train.weight_decay": Number(0),
        "train.momentum": FRACTION,
        "train.scheduler": Choice(tuple(SCHEDULERS)),
        "train.warmup": Number(0, 1, open_lo=True, open_hi=True),
        "train.step_size": POSITIVE_INT,
        "train.gamma": POSITIVE,
        "train.patience": COUNT,
        "train.label_smoothing": Number(0, 0.999, optional=True),
        "train.monitor": Choice(MONITORS),
        "train.threshold": Either("tune", PROBABILITY),
        "train.early_stopping": COUNT,
        "train.augment.preset": Choice(tuple(PRESETS)),
        "train.augment.hflip": Choice(HFLIP),
        "train.augment.shift": COUNT,
        "train.augment.erase": FRACTION,
        "train.device_budget_gb": Number(0),
        "train.augment.mixup": Number(0),
        "train.augment.cutmix": Number(0),
        "train.supcon_weight": Number(0),
        "train.ema": Number(0, 1, open_hi=True),
        "train.supcon_temperature": POSITIVE,
        "train.num_workers": COUNT,
        "train.threads": Number(1, integer=True, optional=True),
        "test.batch_size": POSITIVE_INT,
        "test.tta": Choice(TTA_VALUES),
    }


def _data_rules() -> dict:
    from image_classifier.data.identity import SPLIT_ORDERS
    from image_classifier.data.images import RESIZE_MODES
    from image_classifier.data.manifest import MULTI_LABEL
    from image_classifier.data.sources import SOURCES

    return {
        "data.size": Either(
            "auto", Each(POSITIVE_INT, 2, "height, width", "[128,128]", one_for_all=True)
        ),
        "data.channels": Choice((1, 3, "auto")),
        "data.grey_white": Either("auto", Number(1, integer=True, optional=True)),
        "data.resize": Choice(RESIZE_MODES),
        "data.split": Each(Number(0), 3, "train, val, test shares", "[0.8,0.1,0.1]"),
        "data.split_order": Choice(SPLIT_ORDERS),
        "data.val_size": COUNT,
        "data.cache": Choice(("decoded", "none")),
        "data.cache_max_gb": Number(0),
        "data.multi_label": Choice(MULTI_LABEL),
        "data.download.sources": Each(Choice(tuple(SOURCES))),
        "features.size": Each(POSITIVE_INT, 2, "height, width", "[224,224]"),
        "features.channels": Choice((1, 3)),
        "features.batch_size": POSITIVE_INT,
    }


def _inference_rules() -> dict:
    from image_classifier.inference.infer import WRITERS
    from image_classifier.inference.predictor import DEVICES
    from image_classifier.inference.ray_engine import ENGINES as INFER_ENGINES
    from image_classifier.inference.ray_engine import PARQUET
    from image_classifier.inference.sorting import SORT_MODES
    from image_classifier.serving.triton import ENGINES

    return {
        "infer.output": Suffix((*WRITERS, PARQUET)),
        "infer.engine": Choice(INFER_ENGINES),
        "infer.workers": Number(1, integer=True, optional=True),
        "infer.cpus_per_worker": POSITIVE,
        "infer.top_k": Number(1, integer=True, optional=True),
        "infer.batch_size": POSITIVE_INT,
        "infer.sort_mode": Choice(SORT_MODES),
        "infer.device": Choice(DEVICES),
        "infer.threshold": Number(0, 1, open_lo=True, open_hi=True, optional=True),
        "infer.min_confidence": Number(0, 1, open_lo=True, optional=True),
        "explain.target": Text(optional=False),
        "explain.batch_size": POSITIVE_INT,
        "explain.gallery": COUNT,
        "explain.device": Choice(DEVICES),
        "serve.threshold": Number(0, 1, open_lo=True, open_hi=True, optional=True),
        "serve.device": Choice(DEVICES),
        "serve.port": Number(0, 65535, integer=True),
        "serve.engine": Choice(ENGINES),
        "serve.grpc_port": Number(0, 65535, integer=True),
        "serve.metrics_port": Number(0, 65535, integer=True),
        "serve.max_body_mb": POSITIVE,
        "serve.max_images": POSITIVE_INT,
        "serve.max_pixels": POSITIVE_INT,
        "serve.max_batch": POSITIVE_INT,
        "serve.max_wait_ms": Number(0),
        "serve.shutdown_timeout_s": Number(0),
        "serve.log_level": Choice(("critical", "error", "warning", "info", "debug", "trace")),
    }


def _export_rules() -> dict:
    from image_classifier.export.tensorrt import PRECISIONS
    from image_classifier.export.triton import KINDS
    from image_classifier.models.tta import TTA_VALUES

    return {
        "export.output": Suffix((".onnx",)),
        "export.tta": Choice(TTA_VALUES),
        "export.opset": Number(7, integer=True),
        "export.tolerance": POSITIVE,
        "export.parity_images": COUNT,
        "export.trt.precision": Choice(PRECISIONS),
        "export.trt.min_batch": POSITIVE_INT,
        "export.trt.opt_batch": POSITIVE_INT,
        "export.trt.max_batch": POSITIVE_INT,
        "export.trt.workspace_gb": POSITIVE,
        "export.triton.kind": Choice(KINDS),
        "export.triton.max_batch_size": POSITIVE_INT,
        "export.triton.instances": POSITIVE_INT,
        "register.version": Number(1, integer=True, optional=True),
    }


def _audit_rules() -> dict:
    from image_classifier.audit.labels import FEATURE_SOURCES, PROBABILITY_SOURCES

    return {
        "audit.features": Choice(FEATURE_SOURCES),
        "audit.probabilities": Choice(PROBABILITY_SOURCES),
        "audit.feature_dims": POSITIVE_INT,
        "audit.folds": Number(2, integer=True),
        "audit.label_cut": Either("auto", POSITIVE),
        "audit.near_candidates": POSITIVE,
        "audit.near_threshold": POSITIVE,
        "audit.neighbours": POSITIVE_INT,
        "audit.outlier_fence": POSITIVE,
        "audit.max_outliers": COUNT,
        "audit.examples": COUNT,
        "audit.quality.dark": FRACTION,
        "audit.quality.light": FRACTION,
        "audit.quality.low_information": FRACTION,
        "audit.quality.class_share": Number(0),
        "audit.quality.blurry": Number(0),
        "audit.quality.blurry_contrast": Number(0),
        "audit.quality.odd_size": Number(1),
        "audit.quality.odd_aspect_ratio": FRACTION,
    }
