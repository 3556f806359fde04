"""MLflow: the embedded store by default, a server by URL, and the lineage every run records."""

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

KEY_PACKAGES = ("torch", "torchvision", "lightning", "timm", "torchmetrics", "mlflow", "dvc",
                "onnx", "onnxruntime", "onnxruntime-gpu", "hydra-core", "pillow")  # fmt: skip


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
        experiment_name=cfg.logger.experiment, run_name=cfg.logger.get("run_name") or run_name,
        tracking_uri=uri, tags=tags, artifact_location=artifacts, run_id=run_id,
    )  # fmt: skip
    _ = logger.experiment  # create the run now, so a broken store fails before training starts
    return logger
