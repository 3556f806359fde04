"""Multi-label data: manifests (labels joined by ';' or 0/1 columns), sigmoid + BCE training,
tuned thresholds, mAP/F1 report, and every backend returning the labels above their thresholds."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_classifier.data.layouts import ManifestOptions, discover
from image_classifier.errors import UserError
from tests.conftest import compose_cfg, run_cli

LABELS = ("left", "top", "diag")


def multi_label_image(labels: set[str], rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """Each label adds its own pattern: a bright left half, a bright top half, a diagonal."""
    img = rng.integers(0, 40, (size, size)).astype(np.int32)
    if "left" in labels:
        img[:, : size // 2] += 90
    if "top" in labels:
        img[: size // 2, :] += 90
    if "diag" in labels:
        np.fill_diagonal(img, 250)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_multi_label(root: Path, n: int = 48, columns: bool = False, seed: int = 0) -> Path:
    """n images and a manifest: `file,labels` with 'a;b' cells, or one 0/1 column per label."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        labels = {x for x in LABELS if rng.random() < 0.5} or {LABELS[i % 3]}
        Image.fromarray(multi_label_image(labels, rng)).save(root / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", sorted(labels)))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        if columns:
            w.writerow(["file", *LABELS])
            w.writerows([file, *[int(x in labels) for x in LABELS]] for file, labels in rows)
        else:
            w.writerow(["file", "labels"])
            w.writerows([file, ";".join(labels)] for file, labels in rows)
    return root


@pytest.mark.parametrize("columns", [False, True])
def test_both_manifest_forms_read_as_the_same_multi_label_samples(tmp_path, columns):
    joined = discover(make_multi_label(tmp_path / "a"))
    other = discover(make_multi_label(tmp_path / "b", columns=columns))
    assert joined.multi_label and other.multi_label
    assert joined.classes == other.classes == sorted(LABELS)
    assert "multi-label csv manifest" in joined.layout
    strip = {s: [(Path(p).name, y) for p, y in v] for s, v in joined.splits.items()}
    assert strip == {s: [(Path(p).name, y) for p, y in v] for s, v in other.splits.items()}
    assert all(isinstance(y, tuple) for _, y in joined.splits["train"])
    assert sum(len(v) for v in joined.splits.values()) == 48


def test_single_label_manifest_is_unchanged(tmp_path):
    root = make_multi_label(tmp_path / "d")
    with open(root / "labels.csv", "w") as f:
        f.write("file,label\n" + "".join(f"{i:03d}.png,{LABELS[i % 3]}\n" for i in range(48)))
    s = discover(root)
    assert not s.multi_label and all(isinstance(y, int) for _, y in s.splits["train"])


@pytest.mark.parametrize(
    ("content", "options", "expected"),
    [
        (
            "file,labels\n000.png,left;top\n001.png,\n",
            {},
            "Row 3 of labels.csv has an empty label; fill it in or remove the row (multi-label: "
            "name every label, separated by ';'; for images that carry none of the labels, write "
            "one 0/1 column per class, where a row of zeros is allowed: docs/data.md).",
        ),
        ("file,labels\n000.png,left;;top\n", {}, "has an empty label between the ';' separators"),
        (
            "file,labels\n000.png,left;tpo\n",
            {"classes": list(LABELS)},
            "Row 2 of labels.csv: unknown label 'tpo'; data.classes lists left, top, diag. "
            "Did you mean 'top'?",
        ),
        (
            "file,left,top\n000.png,1,2\n",
            {"multi_label": True},
            "column 'top' holds '2'; with one column per class (multi-label) every value is 0 or 1",
        ),
        ("file,labels\n,left\n", {}, "Row 2 of labels.csv has no image file"),
    ],
)
def test_bad_manifests_name_the_row_and_the_fix(tmp_path, content, options, expected):
    root = make_multi_label(tmp_path / "d", n=4)
    (root / "labels.csv").write_text(content)
    with pytest.raises(UserError) as e:
        discover(root, manifest=ManifestOptions(**options))
    assert expected in str(e.value)


def test_tune_thresholds_picks_the_best_f1_per_class():

    from image_classifier.models.multilabel import tune_thresholds

    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]])
    probs = torch.tensor([[0.30, 0.9], [0.35, 0.1], [0.10, 0.8], [0.20, 0.2]])
    t = tune_thresholds(probs, targets)
    assert 0.2 < t[0] <= 0.30  # both positives (0.30, 0.35) above it, the negatives below
    assert 0.2 < t[1] <= 0.8
    assert tune_thresholds(probs, torch.zeros(4, 2)) == [0.5, 0.5]  # no positives: default


@pytest.fixture(scope="module")
def multi_trained(tmp_path_factory):
    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.training.train import run_train

    root = tmp_path_factory.mktemp("multi")
    data = make_multi_label(root / "images", n=60)
    cfg = compose_cfg(
        root, "data=folder", f"data.root={data}", "data.size=[16,16]", "train.epochs=3"
    )
    with contextlib.redirect_stdout(io.StringIO()) as said:
        trained = run_train(cfg)
    trained["said"] = said.getvalue()
    onnx = root / "m.onnx"
    run_export_onnx(
        compose_cfg(root, f"export.checkpoint={trained['checkpoint']}", f"export.output={onnx}")
    )
    return root, Path(trained["checkpoint"]), onnx, data, trained


def test_train_tunes_thresholds_and_test_reports_multi_label_metrics(multi_trained):
    from image_classifier.models.checkpoint import load_module
    from image_classifier.training.evaluate import run_test

    root, ckpt, _, _, trained = multi_trained
    module = load_module(ckpt)
    assert module.multi_label and module.thresholds.shape == (3,)
    assert trained["thresholds"] == pytest.approx(module.thresholds.tolist())
    assert "calibration" not in trained  # temperature scaling is for single-label models
    named = ", ".join(
        f"{c} {t:.2f}" for c, t in zip(module.classes, trained["thresholds"], strict=True)
    )
    assert f"  thresholds: {named} (per class, tuned on val)" in trained["said"]
    r = run_test(compose_cfg(root, f"test.checkpoint={ckpt}"))
    report = json.loads(Path(r["report"]).read_text())
    assert report["multi_label"] and 0 <= report["mAP"] <= 1 and report["ece"] is None
    assert set(report["per_class"]["top"]) == {"precision", "recall", "ap", "threshold", "support"}
    assert any(p.endswith("per_class.png") for p in r["plots"])
    with open(r["predictions"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["data"]["test_images"] > 0
    assert set(rows[0]) == {"image", "true", "predicted", "exact_match", "top3"}
    assert all(set(filter(None, row["true"].split(";"))) <= set(LABELS) for row in rows)
    # the mistakes gallery exactly when some image's labels were decided wrong
    wrong = any(row["exact_match"] == "0" for row in rows)
    assert (Path(r["report"]).parent / "plots" / "mistakes.png").exists() == wrong


def test_the_multi_label_mistakes_are_the_wrong_decisions_furthest_from_their_labels():
    from image_classifier.training.multilabel_report import mistakes

    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=np.float32)
    probs = np.array([[0.9, 0.1], [0.6, 0.2], [0.1, 0.55], [0.45, 0.5]], dtype=np.float32)
    # decided at 0.5 / 0.5: row 0 right; row 1 misses b (|d| 0.4 + 0.8 = 1.2); row 2 right
    # (0.55 >= 0.5); row 3 says b (0.45 + 0.5 = 0.95)
    assert mistakes(probs, targets, [0.5, 0.5]) == [1, 3]
    # b at 0.6: row 2 misses b (0.1 + 0.45 = 0.55), row 3 says nothing (right)
    assert mistakes(probs, targets, [0.5, 0.6]) == [1, 2]
    assert mistakes(probs, targets, [0.5, 0.6], n=1) == [1]


def test_every_backend_returns_the_labels_above_their_thresholds(multi_trained):
    from image_classifier.export.mlflow_model import ImageClassifierModel
    from image_classifier.inference.predictor import load_predictor
    from image_classifier.inference.rows import predict_paths

    _, ckpt, onnx, data, _ = multi_trained
    paths = sorted(data.glob("*.png"))[:12]
    by_onnx = load_predictor(onnx, device="cpu")
    by_ckpt = load_predictor(ckpt, device="cpu")
    assert by_onnx.meta.multi_label and by_onnx.meta.thresholds() == pytest.approx(
        by_ckpt.meta.thresholds()
    )
    batch = np.stack([np.asarray(Image.open(p))[None] for p in paths]).astype(np.float32)
    p_onnx, p_ckpt = by_onnx.predict(batch), by_ckpt.predict(batch)
    assert np.abs(p_onnx - p_ckpt).max() < 1e-4
    assert not np.allclose(p_onnx.sum(1), 1.0)  # sigmoids, not a softmax
    rows = predict_paths(by_onnx, paths)
    thresholds = dict(zip(by_onnx.meta.classes, by_onnx.meta.thresholds(), strict=True))
    for row in rows:
        expected = {c for c, p in row["all_predictions"].items() if p >= thresholds[c]}
        assert set(row["predicted_labels"]) == expected
    assert [r["predicted_labels"] for r in predict_paths(by_ckpt, paths)] == [
        r["predicted_labels"] for r in rows
    ]
    everything = predict_paths(by_onnx, paths, threshold=1e-6)
    assert all(len(r["predicted_labels"]) == 3 for r in everything)

    model = ImageClassifierModel()
    model.predictor = by_onnx
    served = model.predict(None, [p.read_bytes() for p in paths])
    assert [r["predicted_labels"] for r in served] == [r["predicted_labels"] for r in rows]


def test_serve_returns_labels_and_checks_the_threshold(multi_trained):
    from starlette.testclient import TestClient

    from image_classifier.inference.predictor import load_predictor
    from image_classifier.serving.app import create_app

    _, _, onnx, data, _ = multi_trained
    app = create_app(load_predictor(onnx, device="cpu"), model_path=onnx)
    image = sorted(data.glob("*.png"))[0]
    with TestClient(app) as client:
        meta = client.get("/metadata").json()
        assert meta["multi_label"] and len(meta["thresholds"]) == 3
        r = client.post("/predict", files={"file": ("a.png", image.read_bytes(), "image/png")})
        assert r.status_code == 200 and "predicted_labels" in r.json()
        r = client.post(
            "/predict?threshold=1.5", files={"file": ("a.png", image.read_bytes(), "image/png")}
        )
        assert r.status_code == 422 and "threshold=1.5 must be between 0 and 1" in r.json()["error"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.threshold=1.5", "train.threshold=1.5 must be a number > 0 and < 1, or 'tune'"),
        ("infer.threshold=0", "infer.threshold=0 must be a number > 0 and < 1"),
        ("data.multi_label=maybe", "data.multi_label='maybe' is not one of auto, True, False"),
    ],
)
def test_threshold_out_of_range_exits_2(tmp_path, override, expected):
    p = run_cli("command=train", "data=folder", override, cwd=tmp_path)
    assert p.returncode == 2 and expected in p.stderr, p.stderr


def test_single_label_only_options_are_refused_for_multi_label_data(tmp_path):
    from image_classifier.training.train import run_train

    data = make_multi_label(tmp_path / "images", n=24)
    cfg = compose_cfg(
        tmp_path, "data=folder", f"data.root={data}", "data.size=[16,16]", "train.augment.mixup=0.2"
    )
    with pytest.raises(UserError, match=r"train.augment.mixup: single-label only"):
        run_train(cfg)


def test_calibrate_command_retunes_multi_label_thresholds(multi_trained, tmp_path):
    import shutil

    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.training.evaluate import run_calibrate

    root, ckpt, _, _, trained = multi_trained
    copy = tmp_path / "best.ckpt"
    shutil.copyfile(ckpt, copy)
    ckpt_file.store_buffers(copy, ckpt_file.read(copy), thresholds=[0.5, 0.5, 0.5])
    r = run_calibrate(compose_cfg(root, f"calibrate.checkpoint={copy}"))
    assert r["thresholds"] == pytest.approx(trained["thresholds"])
    assert ckpt_file.load_module(copy).thresholds.tolist() == pytest.approx(r["thresholds"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.balanced_sampler=true"], "train.balanced_sampler=true balances single-label"),
        (["train.label_smoothing=0.1"], "train.label_smoothing: single-label only"),
    ],
)
def test_more_single_label_options_are_refused(tmp_path, overrides, expected):
    from image_classifier.training.train import run_train

    data = make_multi_label(tmp_path / "images", n=24)
    cfg = compose_cfg(tmp_path, "data=folder", f"data.root={data}", "data.size=[16,16]", *overrides)
    with pytest.raises(UserError, match=expected):
        run_train(cfg)


def test_map_monitor_is_refused_for_single_label_data(tmp_path, folder_data):
    from image_classifier.training.train import run_train

    cfg = compose_cfg(tmp_path, "data=folder", f"data.root={folder_data}", "train.monitor=val/mAP")
    with pytest.raises(UserError, match=r"train.monitor=val/mAP is the multi-label metric"):
        run_train(cfg)


def test_a_label_without_test_images_is_left_out_of_map_and_macro_f1():
    """A label no test image carries had AP -0.000, was the "lowest AP" of the run and pulled
    mAP down (0.79 where the measured labels averaged 0.99). It is now null and named apart."""
    from types import SimpleNamespace

    from image_classifier.models.multilabel import decide, test_metrics
    from image_classifier.training.multilabel_report import build_report, summary_lines

    probs = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.7, 0.2], [0.3, 0.6, 0.1], [0.1, 0.4, 0.6]])
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0]])  # "c" never present
    thresholds = torch.tensor([0.5, 0.5, 0.5])
    decisions, ranking = test_metrics(3)
    decisions.update(decide(probs, thresholds), targets)
    ranking.update(probs, targets)
    m = {**decisions.compute(), **ranking.compute()}
    module = SimpleNamespace(
        thresholds=thresholds, test_outputs=[(probs, targets)], hparams={}, classes=["a", "b", "c"]
    )
    info = SimpleNamespace(name="folder", data_hash="h")
    r = build_report(Path("m.ckpt"), module, info, m, 0.3, "")
    per = r["per_class"]
    assert per["c"]["recall"] is None and per["c"]["ap"] is None and per["c"]["support"] == 0
    assert per["c"]["precision"] == 0.0  # said once ("c" at 0.6) and wrong
    assert per["b"]["recall"] == pytest.approx(2 / 3) and per["b"]["precision"] == 1.0
    assert r["mAP"] == pytest.approx((per["a"]["ap"] + per["b"]["ap"]) / 2)
    assert r["f1_macro"] == pytest.approx((1.0 + 0.8) / 2)  # a: P = R = 1; b: P 1, R 2/3
    lines = summary_lines(r)
    assert r["accuracy"] == pytest.approx(3 / 4)  # exact match: all but the last image
    assert lines[0].endswith("exact match 0.7500 (95 % interval 0.3006-0.9544 on 4 images)")
    assert lines[1].startswith("  lowest AP: ") and " c " not in lines[1]
    assert lines[2] == "  no test images of c: their recall and AP are not measured"


def test_a_label_without_positives_in_a_split_prints_no_raw_torchmetrics_warning():
    """Every validation epoch printed torchmetrics' "No positive samples found in target" when a
    label had no example in the split; the data's own warning already names that label."""
    import warnings

    from torchmetrics.classification import MultilabelAveragePrecision

    from image_classifier.models.multilabel import compute_quietly

    metric = MultilabelAveragePrecision(num_labels=3, average=None)
    metric.update(
        torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.2]]), torch.tensor([[1, 0, 0], [0, 1, 0]])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        ap = compute_quietly(metric)
    assert ap[:2].tolist() == [1.0, 1.0]


def test_command_test_on_a_multi_label_export_reports_what_its_checkpoint_does(
    multi_trained, tmp_path
):
    """Decisions at the export's own thresholds, rankings on its probabilities: the ONNX file's
    report is its checkpoint's, less the loss."""
    from image_classifier.training.test_export import run_any_test

    root, ckpt, onnx, _, _ = multi_trained
    reports = []
    for name, model in (("a", ckpt), ("b", onnx)):
        r = run_any_test(
            compose_cfg(root, f"test.checkpoint={model}", f"paths.output_dir={tmp_path}/{name}")
        )
        reports.append(json.loads(Path(r["report"]).read_text()))
    a, b = reports
    assert b["multi_label"] and b["data"]["test_images"] == a["data"]["test_images"] > 0
    assert b["accuracy"] == pytest.approx(a["accuracy"]) and b["mAP"] == pytest.approx(a["mAP"])
    for c, row in a["per_class"].items():
        assert b["per_class"][c] == pytest.approx(row), c
    assert b["loss"] is None and a["loss"] is not None
