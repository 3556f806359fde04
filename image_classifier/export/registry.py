"""`command=register` (and `export-onnx export.register=NAME`): an exported model into MLflow's
model registry, under a name, with an alias that `serve` and `infer` load by.

    uv run python commands.py command=register                      # newest export -> @champion
    uv run python commands.py command=serve serve.model=models:/fashion_mnist-cnn@champion
    uv run python commands.py command=register register.name=fashion_mnist-cnn \
        register.version=3 register.alias=champion                   # promote (or roll back)

Each version is the MLflow pyfunc model that takes image bytes (export/mlflow_model.py: its
signature, the ONNX file with classes and preprocessing inside), logged into the run that trained
the checkpoint when this store has it, and tagged with its lineage: data hash, source checkpoint,
ONNX SHA-256, training run, git commit. Works on the embedded store and on a server URL.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from image_classifier import lineage, runs, tracking
from image_classifier.data.sources import sha256_file
from image_classifier.errors import UserError, override

log = logging.getLogger(__name__)


def default_name(meta: dict) -> str:
    """<data name>-<model name>, e.g. fashion_mnist-cnn (inference/meta.py says it once)."""
    from image_classifier.inference.meta import ModelMeta

    return ModelMeta.from_dict(meta).name


def version_tags(meta: dict, onnx_path: Path, cfg) -> dict[str, str]:
    """What a registered version says about where it came from."""
    classes = json.dumps(meta["classes"])
    return {
        "classes": classes if len(classes) <= 4000 else classes[:3990] + " ...]",
        "num_classes": str(len(meta["classes"])),
        "model": str((meta.get("model") or {}).get("name")),
        "data_name": str(meta.get("data_name")),
        "data_hash": str(meta.get("data_hash")),
        "source_checkpoint": str(meta.get("source_checkpoint")),
        "onnx_sha256": sha256_file(onnx_path),
        "temperature": str(meta.get("temperature", 1.0)),
        **lineage.git_info(cfg.paths.root),
    }


def _run_for(cfg, client, meta: dict, name: str):
    """The checkpoint's training run when this store has it, else a new run for the registration."""
    run_id = meta.get("mlflow_run_id")
    if run_id and tracking.run_data(client, run_id) is not None:
        return tracking.open_run(cfg, run_id)
    if run_id:  # a run of another store: register from a run of this one
        log.info("Training run %s is not in this MLflow store; logging a new run.", run_id)
    return tracking.create_logger(
        cfg,
        run_name=f"register-{name}",
        tags=lineage.lineage_tags(cfg.paths.root, str(meta.get("data_hash"))),
    )


def register(
    cfg, onnx_path: Path, name: str | None, alias: str | None, model_uri=None, client=None
) -> dict:
    """Register `onnx_path` (logging its MLflow model first unless `model_uri` is given)."""
    from image_classifier.inference.predictor import OnnxPredictor

    meta = OnnxPredictor(onnx_path, device="cpu").meta.extra
    name = name or default_name(meta)
    client = client or tracking.registry_client(cfg)
    if same := already_registered(client, name, onnx_path, alias):
        return same
    logger = None
    if model_uri is None:
        from image_classifier.export.mlflow_model import log_mlflow_model

        logger = _run_for(cfg, client, meta, name)
        with tracking.active_run(logger):
            model_uri = log_mlflow_model(onnx_path)
    run_id = logger.run_id if logger is not None else meta.get("mlflow_run_id")
    description = (
        f"{len(meta['classes'])} classes ({', '.join(meta['classes'][:10])}"
        f"{', ...' if len(meta['classes']) > 10 else ''}); from {meta.get('source_checkpoint')}"
    )
    if not cfg.register.get("new_classes"):
        check_same_classes(client, name, meta["classes"])
    mv = tracking.register_version(
        client, model_uri, name, run_id, version_tags(meta, onnx_path, cfg), description
    )
    return _aliased(client, name, alias, mv.version, model_uri=model_uri, run_id=run_id)


def already_registered(client, name: str, onnx_path: Path, alias: str | None) -> dict | None:
    """The version of `name` registered from a file with these bytes (ONNX SHA-256), with
    `alias` moved to it: registering it again (a re-run, `dvc repro`) added a copy each time."""
    sha = sha256_file(onnx_path)
    same = [v for v in tracking.versions(client, name) if v.tags.get("onnx_sha256") == sha]
    if not same:
        return None
    mv = min(same, key=lambda v: int(v.version))
    return _aliased(client, name, alias, mv.version, model_uri=mv.source, run_id=mv.run_id) | {
        "already": True
    }


def _aliased(client, name: str, alias: str | None, version, **more) -> dict:
    """`alias` moved to `version` of `name` (none given: nothing moves), and what register
    reports of it: the address to load it by, and the version the alias leaves (`before`), with
    the two training runs' validation scores when they scored the same split."""
    before = tracking.move_alias(client, name, alias, version) if alias else None
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    moved = {}
    if before is not None and str(before.version) != str(version):
        now = tracking.find_version(client, name, None, str(version))
        moved = {"before": str(before.version), "scores": compared_scores(client, before, now)}
    return {"name": name, "version": str(version), "alias": alias, **more, **moved, "uri": uri}


# what makes two training runs' best validation scores comparable: the same files in the same
# splits (a folder's data hash covers its split; an IDX data set's split is data.seed and
# data.val_size) and the same monitored metric
SAME_VALIDATION = ("data/hash", "config/data/seed", "config/data/val_size", "optim/monitor")


def compared_scores(client, before, after) -> tuple[str, float, float, int] | None:
    """(monitored metric, its best value in `before`'s training run, in `after`'s, validation
    images) when both runs are in this store and scored the same validation split; else None."""
    runs = [tracking.run_data(client, v.run_id) for v in (before, after)]
    if any(r is None or "best_score" not in r.metrics for r in runs):
        return None
    if any(runs[0].params.get(k) != runs[1].params.get(k) for k in SAME_VALIDATION):
        return None
    metric = runs[0].params.get("optim/monitor", "the monitored metric")
    n = int(runs[0].metrics.get("val_images", 0))
    return metric, runs[0].metrics["best_score"], runs[1].metrics["best_score"], n


def clearly_lower(scores) -> bool:
    """The new score below the 95 % interval of the old one on these validation images (a
    proportion's Wilson interval, as a sweep tells its trials apart)."""
    from image_classifier.models.metrics import wilson_interval  # torch: only when comparing

    _, old, new, n = scores
    return new < (wilson_interval(old, n)[0] if n and 0 <= old <= 1 else old)


def alias_lines(result: dict) -> list[str]:
    """What moving the alias did: the version it left, how to move it back, and both training
    runs' validation scores when they scored the same split."""
    if "before" not in result:
        return []
    lines = [
        f"  @{result['alias']} was version {result['before']}; to move it back: {_back(result)}"
    ]
    if (scores := result.get("scores")) is not None:
        metric, old, new, n = scores
        lines.append(
            f"  validation ({metric}, best epoch of each training run, the same {n} images): "
            f"version {result['before']} {old:.4f}, version {result['version']} {new:.4f}"
            + ("" if new >= old or clearly_lower(scores) else " (inside the 95 % interval)")
        )
    return lines


def _back(result: dict) -> str:
    return (
        f"uv run python commands.py command=register {override('register.name', result['name'])} "
        f"register.version={result['before']} {override('register.alias', result['alias'])}"
    )


def warn_if_lower(result: dict) -> None:
    """A warning when the alias moved to a version that scored clearly lower on the same
    validation split than the version it left: it still moves (the user asked), and the fix
    is named."""
    if (scores := result.get("scores")) is not None and clearly_lower(scores):
        log.warning(
            "@%s of %r now points at version %s, which scored lower on the same validation split "
            "than version %s did (%s %.4f < %.4f). To move it back: %s",
            result["alias"],
            result["name"],
            result["version"],
            result["before"],
            scores[0],
            scores[2],
            scores[1],
            _back(result),
        )


def check_same_classes(client, name: str, classes: list[str]) -> None:
    """A registered name stands for one set of classes: a model predicting others (another
    folder's model under the default <data name>-<model name>) would take its alias silently."""
    newest = tracking.newest_version(client, name)
    if newest is None or "classes" not in newest.tags:
        return
    try:
        theirs = json.loads(newest.tags["classes"])
    except ValueError:  # a list over 4,000 characters is kept cut short: nothing to compare
        return
    if theirs == list(classes):
        return
    from image_classifier.data.identity import class_change

    raise UserError(
        f"Registered model {name!r} version {newest.version} predicts other classes than this "
        f"model{class_change(theirs, list(classes), (f'version {newest.version}', 'this model'))}"
        ". Register it under another name (register.name=NAME, or export.register=NAME "
        f"when exporting), or, if it is meant to replace version {newest.version} for "
        "everyone who loads this name, set register.new_classes=true."
    )


def promote(client, name: str, version: str, alias: str) -> dict:
    """Point `alias` at an existing version."""
    return _aliased(
        client, name, alias, tracking.find_version(client, name, None, str(version)).version
    )


def run_register(cfg) -> dict:
    r = cfg.register
    client = tracking.registry_client(cfg)  # tracking off or a server down: said before anything
    if r.get("version") is not None:
        if not r.get("name") or not r.get("alias"):
            raise UserError(
                f"register.version={r.version} moves an alias to an existing version: set "
                "register.name=NAME and register.alias=ALIAS too."
            )
        result = promote(client, str(r.name), str(r.version), str(r.alias))
        print(
            f"Alias @{result['alias']} of {result['name']!r} now points at version "
            f"{result['version']}: {result['uri']}",
            *alias_lines(result),
            sep="\n",
        )
        warn_if_lower(result)
        return result
    onnx_path = runs.model_file(cfg, r.get("model"), "register.model")
    if onnx_path.suffix.lower() != ".onnx" or not onnx_path.is_file():
        name, alias = r.get("name"), r.get("alias")
        fix = (
            "export and register it in one step: uv run python commands.py "
            f"command=export-onnx {override('export.checkpoint', onnx_path)} "
            + (override("export.register", name) if name else "export.register=true")
            + (f" {override('register.alias', alias)}" if alias else "")
            if onnx_path.suffix.lower() == ".ckpt" and onnx_path.is_file()
            else "give one, or a run folder holding one"
        )
        raise UserError(
            f"register.model={str(onnx_path)!r} must be an existing .onnx file written by "
            f"`command=export-onnx`: {fix}."
        )
    result = register(cfg, onnx_path, r.get("name"), r.get("alias"), client=client)
    print_registered(result, onnx_path)
    return result


def print_registered(result: dict, onnx_path: Path) -> None:
    alias = f", alias @{result['alias']}" if result["alias"] else ""
    print(
        "\n".join(
            [
                f"{onnx_path} was already registered as {result['name']!r} version "
                f"{result['version']} (the same ONNX bytes): no new version"
                + (f"; @{result['alias']} points at it" if result["alias"] else "")
                if result.get("already")
                else f"Registered {onnx_path} as {result['name']!r} version "
                f"{result['version']}{alias}",
                f"  mlflow model: {result['model_uri']} (run {result['run_id']})",
                *alias_lines(result),
                f"  serve it: uv run python commands.py command=serve "
                f"{override('serve.model', result['uri'])}",
                f"  predict:  uv run python commands.py command=infer "
                f"{override('infer.model', result['uri'])} "
                "infer.input=PATH",
            ]
        )
    )
    warn_if_lower(result)
