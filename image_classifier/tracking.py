"""MLflow: the embedded store by default, a server by URL (what each run records: lineage.py).

The only module that talks to MLflow: commands get a Lightning MLFlowLogger from `create_logger`
(or `open_run` for an existing run) and log through the helpers below.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from image_classifier.errors import UserError, override
from image_classifier.rules import safe_name

logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # its errors, raised too


def resolve_uri(logger_cfg, root: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location); the embedded store keeps both under <root>/mlruns."""
    if logger_cfg.get("tracking_uri"):
        return str(logger_cfg.tracking_uri), None
    store = Path(root).resolve() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def check_reachable(uri: str, timeout: float) -> None:
    """Fail within `timeout` seconds, with the fix, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    # MLflow's client retries for minutes by default; one quick probe settles it first
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"The MLflow tracking server at {uri} is unreachable ({reason}). Start it "
            "(`uv run mlflow server --host 127.0.0.1 --port 5000`), fix logger.tracking_uri, or "
            "drop the override to use the embedded store (logger.tracking_uri=null), or disable "
            "tracking with logger.enabled=false."
        ) from None


def create_logger(cfg, run_name: str, tags: dict[str, str], run_id: str | None = None):
    """Lightning's MLFlowLogger on the configured store, or None when logging is disabled or this
    is not the first process of a distributed run (Lightning logs from rank 0 only; a logger on
    every rank would open the embedded store from every node at once, and racing to create its
    tables fails)."""
    from lightning.pytorch.utilities import rank_zero_only

    if not cfg.logger.enabled or getattr(rank_zero_only, "rank", 0) != 0:
        return None
    uri, artifacts = resolve_uri(cfg.logger, cfg.paths.root)
    experiment_id(cfg)  # created here, quietly: Lightning's logger would warn it was not found
    logger = _logger_class()(
        experiment_name=cfg.logger.experiment,
        run_name=cfg.logger.get("run_name") or run_name,
        tracking_uri=uri,
        tags={**tags, **sweep_tags()},
        artifact_location=artifacts,
        run_id=run_id,
    )
    _ = logger.experiment  # create the run now, so a broken store fails before training starts
    return logger


def sweep_tags() -> dict[str, str]:
    """In a Hydra multirun: the sweep's folder and trial number (sweeps.py finds its runs)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    if str(hc.mode) != "RunMode.MULTIRUN":
        return {}
    return {"sweep": str(Path(hc.sweep.dir).resolve()), "sweep.trial": str(hc.job.num)}


def experiment_id(cfg) -> str | None:
    """The configured MLflow experiment's id, created when new (None when tracking is off)."""
    if not cfg.logger.enabled:
        return None
    import mlflow

    uri, artifacts = resolve_uri(cfg.logger, cfg.paths.root)
    check_reachable(uri, float(cfg.logger.connect_timeout))
    with _creating(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)  # makes a new store's tables
        exp = client.get_experiment_by_name(cfg.logger.experiment)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(cfg.logger.experiment, artifact_location=artifacts)


def _creating(uri: str):
    """For the embedded SQLite store, a file lock beside it: commands started together on a new
    project raced to create its tables ("Online migration expected to match one row")."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=300)


def sweep_runs(cfg, sweep: str) -> list:
    """The MLflow runs of one sweep (tagged by sweep_tags), the best `best_score` first, and of
    equal scores (a small validation split's accuracy ties often) the lower val/loss first."""
    exp = experiment_id(cfg)
    if exp is None:
        return []
    import mlflow

    uri, _ = resolve_uri(cfg.logger, cfg.paths.root)
    return mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [exp],
        filter_string=f"tags.sweep = '{sweep}'",
        order_by=["metrics.best_score DESC", "metrics.best_val_loss ASC"],
    )


@functools.cache
def _logger_class():
    """Lightning's MLFlowLogger, except that logging hyperparameters into a run that already has
    them (a resumed run) keeps the run: values already logged are skipped, and a value that
    changed (a path after the project moved, the number of epochs of an extended schedule) is
    recorded as the tag `resumed.<key>` instead of the param MLflow refuses to change.
    `train.resume` has refused every other change before training started."""
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    class ResumableMLFlowLogger(MLFlowLogger):
        @rank_zero_only
        def log_hyperparams(self, params) -> None:
            from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

            flat = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
            logged = self.experiment.get_run(self.run_id).data.params
            new = {k: v for k, v in flat.items() if k not in logged}
            changed = {f"resumed.{k}": v for k, v in flat.items() if k in logged and logged[k] != v}
            if new:
                super().log_hyperparams(new)
            for k, v in changed.items():
                self.experiment.set_tag(self.run_id, k, v)

    return ResumableMLFlowLogger


# -- one style for every command: Lightning's MLFlowLogger, and its client for the rest ----------
def open_run(cfg, run_id: str):
    """A logger on an existing run (export adds to the training run); None: tracking is off."""
    return create_logger(cfg, run_name="", tags={}, run_id=run_id)


def log_artifacts(logger, paths, artifact_path: str | None = None) -> None:
    e = logger.experiment
    for p in paths:
        (e.log_artifacts if Path(p).is_dir() else e.log_artifact)(
            logger.run_id, str(p), artifact_path=artifact_path
        )


def log_metrics(logger, metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
        logger.experiment.log_metric(logger.run_id, k, float(v))


def set_tags(logger, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        logger.experiment.set_tag(logger.run_id, k, v)


def finish(logger) -> None:
    """End a run that no Lightning Trainer ends (audit)."""
    logger.experiment.set_terminated(logger.run_id)


@contextlib.contextmanager
def active_run(logger):
    """The logger's run as MLflow's active run, for APIs that only log into the active run
    (`mlflow.pyfunc.log_model`)."""
    import mlflow

    mlflow.set_tracking_uri(logger._tracking_uri)
    with mlflow.start_run(run_id=logger.run_id):
        yield


# -- the model registry: names, versions and aliases (models:/NAME@ALIAS) ----------------------
def registry_client(cfg):
    """MLflow's client on the configured store (the embedded one, or a server by URL); the
    process-wide URIs point there too, for the APIs that only read those."""
    if not cfg.logger.enabled:
        raise UserError(
            "The model registry lives in the MLflow store, and tracking is off "
            "(logger.enabled=false). Turn it on, or point logger.tracking_uri at a server."
        )
    import mlflow

    uri, _ = resolve_uri(cfg.logger, cfg.paths.root)
    check_reachable(uri, float(cfg.logger.connect_timeout))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, V)."""
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise UserError(
        f"{uri!r} is not a registered model address: use models:/NAME@ALIAS (e.g. "
        "models:/fashion_mnist-cnn@champion) or models:/NAME/VERSION."
    )


def find_version(client, name: str, alias: str | None, version: str | None):
    """The model version an alias or number names; the error lists what exists instead."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=100)]
        raise UserError(
            f"No registered model named {name!r} in the MLflow store "
            f"({', '.join(names) or 'none registered yet'}). Register one with "
            "`uv run python commands.py command=register register.name=NAME`."
        ) from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        aliases = ", ".join(f"@{a}" for a in sorted(model.aliases or {})) or "no aliases"
        latest = max((int(v.version) for v in model.latest_versions or []), default=0)
        what = f"alias @{alias}" if alias is not None else f"version {version}"
        raise UserError(
            f"Registered model {name!r} has no {what} (it has {aliases}; versions 1..{latest}). "
            f"Move an alias with `command=register {override('register.name', name)} "
            "register.version=N register.alias=ALIAS`."
        ) from None


def versions(client, name: str) -> list:
    """Every version of registered model `name`, with its tags ([] when there is none)."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:  # a name the filter language cannot quote: nothing to compare
        return []


def newest_version(client, name: str):
    """The highest version of registered model `name`, or None when there is none."""
    return max(versions(client, name), key=lambda v: int(v.version), default=None)


def register_version(client, model_uri: str, name: str, run_id: str | None, tags, description):
    """A new version of registered model `name` (created when new) from a logged model;
    `client` from `registry_client`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:  # quietly: MLflow's "Created version" lines said what the command's summary says
        with contextlib.redirect_stderr(io.StringIO()):
            version = mlflow.register_model(model_uri, name, tags=tags)
    except MlflowException as e:
        raise UserError(f"Could not register {model_uri} as {name!r}: {e.message}") from None
    client.update_model_version(name, version.version, description=description)
    if run_id:
        client.set_model_version_tag(name, version.version, "run_id", run_id)
    return version


def fetch_registered(cfg, uri: str) -> tuple[Path, dict]:
    """A registered version's ONNX file (fetched once into mlruns/registry/) and its facts:
    {name, version, aliases, run_id, uri}."""
    import mlflow
    import mlflow.artifacts

    name, alias, number = parse_model_uri(uri)
    client = registry_client(cfg)
    mv = find_version(client, name, alias, number)
    folder = Path(cfg.paths.root) / "mlruns" / "registry" / safe_name(name) / str(mv.version)
    if not folder.is_dir():
        tmp = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"Fetching {uri} (version {mv.version}) once into {folder}", file=sys.stderr)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar a file
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}",
            dst_path=str(tmp),
            tracking_uri=mlflow.get_tracking_uri(),
            registry_uri=mlflow.get_registry_uri(),
        )
        os.replace(tmp, folder)
    found = sorted(folder.glob("artifacts/*.onnx"))
    if len(found) != 1:
        raise UserError(
            f"{uri} (version {mv.version}) holds no single ONNX file ({len(found)} found in "
            f"{folder}/artifacts); register a model exported by `command=export-onnx`."
        )
    info = {"name": name, "version": str(mv.version), "aliases": list(mv.aliases or [])}
    return found[0], {**info, "run_id": mv.run_id, "uri": uri}


def move_alias(client, name: str, alias: str, version: str):
    """Point `alias` of model `name` at `version`; the version it left (None: a new alias)."""
    from mlflow.exceptions import MlflowException

    try:
        before = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        before = None
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise UserError(f"Cannot set alias @{alias} of {name!r}: {e.message}") from None
    return before


def run_data(client, run_id: str | None):
    """The params, metrics and tags of run `run_id`, or None when this store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).data if run_id else None
    except MlflowException:
        return None
