"""What every run records about where it came from, without MLflow: the git commit (and whether
the tree was dirty), DVC's hash of data/, the versions of the key packages, and the machine (CPU
model, cores, instruction sets, GPU). `tracking` logs these as tags; the benchmarks print the
machine line."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import subprocess
from pathlib import Path

import yaml

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


# CPU features that change training speed or numerics by an order of magnitude (a 2-core CPU with
# AVX-512 and bfloat16 instructions trained the default job 4.6x faster than one with only AVX2)
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "bf16")


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model name, the CPU_FEATURES it lists) from the text of Linux's /proc/cpuinfo."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, [f for f in CPU_FEATURES if f in flags]


@functools.cache
def cpu_info() -> tuple[str, list[str]]:
    """parse_cpuinfo of this machine (read once per process); ("", []) where there is no
    /proc/cpuinfo (macOS, Windows)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return "", []


def machine_info() -> dict[str, str]:
    """What ran the job, for every figure to name its machine: CPU model, usable cores, its
    speed-relevant instructions, and the GPU (torch is imported here, not at module load)."""
    import platform

    import torch

    model, features = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "machine.cpu": model or platform.processor() or platform.machine(),
        "machine.cpu_cores": str(cores),
        "machine.cpu_features": ",".join(features) or "none listed",
        "machine.gpu": gpu,
    }


def describe_machine(m: dict[str, str]) -> str:
    """One line for summaries and benchmark headers: 'AMD EPYC, 2 cores (avx2, avx512f), no GPU'."""
    gpu = "no GPU" if m["machine.gpu"] == "none" else f"GPU {m['machine.gpu']}"
    return (
        f"{m['machine.cpu']}, {m['machine.cpu_cores']} cores ({m['machine.cpu_features']}), {gpu}"
    )


def lineage_tags(root: str | Path, data_hash: str) -> dict[str, str]:
    tags = {**git_info(root), **package_versions(), **machine_info(), "data_hash": data_hash}
    if h := dvc_hash(root):
        tags["dvc_data_md5"] = h
    return tags
