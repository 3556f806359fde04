"""DVC: an S3-compatible remote (moto's server on 127.0.0.1), and download pulling from it first."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_cfg, idx_overrides

from image_classifier.data.sources import run_download

DVC = str(Path(sys.executable).parent / "dvc")

pytestmark = pytest.mark.slow  # DVC and S3 servers in subprocesses


def dvc(*args, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    p = subprocess.run([DVC, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"dvc {' '.join(args)}: {p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="datasets")
    yield url
    server.stop()


def s3_project(root: Path, url: str, endpoint: str) -> Path:
    """What the docs tell a team to run: the endpoint in .dvc/config, keys only in config.local."""
    root.mkdir()
    dvc("init", "--no-scm", cwd=root)
    dvc("remote", "add", "-d", "storage", url, cwd=root)
    dvc("remote", "modify", "storage", "endpointurl", endpoint, cwd=root)
    dvc("remote", "modify", "--local", "storage", "access_key_id", "testing", cwd=root)
    dvc("remote", "modify", "--local", "storage", "secret_access_key", "testing", cwd=root)
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_s3_remote_push_delete_pull_is_bit_exact_and_download_pulls_first(
    s3_endpoint, idx_source, tmp_path
):
    import boto3

    src, sums = idx_source
    root = s3_project(tmp_path / "project", "s3://datasets/fashion-mnist", s3_endpoint)
    assert "testing" not in (root / ".dvc" / "config").read_text()
    assert "access_key_id" in (root / ".dvc" / "config.local").read_text()
    assert "/config.local" in (ROOT / ".dvc" / ".gitignore").read_text()  # never committed here

    overrides = idx_overrides(src, sums)
    first = run_download(compose_cfg(root, *overrides))
    assert first["source"] == "system" and (root / "data.dvc").exists()
    original = files_of(root / "data")
    assert len(original) == 4

    dvc("push", cwd=root)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    stored = s3.list_objects_v2(Bucket="datasets", Prefix="fashion-mnist/")
    assert stored.get("KeyCount", 0) >= 5  # four files and the directory listing

    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    dvc("pull", cwd=root)
    assert files_of(root / "data") == original

    # `download` with nothing local: the DVC remote comes before the system files
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    again = run_download(compose_cfg(root, *overrides, "data.download.sources=[local,dvc,system]"))
    assert again["source"] == "dvc"
    assert files_of(root / "data") == original


def test_pull_with_wrong_credentials_fails_and_download_falls_back(
    s3_endpoint, idx_source, tmp_path
):
    src, sums = idx_source
    root = s3_project(tmp_path / "project", "s3://no-such-bucket/x", s3_endpoint)
    run_download(compose_cfg(root, *idx_overrides(src, sums)))
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    r = run_download(
        compose_cfg(root, *idx_overrides(src, sums), "data.download.sources=[local,dvc,system]")
    )
    assert r["source"] == "system"


def test_pipeline_declares_the_stages_their_params_and_outputs():
    import yaml

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert list(stages) == ["download", "train", "test", "export-onnx"]
    for name, stage in stages.items():
        assert f"command={name}" in stage["cmd"]
        for entry in stage.get("params", []):
            for file in entry if isinstance(entry, dict) else [entry]:
                assert (ROOT / file).exists(), f"{name}: params file {file} is missing"

    def path(entry):
        return next(iter(entry)) if isinstance(entry, dict) else entry

    # each stage consumes what the one before produced
    assert path(stages["download"]["outs"][0]) in stages["train"]["deps"]
    ckpt = stages["train"]["outs"][0]
    assert ckpt in stages["test"]["deps"] and ckpt in stages["export-onnx"]["deps"]
    assert any("report" in str(m) for m in stages["test"]["metrics"])


def _set(path: Path, **values) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    for k, v in values.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    path.write_text(OmegaConf.to_yaml(cfg))


def test_dvc_repro_runs_the_pipeline_then_only_what_changed(idx_source, tmp_path):
    """The real dvc.yaml on a project copy with tiny data: repro, repro again, edit a param."""
    src, sums = idx_source
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("commands.py", "dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, proj / name)
    for name in ("configs", "image_classifier"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    _set(
        proj / "configs/data/fashion_mnist.yaml",
        val_size=40,
        **{"download.system_dir": str(src), "download.sources": ["local", "system"]},
        **{f"files.{k}": v for k, v in sums.items()},
    )
    _set(proj / "configs/train/default.yaml", epochs=1, batch_size=16, num_workers=0)
    _set(proj / "configs/trainer/default.yaml", accelerator="cpu", enable_progress_bar=False)
    _set(proj / "configs/export/default.yaml", parity_images=8)
    dvc("init", "--no-scm", cwd=proj)
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    def repro() -> str:
        env = {**os.environ, "PATH": env_path}
        p = subprocess.run(
            [DVC, "repro"], cwd=proj, capture_output=True, text=True, env=env, timeout=900
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    first = repro()
    for stage in ("download", "train", "test", "export-onnx"):
        assert f"Running stage '{stage}'" in first
    assert (proj / "pipeline/model.onnx").exists()
    assert "accuracy" in (proj / "pipeline/test/test_report.json").read_text()
    assert (
        "c59f" not in (proj / "pipeline/data.json").read_text()
    )  # the fixture's checksums, not the real ones
    lock = (proj / "dvc.lock").read_text()
    assert "epochs: 1" in lock and "pipeline/train/checkpoints/best.ckpt" in lock

    assert "Running stage" not in repro()  # nothing changed, nothing runs

    _set(proj / "configs/export/default.yaml", opset=18)
    third = repro()
    assert "Running stage 'export-onnx'" in third
    assert "Running stage 'train'" not in third and "Running stage 'test'" not in third
