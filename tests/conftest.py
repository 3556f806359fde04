"""Fixtures: tiny images and IDX files made on the fly, configs composed for CPU and one epoch."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def class_image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A learnable pattern per class: bright left half / bright top half / bright diagonal."""
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    if label == 0:
        img[:, : size // 2] += 150
    elif label == 1:
        img[: size // 2, :] += 150
    else:
        np.fill_diagonal(img, 250)
        np.fill_diagonal(img[1:], 250)
    return img


def make_class_folders(
    root: Path,
    classes=("cat", "dog", "fox"),
    per_class: int = 10,
    size: int = 16,
    mode: str = "L",
    seed: int = 0,
) -> Path:
    """`mode` L: grey patterns; a colour mode (RGB, RGBA...): the same patterns tinted, a colour
    per class, so the folder reads as colour (grey pictures in a colour mode are grey)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(class_image(label % 3, rng, size))
            if mode not in ("L", "1", "I", "I;16", "F"):
                tint = np.roll([1.0, 0.9, 0.8], label)
                rgb = np.asarray(img, dtype=np.float32)[..., None] * tint
                img = Image.fromarray(rgb.astype(np.uint8), "RGB")
            img.convert(mode).save(d / f"{i:03d}.png")
    return root


def twelve_bit_folder(root, per_class: int = 6, top: int = 3000):
    """Two classes of 16-bit PNGs holding 12-bit values (a sensor's scans): a dark and a bright
    square, both within 0..`top`."""
    for c, level in (("dark", top // 3), ("bright", top)):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = np.full((16, 16), top // 6 + i, np.uint16)
            a[4:12, 4:12] = level
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def folder_data(tmp_path) -> Path:
    return make_class_folders(tmp_path / "images")


def write_idx_gz(path: Path, arr: np.ndarray) -> None:
    from image_classifier.data.idx import write_idx

    raw = path.with_suffix("")
    write_idx(raw, arr)
    path.write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()


@pytest.fixture
def idx_source(tmp_path) -> tuple[Path, dict[str, str]]:
    """A tiny Fashion-MNIST look-alike laid out as the Debian package has it: (dir, checksums)."""
    rng = np.random.default_rng(1)
    src = tmp_path / "system" / "fashion-mnist"
    src.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = np.stack(
            [
                np.kron(class_image(int(y) % 3, rng, 14), np.ones((2, 2), np.uint8)) + (int(y) * 5)
                for y in labels
            ]
        ).astype(np.uint8)
        arrays[f"{prefix}-images-idx3-ubyte"] = images
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    sums = {}
    from image_classifier.data.idx import write_idx

    for name, arr in arrays.items():
        write_idx_gz(src / f"{name}.gz", arr)
        write_idx(tmp_path / "tmp.idx", arr)
        sums[name] = hashlib.sha256((tmp_path / "tmp.idx").read_bytes()).hexdigest()
    (tmp_path / "tmp.idx").unlink()
    return src, sums


def compose_cfg(root: Path, *overrides: str):
    base = [
        f"paths.root={root}",
        f"paths.output_dir={root}/out",
        "train.epochs=1",
        "train.batch_size=8",
        "train.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]
    if not any(o.startswith("model=") for o in overrides):
        base.append("model=cnn")  # fast and the same whatever the images (model=auto: test_adapt)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


def idx_overrides(src: Path, sums: dict[str, str]) -> list[str]:
    """Fashion-MNIST config pointed at the fixture: system source only, its checksums."""
    return [
        f"data.download.system_dir={src}",
        "data.download.sources=[local,system]",
        "data.val_size=40",
        *[f"data.files.{k}={v}" for k, v in sums.items()],
    ]


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str):
        return compose_cfg(tmp_path, *overrides)

    return make


def run_cli(
    *args: str, cwd: Path = ROOT, timeout: int = 300, script: Path = ROOT / "commands.py"
) -> subprocess.CompletedProcess:
    """`commands.py` in a new process, started by the interpreter of the environment `uv run`
    uses (sys.executable is .venv's python) rather than through `uv run` itself: what uv adds,
    the check of the environment against uv.lock, is the same for every command and is timed in
    scripts/benchmark_infer.py; through uv, tests from a project copy in tmp_path would each make
    a new environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(project root, checkpoint, images folder): one tiny model for the whole session."""
    from image_classifier.training.train import run_train

    root = tmp_path_factory.mktemp("proj")
    images = make_class_folders(root / "images", per_class=8)
    r = run_train(compose_cfg(root, "data=folder", f"data.root={images}", "data.size=[16,16]"))
    return root, Path(r["checkpoint"]), images


@pytest.fixture(scope="session")
def exported(trained):
    from image_classifier.export.onnx import run_export_onnx

    root, ckpt, _ = trained
    r = run_export_onnx(compose_cfg(root, f"export.checkpoint={ckpt}"))
    return Path(r["output"]), r


# In CI a test may skip only for what that machine cannot have; any other skip fails the run.
CI_ALLOWED_SKIPS = ("needs an NVIDIA GPU", "TensorRT is not installable")
_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") != "true":
        return
    unexpected = [(n, r) for n, r in _skips if not any(a in r for a in CI_ALLOWED_SKIPS)]
    if unexpected:
        lines = "\n".join(f"  {n}: {r}" for n, r in unexpected)
        print(f"\nCI: tests skipped for a reason other than {CI_ALLOWED_SKIPS}:\n{lines}")
        session.exitstatus = 1
