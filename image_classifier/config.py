"""The composed config, checked once at load, before any data, model or MLflow run is touched.

One table: each row is a key, the kind of value it takes and its range or choices. Choices come
from the registries that build the objects (optimisers, schedules, augmentation presets, download
sources, output writers, ...), so an option cannot be offered here and refused later or the other
way round. `commands.py` runs `validate` on every command line; bad values exit 2 with every
problem listed, each with the options and the closest match.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from image_classifier.errors import did_you_mean
from image_classifier.rules import (
    COUNT,
    FRACTION,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    Choice,
    Each,
    Either,
    Number,
    Suffix,
)

_MISSING = object()


def _rules() -> dict:
    """key -> rule, for every setting that has a type, a range or choices."""
    return {
        "seed": Number(integer=True),
        **_train_rules(),
        **_data_rules(),
        **_inference_rules(),
        **_export_rules(),
        **_audit_rules(),
        "logger.connect_timeout": POSITIVE,
    }


def _train_rules() -> dict:
    from image_classifier.data.augment import HFLIP, PRESETS
    from image_classifier.models.optim import MONITORS, OPTIMIZERS, SCHEDULERS
    from image_classifier.models.tta import TTA_VALUES

    return {
        "train.epochs": Either("auto", POSITIVE_INT),
        "train.time_budget": Number(0, open_lo=True, optional=True),
        "train.batch_size": POSITIVE_INT,
        "train.optimizer": Choice(tuple(OPTIMIZERS)),
        "train.lr": POSITIVE,
        "train.muon_lr_scale": POSITIVE,
        "train.weight_decay": Number(0),
        "train.momentum": FRACTION,
        "train.scheduler": Choice(tuple(SCHEDULERS)),
        "train.warmup": Number(0, 1, open_lo=True),
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
    from image_classifier.data.images import RESIZE_MODES
    from image_classifier.data.manifest import MULTI_LABEL
    from image_classifier.data.sources import SOURCES

    return {
        "data.size": Either("auto", Each(POSITIVE_INT, length=2)),
        "data.channels": Choice((1, 3, "auto")),
        "data.resize": Choice(RESIZE_MODES),
        "data.split": Each(Number(0), length=3),
        "data.val_size": COUNT,
        "data.cache": Choice(("decoded", "none")),
        "data.cache_max_gb": Number(0),
        "data.multi_label": Choice(MULTI_LABEL),
        "data.download.sources": Each(Choice(tuple(SOURCES))),
        "features.size": Each(POSITIVE_INT, length=2),
        "features.channels": Choice((1, 3)),
        "features.batch_size": POSITIVE_INT,
    }


def _inference_rules() -> dict:
    from image_classifier.inference.infer import SORT_MODES, WRITERS
    from image_classifier.inference.predictor import DEVICES
    from image_classifier.inference.ray_engine import ENGINES as INFER_ENGINES
    from image_classifier.inference.ray_engine import PARQUET
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
    from image_classifier.audit.labels import FEATURE_SOURCES

    return {
        "audit.features": Choice(FEATURE_SOURCES),
        "audit.feature_dims": POSITIVE_INT,
        "audit.folds": Number(2, integer=True),
        "audit.near_candidates": POSITIVE,
        "audit.near_threshold": POSITIVE,
        "audit.neighbours": POSITIVE_INT,
        "audit.outlier_fence": POSITIVE,
        "audit.max_outliers": COUNT,
        "audit.examples": COUNT,
        "audit.quality.dark": FRACTION,
        "audit.quality.light": FRACTION,
        "audit.quality.low_information": FRACTION,
        "audit.quality.blurry": Number(0),
        "audit.quality.odd_size": Number(1),
        "audit.quality.odd_aspect_ratio": FRACTION,
    }


def problems(cfg) -> list[str]:
    """Every value of `cfg` that breaks its rule, as one sentence each (empty when all is well)."""
    found = []
    for key, rule in _rules().items():
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        if value is _MISSING:
            continue  # not in this config (a data group without that key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if why := rule.problem(key, value):
            found.append(why)
    return found + _combination_problems(cfg)


def _combination_problems(cfg) -> list[str]:
    """Values that are each fine but cannot go together."""
    found = []
    budget, nodes = (OmegaConf.select(cfg, k) for k in ("train.time_budget", "trainer.num_nodes"))
    if budget and nodes and int(nodes) > 1:
        found.append(
            f"train.time_budget={budget} cannot be used with trainer.num_nodes={nodes}: each node "
            "would time its own epochs and stop at a different one, and the others would wait "
            "for it forever. Set train.epochs instead."
        )
    from image_classifier.inference.ray_engine import PARQUET

    output, engine = (OmegaConf.select(cfg, k) for k in ("infer.output", "infer.engine"))
    parquet = str(output or "").lower().endswith(PARQUET)
    if parquet and engine != "ray":
        found.append(
            f"infer.output={output!r}: Parquet is written by the Ray engine (infer.engine=ray); "
            "with infer.engine=local use a .csv or .json file."
        )
    if parquet and OmegaConf.select(cfg, "infer.sort_into"):
        found.append(
            "infer.sort_into needs the rows on this machine; with infer.output=*.parquet they "
            "stay on the cluster. Use a .csv or .json output to sort the images."
        )
    return found


# -- the command line, checked before Hydra runs ---------------------------------------------------
def check_command_line(args: list[str], config_dir: Path) -> None:
    """Parse and compose the overrides once, and validate the result: a bad key, group or value
    raises UserError (exit 2) in a second or two, before any work starts."""
    from hydra.errors import HydraException

    from image_classifier.errors import UserError

    plain = [a for a in args if not a.startswith("-")]
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException as e:
        raise UserError(f"Cannot parse the overrides: {e}") from None
    from image_classifier.sweeps import check_launcher

    check_launcher(parsed)
    variants = _variants(parsed, config_dir)
    for overrides in variants:
        found = problems(_compose(overrides, config_dir))
        if found:
            raise UserError(
                "Bad configuration value" + ("s" if len(found) > 1 else "") + ": " + " ".join(found)
            )


def _variants(parsed, config_dir: Path) -> list[list[str]]:
    """The overrides as `key=value` lists: the first value of every sweep, then one list per
    further value of each sweep (so each value a multirun would use is checked)."""
    first, sweeps = [], []
    for o in parsed:
        if o.is_hydra_override():
            continue
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        _check_group(o.key_or_group, values, config_dir)
        first.append(f"{o.get_key_element()}={values[0]}")
        sweeps.append((len(first) - 1, o.get_key_element(), values[1:]))
    variants = [first]
    for i, key, rest in sweeps:
        variants += [[*first[:i], f"{key}={v}", *first[i + 1 :]] for v in rest]
    return variants


def _check_group(key: str, values: list[str], config_dir: Path) -> None:
    """A config group's value must name one of its files."""
    from image_classifier.errors import UserError

    if not (config_dir / key).is_dir():
        return
    options = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
    for v in values:
        if v not in options:
            extra = (
                " (or any timm architecture: model=timm model.name=NAME)" if key == "model" else ""
            )
            raise UserError(
                f"Unknown {key} option {v!r}.{did_you_mean(v, options)} "
                f"Available: {', '.join(options)}{extra}."
            )


def compose_config(*overrides: str, root: str | Path | None = None):
    """The composed config for Python callers (scripts, notebooks): the project's configs with
    these overrides, `paths.root` set to `root` when given, checked by the same rules as the
    command line."""
    from image_classifier import CONFIG_DIR
    from image_classifier.errors import UserError

    given = [*([f"paths.root={root}"] if root is not None else []), *overrides]
    cfg = _compose(given, CONFIG_DIR)
    if found := problems(cfg):
        raise UserError(" ".join(found))
    return cfg


def _compose(overrides: list[str], config_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from image_classifier.errors import UserError, override_error

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(override_error(e, config_dir, overrides)) from None
