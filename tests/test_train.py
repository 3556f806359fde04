import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_cfg, idx_overrides, make_class_folders

from image_classifier.data.idx import read_idx
from image_classifier.errors import UserError
from image_classifier.lineage import describe_machine, machine_info, parse_cpuinfo
from image_classifier.models.checkpoint import load_module
from image_classifier.runs import newest_best
from image_classifier.training.evaluate import run_test
from image_classifier.training.train import run_train

FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _mlflow_runs(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("image_classifier")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_end_to_end_download_train_test_reload(make_cfg, idx_source, tmp_path):
    src, sums = idx_source
    cfg = make_cfg(*idx_overrides(src, sums), "train.epochs=2")
    r = run_train(cfg)  # the data is absent: train downloads it first
    assert r["data_source"] == "system"
    ckpt = Path(r["checkpoint"])
    assert ckpt.name == "best.ckpt" and ckpt.exists() and Path(r["last_checkpoint"]).exists()
    assert newest_best(tmp_path, ["out"], "test.checkpoint") == ckpt

    # test finds the checkpoint and the data with no help beyond the project root
    t = run_test(
        make_cfg(
            *idx_overrides(src, sums), f"paths.output_dir={tmp_path}/test_out", "paths.search=[out]"
        )
    )
    report = json.loads(Path(t["report"]).read_text())
    assert report["classes"] == FMNIST_CLASSES
    assert sum(map(sum, report["confusion_matrix"])) == 60
    assert set(report["per_class"]["Bag"]) == {"precision", "recall", "support", "mistaken_for"}
    for i, c in enumerate(FMNIST_CLASSES):  # where most of each class's misses went
        row, wrong = report["confusion_matrix"][i], report["per_class"][c]["mistaken_for"]
        most = max(n for j, n in enumerate(row) if j != i)
        assert (wrong is None) if not most else (wrong["images"] == most)
        assert wrong is None or row[FMNIST_CLASSES.index(wrong["class"])] == most
    assert 0.0 <= report["f1_macro"] <= 1.0 + 1e-6  # float32 rounding at a perfect score
    for name in ("confusion_matrix.png", "curves.png", "test_report.json"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
        assert any(Path(p).name == name for p in t["plots"]) or name == "test_report.json"

    # the checkpoint carries its per-epoch history, train and val side by side, for the curves
    history = next(
        v
        for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items()
        if k.startswith("History")
    )
    assert [row["epoch"] for row in history["epochs"]] == [0, 1]
    assert all(
        {"train/acc", "train/loss_epoch", "val/acc", "val/loss"} <= set(row)
        for row in history["epochs"]
    )

    # the checkpoint alone rebuilds the model: classes, preprocessing, weights
    module = load_module(ckpt).eval()
    assert module.classes == FMNIST_CLASSES
    assert (
        module.hparams.preprocessing["size"] == [28, 28]
        and module.hparams.preprocessing["channels"] == 1
    )
    x = read_idx(tmp_path / "data" / "fashion_mnist" / "t10k-images-idx3-ubyte")
    y = read_idx(tmp_path / "data" / "fashion_mnist" / "t10k-labels-idx1-ubyte")
    with torch.no_grad():
        pred = module(torch.from_numpy(x[:, None].copy())).argmax(1).numpy()
    assert np.isclose((pred == y).mean(), report["accuracy"])
    from image_classifier.models.metrics import wilson_interval

    # its interval counts the 60 images tested
    assert report["accuracy_interval"] == pytest.approx(wilson_interval(report["accuracy"], 60))

    # MLflow: one train run and one test run, with config, metrics per epoch, artifacts, lineage
    client, runs = _mlflow_runs(tmp_path)
    train_run, test_run = runs
    assert train_run.data.params["config/train/lr"] == "0.003"
    assert len(client.get_metric_history(train_run.info.run_id, "val/acc")) == 2
    # what a sweep ranks trials by: the best score, then its epoch's val/loss
    best_epoch = max(history["epochs"], key=lambda row: (row["val/acc"], -row["val/loss"]))
    assert train_run.data.metrics["best_score"] == pytest.approx(best_epoch["val/acc"])
    assert train_run.data.metrics["best_val_loss"] == pytest.approx(best_epoch["val/loss"])
    assert {"git_commit", "data_hash", "version.torch"} <= set(train_run.data.tags)
    # ... and the machine it ran on, which every timing depends on
    assert train_run.data.tags["machine.cpu_cores"] == str(len(os.sched_getaffinity(0)))
    assert train_run.data.tags["machine.gpu"] == (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    )
    assert r["machine"] == describe_machine(machine_info())
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"best.ckpt", "curves.png", "train_summary.json"} <= artifacts
    # the run folder keeps the summary too, with the MLflow run it went to
    kept = json.loads(Path(r["summary"]).read_text())
    assert Path(r["summary"]).parent == Path(r["output_dir"])
    assert kept["mlflow_run_id"] == train_run.info.run_id and kept["checkpoint"] == r["checkpoint"]
    assert test_run.data.metrics["test/acc"] == pytest.approx(report["accuracy"])
    assert test_run.data.tags["train_run_id"] == train_run.info.run_id
    assert "test_report.json" in {a.path for a in client.list_artifacts(test_run.info.run_id)}


@pytest.mark.slow
def test_folder_data_colour_and_baseline(make_cfg, tmp_path):
    root = make_class_folders(
        tmp_path / "rgb", classes=("a", "b", "c"), per_class=12, size=20, mode="RGB"
    )
    for i in range(8):  # make "a" the most frequent class
        (root / "a" / f"extra{i}.png").write_bytes((root / "a" / "000.png").read_bytes())
    common = ["data=folder", f"data.root={root}", "data.size=[16,16]", "logger.enabled=false"]
    r = run_train(make_cfg(*common))
    module = load_module(r["checkpoint"])
    assert module.hparams.preprocessing["channels"] == 3  # detected from the colour images
    assert module.classes == ["a", "b", "c"]

    with warnings.catch_warnings(record=True) as seen:  # Lightning's "returned None" notes
        warnings.simplefilter("always")
        b = run_train(make_cfg(*common, "model=baseline", f"paths.output_dir={tmp_path}/base"))
    assert not [w for w in seen if "returned `None`" in str(w.message)]
    # no data overrides: test reads the data config stored in the checkpoint (not Fashion-MNIST)
    t = run_test(
        make_cfg(
            "logger.enabled=false",
            f"test.checkpoint={b['checkpoint']}",
            f"paths.output_dir={tmp_path}/bt",
        )
    )
    report = json.loads(Path(t["report"]).read_text())
    assert report["per_class"]["a"]["recall"] == 1.0 and report["per_class"]["b"]["recall"] == 0.0
    assert b["at_chance"] is None and report["at_chance"] is None  # it is that rule: no warning


def test_progress_into_a_file_is_a_line_per_epoch_with_an_eta(make_cfg, folder_data, capsys):
    """stdout not a terminal (here pytest's capture; nohup, Slurm and CI logs): no bar redrawn
    with carriage returns, but the epoch count, this epoch's metrics and the time left."""
    run_train(
        make_cfg(
            "data=folder",
            f"data.root={folder_data}",
            "data.size=[16,16]",
            "logger.enabled=false",
            "train.epochs=3",
            "trainer.enable_progress_bar=true",
        )
    )
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/3", "3/3"]  # the first and the last
    assert all(re.search(r"train/loss \d\.\d{4}  val/loss \d\.\d{4}  val/acc", ln) for ln in lines)
    assert "s/epoch, about" in lines[0] and lines[-1].endswith(" s/epoch)") and "\r" not in out


@pytest.mark.slow
def test_timm_architecture_by_name(make_cfg, folder_data):
    r = run_train(
        make_cfg(
            "data=folder",
            f"data.root={folder_data}",
            "model=timm",
            "model.name=resnet18",
            "logger.enabled=false",
            "data.size=[32,32]",
        )
    )
    module = load_module(r["checkpoint"])
    assert type(module.net.net).__name__ == "ResNet"
    assert module.net.net.conv1.in_channels == 1 and module.net.net.fc.out_features == 3


def test_unknown_timm_model_suggests_close_names():
    from image_classifier.models.factory import create_model

    with pytest.raises(UserError, match=r"Unknown model 'resnt18'. Did you mean 'resnet18'"):
        create_model("resnt18", num_classes=3, in_chans=1)


@pytest.mark.slow
def test_checkpoint_whose_classes_do_not_match_the_data(make_cfg, folder_data, tmp_path):
    r = run_train(make_cfg("data=folder", f"data.root={folder_data}", "logger.enabled=false"))
    other = make_class_folders(tmp_path / "other", classes=("cat", "dog", "wolf"), per_class=6)
    cfg = make_cfg(
        "data=folder",
        f"data.root={other}",
        f"test.checkpoint={r['checkpoint']}",
        "logger.enabled=false",
    )
    with pytest.raises(
        UserError,
        match=r"classes do not match.*only in the data: wolf; only in the model: fox\. The model "
        r"cannot predict wolf: move those images out of the data",
    ):
        run_test(cfg, use_checkpoint_data=False)
    # data.classes naming some of the model's classes, in another order: those are tested, each
    # label renumbered as the model's (it was refused: "If data.classes chose them, drop it")
    some = ("data=folder", f"data.root={other}", "data.classes=[fox,cat]", "data.split=[0,0,1]")
    other_fox = make_class_folders(other, classes=("cat", "dog", "fox"), per_class=6, seed=1)
    assert other_fox == other and len(list((other / "fox").iterdir())) == 6
    t = run_test(make_cfg(*some, f"test.checkpoint={r['checkpoint']}"), use_checkpoint_data=False)
    report = json.loads(Path(t["report"]).read_text())
    assert report["classes"] == ["cat", "dog", "fox"]
    supports = {c: report["per_class"][c]["support"] for c in report["classes"]}
    assert supports == {"cat": 6, "dog": 0, "fox": 6}, supports
    rows = list(csv.DictReader(Path(t["predictions"]).read_text().splitlines()))
    assert {(Path(x["image"]).parent.name, x["true"]) for x in rows} == {
        ("cat", "cat"),
        ("fox", "fox"),
    }
    # every class the model knows and one more: still refused, not tested with wolf left out;
    # the message names the data.classes that leaves wolf out, and that is tested
    more = make_class_folders(tmp_path / "more", classes=("cat", "dog", "fox", "wolf"))
    with pytest.raises(
        UserError,
        match=r"only in the data: wolf\. The model cannot predict wolf: leave them out with "
        r"'data.classes=\[cat,dog,fox\]', move",
    ):
        run_test(
            make_cfg("data=folder", f"data.root={more}", f"test.checkpoint={r['checkpoint']}"),
            use_checkpoint_data=False,
        )
    chosen = make_cfg(
        "data=folder",
        f"data.root={more}",
        "data.classes=[cat,dog,fox]",
        f"test.checkpoint={r['checkpoint']}",
    )
    report = json.loads(Path(run_test(chosen, use_checkpoint_data=False)["report"]).read_text())
    assert report["classes"] == ["cat", "dog", "fox"] and report["data"]["test_images"] > 0


@pytest.mark.slow
def test_data_classes_trains_and_tests_on_the_classes_it_lists(make_cfg, folder_data, capsys):
    """data.classes=[cat,dog] on a folder of cat, dog and fox stopped with "Class 'fox' is not
    one of data.classes": now fox is left out, and both summaries say so."""
    listed = ("data=folder", f"data.root={folder_data}", "data.classes=[dog,cat]")
    r = run_train(make_cfg(*listed, "logger.enabled=false", "train.epochs=1"))
    assert load_module(r["checkpoint"]).classes == ["dog", "cat"]
    out = capsys.readouterr().out
    assert "left out:   10 images of 1 class(es) not in data.classes: fox (10)" in out
    # one line says what trains, in place of Lightning's table of layers (FLOPs 0 on a CPU)
    assert re.search(
        r"Training cnn from random weights \(0\.\d\d M parameters\) on images: 16 train and 2 v",
        out,
    )
    assert "FLOPs" not in out
    t = run_test(make_cfg("logger.enabled=false", f"test.checkpoint={r['checkpoint']}"))
    assert "left out:   10 images of 1 class(es) not in data.classes: fox (10)" in (
        capsys.readouterr().out
    )
    assert json.loads(Path(t["report"]).read_text())["classes"] == ["dog", "cat"]


def test_test_without_any_checkpoint(make_cfg):
    with pytest.raises(UserError, match="No trained checkpoint found.*test.checkpoint=PATH"):
        run_test(make_cfg("logger.enabled=false"))


def test_a_run_without_validation_is_named_with_its_last_checkpoint(tmp_path, capsys):
    """Validation never ran (trainer.limit_val_batches=0): no best.ckpt, only last.ckpt. `test`
    said "No trained checkpoint found" after `train` said "next: command=test"; now the
    summary's next line names last.ckpt, and so does the error."""
    images = make_class_folders(tmp_path / "img", per_class=4, size=12)
    cfg = compose_cfg(
        tmp_path,
        "data=folder",
        f"data.root={images}",
        "logger.enabled=false",
        "trainer.limit_val_batches=0",
        "paths.output_dir=null",
    )
    r = run_train(cfg)
    last = r["checkpoint"]
    assert Path(last).name == "last.ckpt" and f"command=test test.checkpoint={last}" in (
        capsys.readouterr().out
    )
    with pytest.raises(UserError, match=r"No best checkpoint .*kept only its last epoch") as e:
        run_test(compose_cfg(tmp_path, "logger.enabled=false", "paths.output_dir=null"))
    assert f"test.checkpoint={last}" in str(e.value)


def test_the_next_test_line_names_a_checkpoint_the_search_would_not_find(tmp_path):
    """After `train ... hydra.run.dir=/tmp/x`, "next: command=test" failed with "No trained
    checkpoint found under outputs/, multirun/": the line now names a checkpoint outside them."""
    from image_classifier.runs import next_test

    cfg = compose_cfg(tmp_path)
    inside = Path(cfg.paths.root) / "outputs" / "2026-12-03" / "10-00-00" / "checkpoints"
    assert next_test(cfg, inside / "best.ckpt").endswith("command=test")
    assert next_test(cfg, Path(cfg.paths.root) / "multirun/x/0/checkpoints/best-v1.ckpt").endswith(
        "command=test"
    )
    elsewhere = tmp_path / "mine" / "checkpoints" / "best.ckpt"
    assert next_test(cfg, elsewhere).endswith(f"command=test test.checkpoint={elsewhere}")
    assert next_test(cfg, inside / "last.ckpt").endswith(f"test.checkpoint={inside / 'last.ckpt'}")


def test_an_exported_model_given_as_the_checkpoint_names_the_one_beside_it(tmp_path):
    """test.checkpoint=best.onnx ended in torch.load's pickle error about weights_only."""
    from image_classifier import runs

    (tmp_path / "best.onnx").write_bytes(b"onnx")
    (tmp_path / "best.ckpt").write_bytes(b"ckpt")
    (tmp_path / "m.engine").write_bytes(b"engine")
    cfg = compose_cfg(tmp_path)
    with pytest.raises(UserError, match=f"the one beside it is {tmp_path / 'best.ckpt'}.*infer"):
        runs.checkpoint(cfg, str(tmp_path / "best.onnx"), "test.checkpoint")
    with pytest.raises(UserError, match=r"export.checkpoint=.*m.engine' is an exported model"):
        runs.checkpoint(cfg, str(tmp_path / "m.engine"), "export.checkpoint")


def test_checkpoint_that_is_not_one(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_module(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_module(tmp_path / "missing.ckpt")


def test_unreachable_tracking_server_fails_fast(make_cfg, folder_data):
    with socket.socket() as s:  # a free port on loopback with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_cfg(
        "data=folder",
        f"data.root={folder_data}",
        f"logger.tracking_uri=http://127.0.0.1:{port}",
        "logger.connect_timeout=2",
    )
    with pytest.raises(
        UserError, match=rf"MLflow tracking server at http://127.0.0.1:{port} is unreachable"
    ):
        run_train(cfg)


@pytest.mark.slow
def test_test_warns_when_the_data_changed_since_training(make_cfg, folder_data, tmp_path, capsys):
    r = run_train(make_cfg("data=folder", f"data.root={folder_data}", "logger.enabled=false"))
    from PIL import Image, ImageOps

    changed = folder_data / "cat" / "000.png"  # its content changed, not a copy of another file
    ImageOps.invert(Image.open(changed).convert("L")).save(changed)
    t = run_test(
        make_cfg(
            "logger.enabled=false",
            f"test.checkpoint={r['checkpoint']}",
            f"paths.output_dir={tmp_path}/t",
        )
    )
    report = json.loads(Path(t["report"]).read_text())
    assert "differs from the data this model was trained on" in report["data"]["warning"]
    assert "Only its test split was tested (3 of 30 images" in report["data"]["warning"]
    assert "data.split=[0,0,1] tests every one" in report["data"]["warning"]
    assert "WARNING: the test data" in capsys.readouterr().out


def test_new_data_the_command_line_names_is_a_note_not_a_warning(trained, tmp_path, caplog):
    """What infer suggests for a labelled folder (command=test ... data.root=NEW
    data.split=[0,0,1]) is what the user asked for: an INFO line, unless part of it was seen in
    training or only part of it is tested."""
    caplog.set_level("INFO", logger="image_classifier.data.identity")
    root, ckpt, images = trained
    new = make_class_folders(tmp_path / "new", per_class=4, size=16, seed=5)
    shutil.copy(images / "cat" / "000.png", new / "cat" / "seen.png")
    given = ["logger.enabled=false", f"test.checkpoint={ckpt}", "data=folder"]
    cases = [  # (split, images the model trained on, a warning expected)
        ("[0,0,1]", False, False),
        ("[0,0,1]", True, True),
        ("[0.5,0.25,0.25]", False, True),
    ]
    for split, with_seen, warned in cases:
        if not with_seen:
            (new / "cat" / "seen.png").unlink(missing_ok=True)
        else:
            shutil.copy(images / "cat" / "000.png", new / "cat" / "seen.png")
        caplog.clear()
        out = tmp_path / f"t{split}{with_seen}"
        cfg = compose_cfg(root, *given, f"data.root={new}", f"data.split={split}")
        cfg.paths.output_dir = str(out)
        report = json.loads(Path(run_test(cfg, use_checkpoint_data=False)["report"]).read_text())
        assert bool(report["data"]["warning"]) is warned, (split, with_seen, report["data"])
        noted = "Testing on the data the command line names" in caplog.text
        assert noted is not warned
        if noted:
            assert "none of its 12 images is one the model trained on" in caplog.text


@pytest.mark.slow
def test_ctrl_c_in_test_exits_130_with_a_word(trained, tmp_path, monkeypatch):
    """Lightning's sys.exit(1) on Ctrl-C inside trainer.test left exit code 1 and no word."""
    import signal

    import lightning as L

    from image_classifier.errors import Interrupted
    from image_classifier.training import evaluate

    class CtrlC(L.Callback):
        def on_test_start(self, trainer, module):
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "progress_bar", lambda cfg: [CtrlC()])
    root, ckpt, _ = trained
    cfg = compose_cfg(root, f"test.checkpoint={ckpt}", f"paths.output_dir={tmp_path / 't'}")
    with pytest.raises(Interrupted, match="test interrupted before its report was written"):
        run_test(cfg)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (tmp_path / "t" / "test_report.json").exists()


def test_test_writes_predictions_mistakes_and_calibration(trained, tmp_path):
    """predictions.csv has one row per test image with the model's own probabilities; ECE is
    torchmetrics' and matches a by-hand computation from that file; the plots are written."""
    import csv

    from mlflow.tracking import MlflowClient

    root, ckpt, _ = trained
    out = tmp_path / "t"
    r = run_test(compose_cfg(root, f"test.checkpoint={ckpt}", f"paths.output_dir={out}"))
    rows = list(csv.DictReader(Path(r["predictions"]).read_text(encoding="utf-8").splitlines()))
    report = json.loads(Path(r["report"]).read_text())
    assert len(rows) == report["data"]["test_images"]
    assert set(rows[0]) == {"image", "true", "predicted", "confidence", "correct", "top3"}
    assert Path(rows[0]["image"]).is_file()  # folder data: the file itself
    correct = [int(x["correct"]) for x in rows]
    assert abs(sum(correct) / len(rows) - report["accuracy"]) < 1e-6
    assert all(x["top3"].split("; ")[0].startswith(x["predicted"] + ":") for x in rows)
    conf = np.array([float(x["confidence"]) for x in rows])
    edges = np.linspace(0, 1, 16)
    which = np.clip(np.digitize(conf, edges, right=True) - 1, 0, 14)
    by_hand = sum(
        abs(conf[which == b].mean() - np.mean(np.array(correct)[which == b])) * (which == b).sum()
        for b in range(15)
        if (which == b).any()
    ) / len(rows)
    assert abs(by_hand - report["ece"]) < 1e-3, (by_hand, report["ece"])
    assert (out / "plots" / "reliability.png").stat().st_size > 1000
    assert (out / "plots" / "mistakes.png").exists() == (sum(correct) < len(rows))
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(r["mlflow_run_id"])
    assert abs(run.data.metrics["test/ece"] - report["ece"]) < 1e-9
    assert "predictions.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_temperature_is_fitted_stored_and_used_by_every_backend(trained, exported, tmp_path):
    """train fits T on val and stores it; the checkpoint, ONNX and test all use it. The fitted T
    of a tiny model can sit near 1, so the backends are checked on a copy given T = 2.5."""
    import shutil

    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.inference.predictor import load_predictor
    from image_classifier.models import checkpoint as ckpt_file

    root, ckpt, images = trained
    t = float(ckpt_file.load_module(ckpt).temperature)
    assert t != 1.0 and 0.05 <= t <= 20
    onnx, _ = exported
    assert abs(load_predictor(onnx).meta.extra["temperature"] - t) < 1e-6
    copy = tmp_path / "t.ckpt"
    shutil.copyfile(ckpt, copy)
    ckpt_file.store_buffers(copy, ckpt_file.read(copy), temperature=2.5)
    out = run_export_onnx(
        compose_cfg(
            root,
            f"export.checkpoint={copy}",
            f"export.output={tmp_path}/t.onnx",
            "logger.enabled=false",
        )
    )
    module = ckpt_file.load_module(copy).eval()
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        raw = torch.softmax(module.net(torch.from_numpy(x)), 1).numpy()
        calibrated = torch.softmax(module.net(torch.from_numpy(x)) / 2.5, 1).numpy()
    for backend in (load_predictor(Path(out["output"])), load_predictor(copy)):
        assert np.abs(backend.predict(x) - calibrated).max() < 1e-4
    assert np.abs(raw - calibrated).max() > 1e-3  # the temperature changed something
    r = run_test(compose_cfg(root, f"test.checkpoint={ckpt}", f"paths.output_dir={tmp_path}/t"))
    report = json.loads(Path(r["report"]).read_text())
    assert report["temperature"] == pytest.approx(t)
    assert 0 <= report["ece"] <= 1 and 0 <= report["ece_uncalibrated"] <= 1


def test_temperature_scaling_lowers_validation_ece():
    from image_classifier.training.calibrate import ece, fit_temperature

    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(4000, 5, generator=g)
    # labels drawn from softmax(logits): these logits are calibrated as they are
    targets = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    overconfident = logits * 4  # a model far too sure of itself
    t = fit_temperature(overconfident, targets)
    assert 3.0 < t < 5.5  # recovers about the 4 that was applied
    assert ece(overconfident, targets, t) < ece(overconfident, targets) / 3


def test_the_temperature_prior_holds_a_small_split_near_1_and_lets_a_large_one_speak():
    """The fit minimises the mean log-loss + PRIOR / (2 n) * log(T)^2: checked against that
    objective minimised by brute force, and for what it does: a split the model gets all right
    (where the plain log-loss only falls as T falls) stops short of T's floor. (On 4,000 images
    the prior leaves the fit its temperature: the test above recovers the 4 applied.)"""
    from image_classifier.training.calibrate import PRIOR, T_RANGE, calibrate, fit_temperature

    class Module(torch.nn.Module):
        def _step(self, batch):
            return batch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 4, generator=g)
    targets = torch.multinomial(torch.softmax(3 * logits, 1), 1, generator=g).squeeze(1)
    grid = torch.linspace(-3, 3, 6001)
    objective = [
        float(torch.nn.functional.cross_entropy(logits / t.exp(), targets))
        + PRIOR / (2 * 30) * float(t) ** 2
        for t in grid
    ]
    best = float(grid[int(np.argmin(objective))].exp())
    assert fit_temperature(logits, targets) == pytest.approx(best, rel=2e-3)
    plain = fit_temperature(logits, targets, prior=0.0)
    assert plain < fit_temperature(logits, targets) < 1.0  # pulled from the plain fit toward 1

    targets = torch.arange(13) % 4
    logits = torch.randn(13, 4, generator=g)
    logits[torch.arange(13), targets] += 3  # every argmax right, the answers unsure
    r = calibrate(Module(), [(logits, targets)])
    assert T_RANGE[0] * 2 < r["temperature"] < 1.0  # sharper, not at the floor
    assert r["nll_after"] < r["nll_before"]
    assert r["note"] == "fitted on 13 val images"
    # the confidence floors on validation, at the fitted temperature
    sure, said = torch.softmax(logits / r["temperature"], 1).max(1)
    kept = sure >= 0.5
    assert r["by_confidence"][0] == {
        "min_confidence": 0.5,
        "answered": pytest.approx(float(kept.float().mean())),
        "accuracy": pytest.approx(float((said == targets)[kept].float().mean())),
    }
    wrong = torch.zeros(1000, 4)
    wrong[torch.arange(1000), (torch.arange(1000) + 1) % 4] = 10  # sure and wrong: T runs up
    r = calibrate(Module(), [(wrong, torch.arange(1000) % 4)])
    assert r["temperature"] == 20.0 and r["note"].endswith("ceiling 20: the answers say little")


def test_top5_accuracy_is_measured_for_more_than_5_classes_only():
    """Top-5 accuracy against a hand count on a fixed batch: the true class among the five
    highest logits. 5 classes or fewer: no top-5 (it would be 1 by construction)."""
    from image_classifier.models.metrics import metric_set
    from image_classifier.training.evaluate import _metric_lines

    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0, 1]])
    targets = torch.tensor([4, 0, 6])  # 5th highest (in), lowest (out), highest (in)
    metrics = metric_set(7, multi_label=False)["test_metrics"]
    metrics.update(logits, targets)
    assert float(metrics.compute()["test/acc_top5"]) == pytest.approx(2 / 3)
    assert "test/acc_top5" not in metric_set(5, multi_label=False)["test_metrics"]
    report = {"accuracy": 1 / 3, "accuracy_top5": 2 / 3, "f1_macro": 0.2, "ece": 0.1}
    report |= {"temperature": 1.0, "ece_uncalibrated": 0.1, "per_class": {}}
    report |= {"accuracy_interval": [0.0615, 0.7923], "data": {"test_images": 3}}
    assert _metric_lines(report)[0].startswith(
        "  accuracy 0.3333 (95 % interval 0.0615-0.7923 on 3 images; top-5 0.6667)   macro F1"
    )


def test_test_accuracy_comes_with_its_wilson_interval():
    """The interval against hand computations: all 30 of 30 right gives 30 / (30 + 1.96^2) as its
    lower end (the normal approximation's would be 1 to 1), 6 of 8 gives 0.409-0.929, and the
    interval narrows with the number of images."""
    from image_classifier.models.metrics import interval_text, wilson_interval

    assert wilson_interval(1.0, 30) == pytest.approx((30 / (30 + 1.96**2), 1.0))
    assert wilson_interval(0.75, 8) == pytest.approx((0.4093, 0.9285), abs=1e-4)
    low, high = wilson_interval(0.75, 8000)
    assert 0.74 < low < 0.75 < high < 0.76
    assert wilson_interval(0.0, 0) == (0.0, 1.0)
    assert interval_text((0.4093, 0.9285), 1200) == "95 % interval 0.4093-0.9285 on 1,200 images"


def test_the_best_validation_accuracy_is_printed_with_its_interval():
    from image_classifier.training.summary import best_line

    r = {"best_score": 0.5, "monitor": "val/acc"}
    assert best_line(r, 12) == "  best val/acc = 0.5000 (95 % interval 0.2538-0.7462 on 12 images)"
    assert best_line(r | {"monitor": "val/f1_macro"}, 12) == "  best val/f1_macro = 0.5000"
    assert best_line(r | {"best_score": None}, 12) == ""


def test_a_class_without_test_images_has_no_recall_rather_than_zero():
    """A pre-split folder whose test split lacks a class reported it at recall 0.000, the
    "lowest recall" of the run. Undefined precision and recall are now null and named apart."""
    from types import SimpleNamespace

    from image_classifier.models.metrics import metric_set
    from image_classifier.training.evaluate import _metric_lines, build_report

    sets = metric_set(3, multi_label=False)
    targets = torch.tensor([0, 0, 1, 1])
    logits = torch.eye(3)[[0, 0, 0, 1]] * 5  # class 1 once right, class 2 never asked or said
    sets["test_metrics"].update(logits, targets)
    sets["test_ece_raw"].update(logits, targets)
    m = {k.removeprefix("test/"): v for k, v in sets["test_metrics"].compute().items()}
    module = SimpleNamespace(
        hparams={}, test_ece_raw=sets["test_ece_raw"], temperature=1.0, classes=["a", "b", "c"]
    )
    info = SimpleNamespace(name="folder", data_hash="h")
    report = build_report(Path("m.ckpt"), module, info, m, None, "")
    per = report["per_class"]
    assert per["c"] == {"precision": None, "recall": None, "support": 0, "mistaken_for": None}
    assert per["b"] == {
        "precision": 1.0,
        "recall": 0.5,
        "support": 2,
        "mistaken_for": {"class": "a", "images": 1},  # where its miss went
    }
    assert per["a"]["recall"] == 1.0 and per["a"]["precision"] == pytest.approx(2 / 3)
    lines = _metric_lines(report)
    assert lines[1] == "  lowest recall: b 0.500 (1 of 2; 1 as a)"  # classes at 1.000 unlisted
    assert lines[2] == "  no test images of c: their recall is not measured"
    full = {"precision": 1.0, "recall": 1.0, "support": 2}  # not "lowest recall: a 1.000, b 1.000"
    perfect = {**report, "per_class": {"a": full, "b": full}}
    assert _metric_lines(perfect)[1] == "  recall 1.000 for every class tested (2)"
    # 100 classes of 2 test images: a dozen at 0.500, of which three are named and the rest counted
    half = {"precision": 1.0, "recall": 0.5, "support": 2, "mistaken_for": None}
    many = {f"k{i:02d}": half if i % 8 == 0 else full for i in range(100)}
    assert _metric_lines({**report, "per_class": many})[1] == (
        "  lowest recall: k00 0.500 (1 of 2), k08 0.500 (1 of 2), k16 0.500 (1 of 2)"
        " (and 10 more class(es) at 0.500)"
    )
    # a manifest labelled with numbers: "10 0.500 (1 of 2; 1 as 2)" read as four numbers
    numbered = {"2": full, "10": half | {"mistaken_for": {"class": "2", "images": 1}}}
    assert _metric_lines({**report, "per_class": numbered})[1] == (
        "  lowest recall: '10' 0.500 (1 of 2; 1 as '2')"
    )


def test_calibrate_command_fits_a_checkpoint_after_the_fact(trained, tmp_path, capsys):
    """command=calibrate on a checkpoint whose temperature is 1 (trained before calibration
    existed, or with train.calibrate=false) fits it on the validation split and stores it."""
    import shutil

    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.training.evaluate import run_calibrate

    root, ckpt, _ = trained
    copy = tmp_path / "best.ckpt"
    shutil.copyfile(ckpt, copy)
    ckpt_file.store_buffers(copy, ckpt_file.read(copy), temperature=1.0)
    r = run_calibrate(compose_cfg(root, f"calibrate.checkpoint={copy}"))
    # the fit minimises the validation NLL; ECE, binned, need not fall with it
    assert r["temperature"] != 1.0 and r["nll_after"] <= r["nll_before"] + 1e-7
    assert float(ckpt_file.load_module(copy).temperature) == pytest.approx(r["temperature"])
    assert float(ckpt_file.load_module(ckpt).temperature) == pytest.approx(r["temperature"])
    out = capsys.readouterr().out
    assert f"NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}, ECE" in out
    # a temperature that moves asks for a new export; the second time nothing moves, and it
    # says so rather than asking for one
    ckpt_file.store_buffers(copy, ckpt_file.read(copy), temperature=2.0)
    run_calibrate(compose_cfg(root, f"calibrate.checkpoint={copy}"))
    assert "now needs `command=export-onnx` again" in capsys.readouterr().out
    again = run_calibrate(compose_cfg(root, f"calibrate.checkpoint={copy}"))
    assert again["temperature"] == pytest.approx(r["temperature"], abs=5e-4)
    out = capsys.readouterr().out
    assert "the same as the checkpoint held" in out and "export-onnx" not in out


_FAULTS_PER_STEP = """
import ctypes, resource, torch
from image_classifier.training import memory

def step():  # what a training step does to the heap: buffers of several MB, then all freed
    buffers = [torch.ones(3_000_000) for _ in range(8)]
    del buffers

def faults_per_step():
    for _ in range(6):  # the heap grows to its peak in the first steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3

# glibc's initial thresholds (128 KiB), which its own heuristics raise only sometimes: freed
# buffers go back to the OS. Fixed here, so that the comparison does not depend on luck.
mallopt = ctypes.CDLL(None).mallopt
mallopt(memory.M_MMAP_THRESHOLD, 128 * 1024)
mallopt(memory.M_TRIM_THRESHOLD, 128 * 1024)
print(faults_per_step(), memory.keep_freed_memory(), faults_per_step())
"""


def test_machine_info_reads_cpu_model_and_instructions_from_cpuinfo():
    cpu = "model name\t: AMD EPYC 9B45\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    x86 = f"processor\t: 0\n{cpu}\nprocessor\t: 1\n{cpu}"
    assert parse_cpuinfo(x86) == ("AMD EPYC 9B45", ["avx2", "avx512f", "avx512_bf16"])
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16\nCPU part\t: 0xd40\n"
    assert parse_cpuinfo(arm) == ("", ["asimd", "sve", "bf16"])
    m = {"machine.cpu": "X", "machine.cpu_cores": "2", "machine.cpu_features": "avx2"}
    assert describe_machine({**m, "machine.gpu": "none"}) == "X, 2 cores (avx2), no GPU"
    assert describe_machine({**m, "machine.gpu": "H100"}) == "X, 2 cores (avx2), GPU H100"


@pytest.mark.parametrize("features", [["avx2", "avx512f", "amx_bf16"], ["avx2"], ["asimd", "bf16"]])
def test_default_precision_on_a_cpu_is_float32_and_bf16_is_opt_in(features, monkeypatch, tmp_path):
    from image_classifier import lineage
    from image_classifier.training.train import default_precision, trainer_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lineage, "cpu_info", lambda: ("CPU", features))
    assert default_precision("auto") == default_precision("cpu") == "32-true"
    cfg = compose_cfg(tmp_path)
    assert trainer_kwargs(cfg)["precision"] == "32-true"
    assert trainer_kwargs(cfg, training=False)["precision"] == "32-true"  # test scores as exported
    cfg = compose_cfg(tmp_path, "trainer.precision=bf16-mixed")  # set: used as it is
    assert trainer_kwargs(cfg)["precision"] == "bf16-mixed"
    assert trainer_kwargs(cfg, training=False)["precision"] == "bf16-mixed"


def test_the_logging_interval_is_at_most_one_epoch(tmp_path):
    """A folder of 2 batches an epoch logs its training loss every epoch, not once in 25 (and
    Lightning warns when log_every_n_steps exceeds the batches in an epoch)."""
    from image_classifier.training.train import trainer_kwargs

    cfg = compose_cfg(tmp_path, "trainer.log_every_n_steps=50")  # the shipped default
    assert trainer_kwargs(cfg, steps_per_epoch=2)["log_every_n_steps"] == 2
    assert trainer_kwargs(cfg, steps_per_epoch=400)["log_every_n_steps"] == 50
    assert trainer_kwargs(cfg)["log_every_n_steps"] == 50
    limited = compose_cfg(tmp_path, "trainer.log_every_n_steps=50", "trainer.limit_train_batches=3")
    assert trainer_kwargs(limited, steps_per_epoch=400)["log_every_n_steps"] == 3
    part = compose_cfg(tmp_path, "trainer.log_every_n_steps=50", "trainer.limit_train_batches=0.1")
    assert trainer_kwargs(part, steps_per_epoch=400)["log_every_n_steps"] == 40


def test_default_precision_on_a_gpu_follows_its_bf16_support(monkeypatch):
    from image_classifier.training.train import default_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert default_precision("auto") == default_precision("gpu") == expected
    assert default_precision("cpu") == "32-true"  # a GPU present, training asked on the CPU


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_page_faults_every_step():
    run = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_STEP],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    returned, kept_set, kept = run.stdout.split()
    assert int(returned) > 10_000  # 96 MB handed back to the OS and faulted in again every step
    assert kept_set == "True" and int(kept) < 100


def test_ema_averages_with_a_warming_up_decay():
    from torch.optim.swa_utils import AveragedModel

    from image_classifier.training.callbacks import ema_averaging

    callback = ema_averaging(0.5)
    net = torch.nn.BatchNorm1d(1)
    averaged = AveragedModel(net, use_buffers=True, **callback._kwargs)
    expected = None
    # 16 updates: the warm-up (1 + n) / (10 + n) passes 0.5 at n = 8, so the last eight updates
    # run at the configured decay itself, and a decay that is ignored fails
    values = [4.0, 8.0, 2.0, 6.0, 10.0, 3.0, 7.0, 1.0, 9.0, 5.0, 4.0, 8.0, 2.0, 6.0, 10.0, 0.0]
    for n, value in enumerate(values):
        with torch.no_grad():
            net.weight.fill_(value)
        net.num_batches_tracked.fill_(n + 7)
        averaged.update_parameters(net)
        if expected is None:
            expected = value  # the first update copies
        else:
            decay = min(0.5, (1 + n) / (10 + n))  # n updates averaged so far
            expected = decay * expected + (1 - decay) * value
        assert averaged.module.weight.item() == pytest.approx(expected)
        assert averaged.module.num_batches_tracked.item() == n + 7  # a counter: copied
    # the last update, by hand at decay 0.5: half the average before it, half the new value 0
    assert averaged.module.weight.item() == pytest.approx(0.5 * previous_expected(values, 0.5))


def previous_expected(values: list[float], decay: float) -> float:
    """The average after all but the last value, computed independently of the test above."""
    avg = values[0]
    for n, v in enumerate(values[1:-1], 1):
        d = min(decay, (1 + n) / (10 + n))
        avg = d * avg + (1 - d) * v
    return avg


@pytest.mark.slow
def test_ema_weights_are_validated_and_checkpointed(make_cfg, folder_data):
    r = run_train(
        make_cfg(
            "data=folder",
            f"data.root={folder_data}",
            "data.size=[16,16]",
            "logger.enabled=false",
            "train.epochs=2",
            "train.ema=0.9",
        )
    )
    ckpt = torch.load(r["checkpoint"], map_location="cpu", weights_only=False)
    raw, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    name = next(k for k in averaged if k.endswith("head.2.weight"))
    assert not torch.equal(raw[name], averaged[name])
    module = load_module(r["checkpoint"])  # what test, export and serve get: the average
    torch.testing.assert_close(dict(module.state_dict())[name], averaged[name])


def test_a_fresh_tracking_store_gets_its_experiment_without_a_warning(tmp_path, caplog):
    from image_classifier.tracking import create_logger

    logger = create_logger(compose_cfg(tmp_path), "cnn", {})
    assert logger.run_id and not [r for r in caplog.records if "not found" in r.getMessage()]
    client, runs = _mlflow_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [logger.run_id]


def test_commands_started_together_on_a_new_project_share_one_store(tmp_path):
    """Three trainings started at once on a fresh project raced to create the embedded store's
    tables: two ended in alembic's "Online migration expected to match one row" traceback."""
    import subprocess
    import sys

    code = (
        "import sys; from omegaconf import OmegaConf; from image_classifier import tracking; "
        "cfg = OmegaConf.create({'logger': {'enabled': True, 'experiment': 'e', "
        "'connect_timeout': 5}, 'paths': {'root': sys.argv[1]}}); "
        "print(tracking.experiment_id(cfg))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert len({out.split()[-1] for out, _ in results}) == 1  # one experiment, one id


def test_commands_started_in_the_same_second_get_their_own_run_folders(tmp_path, monkeypatch):
    """outputs/<date>/<time> was shared by two commands started in the same second: their
    last.ckpt, log and plots overwrote each other. `${claim:...}` gives the second <time>-2."""
    from image_classifier import runs

    for v in (*runs.RANK_VARIABLES, "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")  # a task of a Slurm job array claims its own
    base = str(tmp_path / "outputs" / "2026-12-03" / "10-00-00")
    monkeypatch.setattr(runs, "_CLAIMED", {})
    first = runs.claim_run_dir(base)
    assert first == base and Path(base).is_dir() and runs.claim_run_dir(base) == base  # stays
    monkeypatch.setattr(runs, "_CLAIMED", {})  # another process, the same second
    assert runs.claim_run_dir(base) == base + "-2"
    monkeypatch.setattr(runs, "_CLAIMED", {})
    assert runs.claim_run_dir(base) == base + "-3"
    monkeypatch.setattr(runs, "_CLAIMED", {})
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a task of a run on several: the shared folder
    assert runs.claim_run_dir(base) == base
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runs.claim_run_dir(base) == base


def test_only_the_first_process_of_a_distributed_run_prints_warnings(monkeypatch):
    """Each rank of a torchrun or Lightning DDP run scans the same data: every data warning came
    once per process. The console handler of Hydra's job logging keeps rank 0's (and errors)."""
    import logging

    from omegaconf import OmegaConf

    from image_classifier import runs

    plain = OmegaConf.load(ROOT / "configs" / "hydra" / "job_logging" / "plain.yaml")
    assert plain.filters.rank_zero["()"] == "image_classifier.runs.RankZeroConsole"
    assert list(plain.handlers.console.filters) == ["rank_zero"]
    console = runs.RankZeroConsole()

    def shown(level: int) -> bool:
        return console.filter(logging.LogRecord("x", level, __file__, 1, "m", None, None))

    for v in (*runs.RANK_VARIABLES, "SLURM_PROCID"):
        monkeypatch.delenv(v, raising=False)
    assert shown(logging.WARNING) and shown(logging.INFO)  # one process: everything
    monkeypatch.setenv("SLURM_PROCID", "1")  # the second task of a Slurm run
    assert not shown(logging.WARNING)
    monkeypatch.setenv("SLURM_PROCID", "0")  # a job array's task (each is the first of its own)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert shown(logging.WARNING)
    for v, rank in (("LOCAL_RANK", "1"), ("RANK", "2")):  # Lightning's second, torchrun's third
        monkeypatch.setenv(v, rank)
        assert not shown(logging.WARNING) and shown(logging.ERROR)


def test_best_checkpoint_breaks_ties_on_the_monitor_by_the_lower_val_loss(tmp_path):
    """A 16-image validation split ties on accuracy from early on; Lightning kept the first of
    equals, so 100- and 250-epoch runs shipped their epoch 6. Ties now go to the lower loss, and
    a better score still wins over a lower loss."""
    import lightning as L

    from image_classifier.training.callbacks import BestCheckpoint

    accs, losses = [0.5, 0.75, 0.75, 0.75, 0.5], [1.0, 2.0, 1.5, 1.8, 0.1]

    class Scripted(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, i):
            e = self.current_epoch
            self.log_dict({"val/acc": accs[e], "val/loss": losses[e]})

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1)))
    best = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max")
    trainer = L.Trainer(
        max_epochs=5,
        callbacks=[best],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Scripted(), data, data)
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["epoch"] == 2
    assert best.tie_loss == 1.5 and best.state_dict()["tie_loss"] == 1.5
    before = L.pytorch.callbacks.ModelCheckpoint(filename="best", monitor="val/acc", mode="max")
    assert best.state_key == before.state_key  # a run checkpointed before it resumes its record


def test_a_run_folder_stands_for_its_checkpoint_or_exported_model(tmp_path):
    """`test.checkpoint=outputs/<date>/<time>` said "Checkpoint ... does not exist" of a folder
    that exists. A run folder now stands for its best checkpoint (infer/serve: its export)."""
    from image_classifier import runs

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"")
    run = tmp_path / "run"
    assert runs.checkpoint(None, run, "test.checkpoint") == ckpts / "last.ckpt"
    (ckpts / "best.ckpt").write_bytes(b"")
    assert runs.checkpoint(None, run, "test.checkpoint") == ckpts / "best.ckpt"
    assert runs.model_file(None, run, "infer.model") == ckpts / "best.ckpt"
    (ckpts / "best.onnx").write_bytes(b"")
    assert runs.model_file(None, str(run), "infer.model") == ckpts / "best.onnx"
    assert runs.last_checkpoint(None, run, "train.resume") == ckpts / "last.ckpt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"infer.model='.*empty' is a folder with no best.onnx or"):
        runs.model_file(None, tmp_path / "empty", "infer.model")


def test_infer_without_a_model_takes_the_newest_export_else_its_checkpoint(tmp_path):
    """`command=infer` without infer.model stopped with "best.onnx does not exist: export it
    first" where the newest run's checkpoint predicts as well (with PyTorch)."""
    from omegaconf import OmegaConf

    from image_classifier import runs

    cfg = OmegaConf.create({"paths": {"root": str(tmp_path), "search": ["outputs"]}})
    ckpts = tmp_path / "outputs" / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "best.ckpt").write_bytes(b"")
    assert runs.model_location(cfg, None, "infer.model") == (ckpts / "best.ckpt", None)
    with pytest.raises(UserError, match=r"export.triton.onnx is not set and .*best.onnx does not"):
        runs.model_file(cfg, None, "export.triton.onnx")  # exporting and registering need ONNX
    (ckpts / "best.onnx").write_bytes(b"")
    assert runs.model_location(cfg, None, "infer.model") == (ckpts / "best.onnx", None)
    assert runs.model_file(cfg, None, "export.triton.onnx") == ckpts / "best.onnx"


def test_a_folder_holding_some_of_the_models_classes_is_tested_whole(trained, tmp_path):
    """A new labelled folder with two of the model's three classes was refused ("classes do not
    match"), and a class-folder root was tested on its 10 % test split only. It is now read with
    the model's class list, and data.split=[0,0,1] tests every image of it."""
    root, ckpt, _ = trained
    some = make_class_folders(tmp_path / "some", classes=("cat", "fox"), per_class=5)
    cfg = compose_cfg(
        root, "data=folder", f"data.root={some}", "data.split=[0,0,1]", f"test.checkpoint={ckpt}"
    )
    from image_classifier.data.images import Preprocessing
    from image_classifier.data.splits import load_splits

    model_input = Preprocessing.from_dict(load_module(ckpt).hparams.preprocessing)
    _, own = load_splits(cfg.data, model_input, build_cache=True)  # labels: cat 0, fox 1
    assert own.classes == ["cat", "fox"] and own.cache  # a cache with the folder's own indices
    r = run_test(cfg, use_checkpoint_data=False)  # must not read it: fox is 2 for the model
    report = json.loads(Path(r["report"]).read_text())
    assert report["classes"] == ["cat", "dog", "fox"] and report["data"]["test_images"] == 10
    assert "Only its test split" not in report["data"]["warning"]  # it was tested whole
    assert (
        report["per_class"]["dog"]["support"] == 0 and report["per_class"]["dog"]["recall"] is None
    )
    assert report["per_class"]["fox"]["support"] == 5


def test_testing_data_with_no_test_split_says_how_to_test(trained, tmp_path):
    """data.split=[0.7,0.3,0] trains with no test split; `command=test` then ended in a traceback
    (torchmetrics' "No samples to concatenate") and train's summary still said `command=test`."""
    root, ckpt, images = trained
    cfg = compose_cfg(
        root,
        "data=folder",
        f"data.root={images}",
        "data.split=[0.7,0.3,0]",
        f"test.checkpoint={ckpt}",
    )
    with pytest.raises(
        UserError,
        match=r"The test split of images holds no images \(data.split="
        r"\[0.7, 0.3, 0\] gives it none\). Test on other images.*data.split=\[0,0,1\]",
    ):
        run_test(cfg, use_checkpoint_data=False)
    from image_classifier.runs import next_test

    assert next_test(cfg, ckpt, 0).endswith(
        "data=folder data.root=TEST_FOLDER data.split=[0,0,1]  (no test split)"
    )


def test_testing_on_images_the_model_trained_on_says_how_many(trained, tmp_path):
    """Images added to the folder after training re-drew the split and `test` scored training
    images as test images (59 of 100 on a 1,000-image folder after 20 were added), saying only
    that the data's hash differed. The checkpoint keeps its training images' digests now."""
    root, ckpt, images = trained
    from image_classifier.models.checkpoint import train_digests

    copy = shutil.copytree(images, tmp_path / "images")
    make_class_folders(tmp_path / "new", classes=("cat",), per_class=2, seed=7)
    for i, p in enumerate(sorted((tmp_path / "new" / "cat").iterdir())):
        shutil.copy(p, copy / "cat" / f"new{i}.png")
    cfg = compose_cfg(
        root, "data=folder", f"data.root={copy}", "data.split=[0,0,1]", f"test.checkpoint={ckpt}"
    )
    report = json.loads(Path(run_test(cfg, use_checkpoint_data=False)["report"]).read_text())
    seen = len(train_digests(ckpt))
    assert seen == 18  # the fixture's 24 images, 0.8 of them trained on after stratified cuts
    assert (
        f"{seen} of the 26 test images were training images of this model"
        in (report["data"]["warning"])
    )


@pytest.mark.parametrize("n", [10, 100, 400])
def test_the_confusion_matrix_of_many_classes_stays_an_image_one_can_open(tmp_path, n):
    """A 100-class matrix drew at 0.55 in a class: a 6270x5329 PNG. Past 30 classes the cells
    lose their counts and the side shrinks to 0.2 in a class, never over 30 in."""
    from PIL import Image

    from image_classifier.training.plots import MAX_INCHES, plot_confusion

    cm = np.eye(n, dtype=int) * 5 + 1
    path = plot_confusion(cm, [f"class {i}" for i in range(n)], tmp_path / "cm.png")
    width, height = Image.open(path).size
    assert width <= MAX_INCHES * 110 and height < width
    assert width >= {10: 600, 100: 2000, 400: 3000}[n]  # still room for the class names


def test_class_names_no_font_draws_are_said_once_and_fallback_fonts_draw_the_rest(
    tmp_path, monkeypatch, caplog
):
    """A class named 猫 drew as a box, with matplotlib's "Glyph 29483 missing from font(s)
    DejaVu Sans" once per character and plot. A fallback font that is installed draws what
    DejaVu Sans lacks (STIXGeneral, shipped with matplotlib, stands in for a CJK font: it has
    U+1D81); a character no font has is named once per command, with the fix."""
    import warnings

    from image_classifier import plotting
    from image_classifier.training.plots import plot_confusion

    monkeypatch.setattr(plotting, "FALLBACK", ("STIXGeneral",))
    monkeypatch.setattr(plotting, "_said", set())
    families, _ = plotting._fonts(plotting.FALLBACK)
    assert families == ["DejaVu Sans", "STIXGeneral"]
    fig, ax = plotting.plt.subplots()
    ax.set_title("\u1d81", fontfamily=families)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fig.canvas.draw()  # matplotlib's own fallback draws it: no "Glyph ... missing"
    assert plotting.missing_characters(fig) == [] and not [w for w in seen if "Glyph" in str(w)]
    plotting.plt.close(fig)

    unassigned = "\u0378"  # in no font anywhere
    with caplog.at_level("WARNING", logger="image_classifier.plotting"):
        plot_confusion(np.eye(2, dtype=int), ["\u1d81 ok", f"cat {unassigned}"], tmp_path / "a.png")
        plot_confusion(np.eye(2, dtype=int), ["x", f"cat {unassigned}"], tmp_path / "b.png")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and f"({unassigned}; first in a.png)" in said[0], said
    assert "fonts-noto-cjk" in said[0] and (tmp_path / "b.png").stat().st_size > 0


def test_a_size_the_network_pools_to_nothing_is_named_with_the_smallest_it_takes(tmp_path):
    """data.size=2 on the CNN ended in torch's "Output size is too small" traceback."""
    images = make_class_folders(tmp_path / "img", per_class=4, size=12)
    cfg = compose_cfg(tmp_path, "data=folder", f"data.root={images}", "model=cnn", "data.size=4")
    with pytest.raises(
        UserError,
        match=r"data.size=\[4, 4\] is too small for model.name=cnn: .* It "
        r"takes 8x8 px or more: data.size=8 or larger, or data.size=auto",
    ):
        run_train(cfg)


@pytest.mark.parametrize(
    ("pretrained", "says"),
    [
        (False, "resnet50 from random weights ("),
        (True, "resnet50 from pretrained weights ("),
        ("/w/resnet50_a1.safetensors", "resnet50 from resnet50_a1.safetensors ("),
        # train.resume: the weights are the checkpoint's (it said "from random weights")
        ("resumed", "resnet50 from /run/checkpoints/last.ckpt, resumed ("),
    ],
)
def test_the_first_line_says_which_weights_training_starts_from(capsys, pretrained, says):
    """`model=resnet50` starts from random weights unless model.pretrained says otherwise; the
    line said only "Training resnet50 (23.52 M parameters)", and 224 photos trained to 25 %."""
    from types import SimpleNamespace

    import torch

    from image_classifier.training.summary import announce

    trainer = SimpleNamespace(is_global_zero=True, max_epochs=3)
    info = SimpleNamespace(name="shapes", split_sizes={"train": 224, "val": 28})
    spec = {"name": "resnet50", "pretrained": pretrained}
    if pretrained == "resumed":
        spec = {"name": "resnet50", "pretrained": False, "resumed": "/run/checkpoints/last.ckpt"}
    announce(trainer, torch.nn.Linear(1000, 1000), spec, info, 32, 7)
    assert capsys.readouterr().out.startswith(f"Training {says}1.00 M parameters) on shapes")


def test_mistakes_gallery_captions_do_not_cover_the_row_above(tmp_path, monkeypatch):
    """mistakes.png on a 40-class folder: the second row's two-line captions ("true green_ring /
    pred yellow_ring (0.30)") were drawn over the first row's images."""
    from image_classifier import plotting
    from image_classifier.training import predictions

    kept = []
    monkeypatch.setattr(plotting.plt, "close", kept.append)
    dataset = [(np.full((3, 71, 71), 90, np.uint8), 0)] * 9
    probs = np.tile(np.eye(3)[1] * 0.8 + 0.1, (9, 1))
    images = [x for x, _ in dataset]
    classes = ["a", "b", "c"]
    predictions.plot_mistakes(
        images, list(range(9)), probs, np.zeros(9, int), classes, tmp_path / "mistakes.png"
    )
    fig = kept[0]
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    for above, below in zip(axes[:3], axes[6:9], strict=True):  # columns with an image in both rows
        picture = above.get_window_extent(renderer)
        caption = below.title.get_window_extent(renderer)
        assert caption.y1 <= picture.y0, (caption, picture)
    assert (tmp_path / "mistakes.png").is_file()


def test_test_reports_what_each_confidence_floor_keeps_and_its_accuracy():
    """Four images: confidences 0.95 (right), 0.85 (wrong), 0.6 (right), 0.4 (wrong)."""
    from image_classifier.models.metrics import by_confidence, confidence_text

    probs = np.array([[0.95, 0.05], [0.15, 0.85], [0.6, 0.4], [0.4, 0.3]])
    rows = by_confidence(probs, np.array([0, 0, 0, 1]), levels=(0.5, 0.9, 0.99))
    assert rows == [
        {"min_confidence": 0.5, "answered": 0.75, "accuracy": pytest.approx(2 / 3)},
        {"min_confidence": 0.9, "answered": 0.25, "accuracy": 1.0},
        {"min_confidence": 0.99, "answered": 0.0, "accuracy": None},
    ]
    assert (
        confidence_text(rows) == "0.5 75.0 % (66.7 % right), 0.9 25.0 % (100.0 % right), 0.99 0.0 %"
    )


def test_a_run_no_better_than_its_largest_class_says_so_and_why(tmp_path, capsys):
    """A run whose best val/acc is inside the interval of always answering the validation split's
    largest class warns, with the steps it took against those wanted (a network that has not
    moved: lr 1e-9), and so does its test; the same data learned in 15 epochs does not."""
    from image_classifier.training.summary import chance_line

    images = make_class_folders(tmp_path / "images", per_class=20)
    common = ("data=folder", f"data.root={images}", "data.size=[16,16]")
    r = run_train(compose_cfg(tmp_path / "a", *common, "train.lr=1e-9"))
    out = capsys.readouterr().out
    assert r["at_chance"]["steps"] == 6 and r["at_chance"]["steps_wanted"] == 1000
    assert r["at_chance"]["steps_per_epoch"] == 6  # one epoch
    assert r["at_chance"]["rate"] < 0.5 and r["at_chance"]["images"] == 6
    assert "is not clearly better than always answering" in out
    assert "it took 6 optimizer steps, where a network like this wants about 1000" in out
    run_test(compose_cfg(tmp_path / "a", *common, f"test.checkpoint={r['checkpoint']}"))
    assert re.search(
        r"WARNING: accuracy 0\.\d+ is not clearly better than always answering "
        r"'\w+' \(0\.\d+ of the \d+ test images\)",
        capsys.readouterr().out,
    )
    r = run_train(compose_cfg(tmp_path / "b", *common, "train.epochs=15"))
    assert r["at_chance"] is None and r["best_score"] == 1.0
    assert "not clearly better" not in capsys.readouterr().out
    run_test(compose_cfg(tmp_path / "b", *common, f"test.checkpoint={r['checkpoint']}"))
    assert "not clearly better" not in capsys.readouterr().out
    enough = {"best_score": 0.3, "at_chance": {"rate": 0.3, "class": "cat", "images": 10}}
    enough["at_chance"] |= {"steps": 1200, "steps_wanted": 1000, "kind": "scratch"}
    assert chance_line(enough).endswith(
        "check the labels (command=audit); a pretrained model "
        "(model=efficientnet_lite0) learns from fewer images"
    )
    enough["at_chance"]["kind"] = "pretrained"  # it is one already: the labels are what is left
    assert chance_line(enough).endswith("; check the labels (command=audit)")
    # under a time budget "train.epochs=auto chooses enough" was no fix: the budget set the epochs
    short = {**enough, "at_chance": enough["at_chance"] | {"steps": 15, "steps_per_epoch": 3}}
    short["time_budget"] = {
        "budget_seconds": 20,
        "epochs": 5,
        "epoch_seconds": 2.1,
        "probe_seconds": 5.5,
    }
    assert chance_line(short).endswith(  # 1000 steps: 334 epochs of 2.1 s / 0.95, after 5.5 s
        "it took 15 optimizer steps, where a network like this wants about 1000: "
        "train.time_budget=20 fitted 5 epoch(s) of 3 step(s); about train.time_budget=744 fits "
        "them on this machine (or train.time_budget=null: train.epochs=auto chooses enough for "
        "the data)"
    )
    # 2 validation images of 2 classes: even both right is within chance; the split is the cause
    from image_classifier.models.metrics import at_chance

    assert at_chance(1.0, [5, 5], ["a", "b"]) is None  # 10 images all right: clearly above
    few = at_chance(1.0, [1, 1], ["a", "b"])
    assert few["too_few"] is True and few["images"] == 2
    line = chance_line({"best_score": 1.0, "at_chance": few | {"steps": 70, "steps_wanted": 300}})
    assert line.endswith(
        "; 2 validation images cannot show it even when every one is right: give the validation "
        "split more images (a larger share in data.split, or more files in its folder when the "
        "data is pre-split)"
    )
    assert "optimizer steps" not in line


def test_the_newest_checkpoint_of_a_run_not_finished_is_named_as_such(tmp_path, caplog):
    """`command=test` with no checkpoint took the newest best.ckpt, which may be a run still
    training in another terminal (or one stopped with Ctrl-C): its best epoch so far, not
    calibrated, tested without a word. A run folder without train_summary.json is named so."""
    import os

    from omegaconf import OmegaConf

    from image_classifier import runs

    cfg = OmegaConf.create({"paths": {"root": str(tmp_path), "search": ["outputs"]}})
    done, going = (tmp_path / "outputs" / d for d in ("done", "going"))
    for run in (done, going):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    (done / "train_summary.json").write_text("{}")
    os.utime(done / "checkpoints" / "best.ckpt", (1, 1))  # older: going's is the newest
    assert runs.checkpoint(cfg, None, "test.checkpoint") == going / "checkpoints" / "best.ckpt"
    assert (
        f"The newest best checkpoint, {going / 'checkpoints' / 'best.ckpt'}, is from a run that "
        "has not finished (no train_summary.json beside its checkpoints/: still training, or "
        "stopped early): its best epoch so far, not calibrated. Name another with "
        "test.checkpoint=PATH."
    ) in caplog.text
    caplog.clear()
    (going / "train_summary.json").write_text("{}")
    runs.checkpoint(cfg, None, "test.checkpoint")
    assert "has not finished" not in caplog.text
