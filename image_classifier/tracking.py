"""MLflow: the embedded store by default, a server by URL, and the lineage every run records.

The only module that talks to MLflow: commands get a Lightning MLFlowLogger from `create_logger`
(or `open_run` for an existing run) and log through the helpers below.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from image_classifier.errors import UserError

KEY_PACKAGES = (
    "torch",
    "torchvision",
    "lightning",
    "timm",
    "torchmetrics",
    "mlflow",
    "dvc",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "hydra-core",
    "pillow",
)


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


def git_info(root: str | Path) -> dict[str, str]:
    def git(*args):
        try:
            p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return p.stdout.strip() if p.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"git_commit": "unknown (not a git checkout)"}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def dvc_hash(root: str | Path) -> str:
    """The md5 that data.dvc records for data/ (DVC's own hash), or '' when not tracked."""
    p = Path(root) / "data.dvc"
    if not p.exists():
        return ""
    try:
        outs = yaml.safe_load(p.read_text()).get("outs") or []
        return str(outs[0].get("md5", "")) if outs else ""
    except (yaml.YAMLError, AttributeError, IndexError):
        return ""


def package_versions() -> dict[str, str]:
    out = {}
    for name in KEY_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[f"version.{name}"] = importlib.metadata.version(name)
    return out


def lineage_tags(root: str | Path, data_hash: str) -> dict[str, str]:
    tags = {**git_info(root), **package_versions(), "data_hash": data_hash}
    if h := dvc_hash(root):
        tags["dvc_data_md5"] = h
    return tags


def create_logger(cfg, run_name: str, tags: dict[str, str], run_id: str | None = None):
    """Lightning's MLFlowLogger on the configured store, or None when logging is disabled."""
    if not cfg.logger.enabled:
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    uri, artifacts = resolve_uri(cfg.logger, cfg.paths.root)
    check_reachable(uri, float(cfg.logger.connect_timeout))
    logger = MLFlowLogger(
        experiment_name=cfg.logger.experiment,
        run_name=cfg.logger.get("run_name") or run_name,
        tracking_uri=uri,
        tags=tags,
        artifact_location=artifacts,
        run_id=run_id,
    )
    _ = logger.experiment  # create the run now, so a broken store fails before training starts
    return logger


# -- one style for every command: Lightning's MLFlowLogger, and its client for the rest ----------
def open_run(cfg, run_id: str):
    """A logger attached to an existing run (export adds to the training run), or None when
    tracking is disabled."""
    return create_logger(cfg, run_name="", tags={}, run_id=run_id)


def log_artifacts(logger, paths, artifact_path: str | None = None) -> None:
    for p in paths:
        if Path(p).is_dir():
            logger.experiment.log_artifacts(logger.run_id, str(p), artifact_path=artifact_path)
        else:
            logger.experiment.log_artifact(logger.run_id, str(p), artifact_path=artifact_path)


def log_dict(logger, data: dict, name: str) -> None:
    logger.experiment.log_dict(logger.run_id, data, name)


def log_metrics(logger, metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
        logger.experiment.log_metric(logger.run_id, k, float(v))


def log_params(logger, params: dict) -> None:
    for k, v in params.items():
        logger.experiment.log_param(logger.run_id, k, v)


def set_tags(logger, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        logger.experiment.set_tag(logger.run_id, k, v)


def finish(logger) -> None:
    """End a run that no Lightning Trainer ends (audit)."""
    logger.experiment.set_terminated(logger.run_id)


def safe_name(name: str) -> str:
    """A class name as one part of a metric key: anything but letters, digits, - _ . becomes _."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


@contextlib.contextmanager
def active_run(logger):
    """The logger's run as MLflow's active run, for APIs that only log into the active run
    (`mlflow.pyfunc.log_model`)."""
    import mlflow

    mlflow.set_tracking_uri(logger._tracking_uri)
    with mlflow.start_run(run_id=logger.run_id):
        yield
