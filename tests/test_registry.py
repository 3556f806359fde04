"""The model registry: register -> load by alias -> predict, alias moves, and clear errors."""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from image_classifier import runs
from image_classifier.errors import UserError
from tests.conftest import compose_cfg, make_class_folders, run_cli


@pytest.fixture(scope="module")
def registered(trained, exported):
    from image_classifier.export.registry import run_register

    root = trained[0]
    onnx, _ = exported
    first = run_register(compose_cfg(root, f"register.model={onnx}", "register.name=tiny"))
    return root, onnx, first


def test_register_then_infer_by_alias_matches_the_file(registered, trained):
    from image_classifier.inference.infer import run_infer

    root, onnx, first = registered
    assert first["version"] == "1" and first["uri"] == "models:/tiny@champion"
    images = trained[2]
    by_file = run_infer(compose_cfg(root, f"infer.model={onnx}", f"infer.input={images}"))
    for address in ("models:/tiny@champion", "models:/tiny/1"):
        cfg = compose_cfg(root, f"infer.model={address}", f"infer.input={images}")
        model, registered = runs.model_location(cfg, cfg.infer.model, "infer.model")
        assert registered["version"] == "1"
        assert run_infer(cfg, model, registered)["rows"] == by_file["rows"]
    with pytest.raises(UserError, match="a library caller passes the model file"):
        run_infer(cfg)  # a registry address is resolved by runs, not by inference


def test_version_carries_signature_lineage_and_alias_moves(registered):
    from mlflow.tracking import MlflowClient

    from image_classifier.export.registry import run_register
    from image_classifier.tracking import fetch_registered

    root, onnx, first = registered
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1 = client.get_model_version("tiny", "1")
    meta = json.loads(v1.tags["classes"])
    assert meta == ["cat", "dog", "fox"]
    assert v1.tags["data_hash"] and v1.tags["onnx_sha256"] and v1.tags["source_checkpoint"]
    assert v1.run_id == first["run_id"]  # the run that trained the checkpoint
    import mlflow

    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/tiny/1")
    assert info.signature.inputs.input_names() == ["image"]

    # the same file again (a re-run): no copy, the alias stays on the version it has
    again = run_register(compose_cfg(root, f"register.model={onnx}", "register.name=tiny"))
    assert (
        again["version"] == "1"
        and again["already"]
        and len(client.search_model_versions("name = 'tiny'")) == 1
    )
    import onnx as onnx_lib

    other = onnx_lib.load(str(onnx))
    other.doc_string = "another export"
    onnx_lib.save(other, str(root / "other.onnx"))
    second = run_register(
        compose_cfg(root, f"register.model={root / 'other.onnx'}", "register.name=tiny")
    )
    assert second["version"] == "2" and not second.get("already")
    # the alias left version 1, whose training run is this one's: the same score on both sides
    assert second["before"] == "1" and second["scores"][1] == second["scores"][2]
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "2"
    # roll back: the alias moves to version 1, and loading by alias follows it
    run_register(
        compose_cfg(root, "register.name=tiny", "register.version=1", "register.alias=champion")
    )
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    path, where = fetch_registered(compose_cfg(root), "models:/tiny@champion")
    assert where["version"] == "1" and path.suffix == ".onnx" and path.is_file()


def test_export_onnx_registers_when_asked_under_a_name_for_one_class_list(tmp_path, capfd):
    """Its own project (the session's trained model's run keeps only its own exports)."""
    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.training.train import run_train

    @functools.cache
    def trained(images):
        return run_train(
            compose_cfg(
                tmp_path,
                "data=folder",
                f"data.root={images}",
                "data.size=[16,16]",
                f"paths.output_dir={images}_run",
            )
        )["checkpoint"]

    def exported(images, *extra):
        return run_export_onnx(
            compose_cfg(
                tmp_path,
                f"export.checkpoint={trained(images)}",
                "export.register=true",
                "export.parity_images=0",
                *extra,
            )
        )

    pets = make_class_folders(tmp_path / "pets", per_class=6)
    trained(pets)
    capfd.readouterr()
    r = exported(pets)
    # the export's summary first: MLflow's own lines (copied lock files, pip's version, a type
    # hint advice, a download bar) came before it
    out, err = capfd.readouterr()
    assert out.startswith("Exported ") and "mlflow" not in err.lower(), err
    assert "Successfully registered" not in err and "Registered " in out  # said once, by us
    reg = r["registered"]  # named after the folder, not data=folder's "folder"
    assert reg["name"] == "pets-cnn" and reg["uri"] == "models:/pets-cnn@champion"
    assert reg["model_uri"].startswith("models:/") and reg["run_id"] == r["mlflow_run_id"]
    # another folder of the same name, other classes: it may not take pets-cnn@champion silently
    other = make_class_folders(tmp_path / "b" / "pets", ("cat", "dog", "owl"), per_class=6)
    with pytest.raises(UserError, match="only in this model: owl; only in version 1: fox"):
        exported(other)
    assert exported(other, "register.new_classes=true")["registered"]["version"] == "2"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("models:/nosuch@champion", "No registered model named 'nosuch'"),
        ("models:/tiny@nosuch", "has no alias @nosuch (it has @champion"),
        ("models:/tiny/99", "has no version 99"),
        ("models:/tiny", "is not a registered model address"),
    ],
)
def test_bad_registry_addresses_exit_2_with_the_fix(registered, trained, model, expected):
    root, _, _ = registered
    image = next(trained[2].rglob("*.png"))
    p = run_cli("command=infer", f"infer.model={model}", f"infer.input={image}", cwd=root)
    assert p.returncode == 2, p.stderr
    assert expected in p.stderr and "Traceback" not in p.stderr


def test_registry_needs_tracking(trained):
    root = trained[0]
    p = run_cli("command=register", "logger.enabled=false", cwd=root)
    assert p.returncode == 2 and "tracking is off (logger.enabled=false)" in p.stderr


def test_promote_needs_name_and_alias(trained):
    p = run_cli("command=register", "register.version=1", "register.alias=null", cwd=trained[0])
    assert p.returncode == 2 and "set register.name=NAME and register.alias=ALIAS" in p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_register_and_serve_through_a_tracking_server(trained, exported, tmp_path):
    """A real `mlflow server` on 127.0.0.1: register there, then serve models:/NAME@champion."""
    root, onnx = trained[0], exported[0]
    port = _free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{url}/health", server)
        p = run_cli(
            "command=register",
            f"register.model={onnx}",
            "register.name=remote",
            f"logger.tracking_uri={url}",
            cwd=root,
        )
        assert p.returncode == 0, p.stderr
        assert "'remote' version 1, alias @champion" in p.stdout
        serve_port = _free_port()
        serve = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve().parents[1] / "commands.py"),
                "command=serve",
                "serve.model=models:/remote@champion",
                f"serve.port={serve_port}",
                f"logger.tracking_uri={url}",
            ],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for(f"http://127.0.0.1:{serve_port}/health", serve)
            with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/metadata") as r:
                meta = json.load(r)
            assert meta["model"]["registry"]["name"] == "remote"
            assert meta["model"]["registry"]["version"] == "1"
            assert meta["classes"] == ["cat", "dog", "fox"]
        finally:
            serve.terminate()
            serve.wait(30)
    finally:
        server.terminate()
        server.wait(30)


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds}s")


def test_register_refuses_what_is_not_an_onnx_file(trained):
    root, ckpt, _ = trained
    p = run_cli("command=register", f"register.model={ckpt}", "register.alias=prod", cwd=root)
    assert p.returncode == 2 and "must be an existing .onnx file" in p.stderr, p.stderr
    fix = (  # the one command that does both, with the alias asked for
        "export and register it in one step: uv run python commands.py command=export-onnx "
        f"export.checkpoint={ckpt} export.register=true register.alias=prod."
    )
    assert fix in " ".join(p.stderr.split()), p.stderr  # the message is folded to the terminal


def test_a_class_list_cut_short_in_its_tag_is_not_compared(tmp_path):
    """Version tags keep a class list of over 4,000 characters cut short (not JSON): register
    then cannot compare and goes on, where it failed with a JSON traceback."""
    import json

    from mlflow.tracking import MlflowClient

    from image_classifier.export.registry import check_same_classes, version_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    many = [f"class_{i:04d}" for i in range(400)]
    client.create_registered_model("big")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    tags = version_tags({"classes": many}, onnx, compose_cfg(tmp_path))
    with pytest.raises(ValueError):
        json.loads(tags["classes"])  # cut short
    client.create_model_version("big", str(tmp_path), tags={"classes": tags["classes"]})
    check_same_classes(client, "big", ["a", "b"])  # nothing to compare: no error
    client.create_model_version("big", str(tmp_path), tags={"classes": json.dumps(["a", "b"])})
    with pytest.raises(UserError, match="version 2 predicts other classes .* only in this model"):
        check_same_classes(client, "big", ["a", "c"])


def test_an_alias_moved_to_a_lower_score_on_the_same_split_is_warned_of(tmp_path, caplog):
    """Two training runs' best validation scores are compared only when they scored the same
    split (data hash, split seed) on the same metric; a move to one below the other's 95 %
    interval is warned of, with the command that moves the alias back."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from image_classifier.export.registry import alias_lines, compared_scores, warn_if_lower

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")

    def version(score: float, **changed) -> SimpleNamespace:
        run = client.create_run(experiment).info.run_id
        same = {"data/hash": "abc", "config/data/seed": "42", "optim/monitor": "val/acc"}
        for k, v in (same | changed).items():
            client.log_param(run, k, v)
        client.log_metric(run, "best_score", score)
        client.log_metric(run, "val_images", 100)
        return SimpleNamespace(run_id=run)

    good = version(0.9)
    assert compared_scores(client, good, version(0.6)) == ("val/acc", 0.9, 0.6, 100)
    for other in ({"config/data/seed": "1"}, {"data/hash": "def"}, {"optim/monitor": "val/f1"}):
        assert compared_scores(client, good, version(0.6, **other)) is None, other
    assert compared_scores(client, good, SimpleNamespace(run_id=None)) is None  # not in the store

    result = {"name": "m", "alias": "champion", "version": "2", "before": "1"}
    lower = result | {"scores": ("val/acc", 0.9, 0.6, 100)}
    near = result | {"scores": ("val/acc", 0.9, 0.85, 100)}  # 0.9 on 100: 0.826-0.945
    assert "register.name=m register.version=1 register.alias=champion" in alias_lines(lower)[0]
    assert alias_lines(lower)[1].endswith("100 images): version 1 0.9000, version 2 0.6000")
    assert alias_lines(near)[1].endswith("version 2 0.8500 (inside the 95 % interval)")
    assert len(alias_lines(result)) == 1  # not comparable: the way back, no scores
    caplog.clear()
    with caplog.at_level("WARNING", logger="image_classifier.export.registry"):
        warn_if_lower(result)
        warn_if_lower(result | {"scores": ("val/acc", 0.6, 0.9, 100)})  # higher
        warn_if_lower(near)  # lower, but not clearly
        assert not caplog.records
        warn_if_lower(lower)
    assert "scored lower on the same validation split than version 1" in caplog.text
    assert "register.version=1 register.alias=champion" in caplog.text
