"""export-onnx, export-trt and infer on a model trained once on tiny generated images."""

import csv
import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_cfg, make_class_folders
from PIL import Image

from image_classifier import runs
from image_classifier.data.datasets import FileDataset
from image_classifier.data.images import Preprocessing, load_array
from image_classifier.errors import ExportError, UserError
from image_classifier.inference.infer import collect_inputs, run_infer
from image_classifier.inference.predictor import load_predictor

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _cuda():
    import torch

    return torch.cuda.is_available()


def _infer(root, *overrides):
    return run_infer(compose_cfg(root, *overrides))


def test_export_onnx_metadata_checker_parity_and_mlflow(trained, exported):
    import onnx
    from mlflow.tracking import MlflowClient

    root, ckpt, _ = trained
    path, result = exported
    assert path == ckpt.with_suffix(".onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = json.loads({p.key: p.value for p in model.metadata_props}["image_classifier"])
    assert meta["classes"] == ["cat", "dog", "fox"]
    assert meta["preprocessing"]["size"] == [16, 16] and meta["preprocessing"]["channels"] == 1
    assert meta["source_checkpoint"] == str(ckpt) and meta["data_hash"]
    assert set(result["parity"]) == {"random", "real"} and max(result["parity"].values()) <= 1e-4
    # dynamic batch axis
    pred = load_predictor(path)
    for n in (1, 5):
        assert pred.predict(np.zeros((n, 1, 16, 16), np.float32)).shape == (n, 3)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    # other tests export more files from the same session-wide run: this export's file is there
    logged = [a.path for a in client.list_artifacts(result["mlflow_run_id"], "export")]
    assert "export/best.onnx" in logged


def test_failed_parity_leaves_no_file(trained, tmp_path):
    from image_classifier.export.onnx import run_export_onnx

    root, ckpt, _ = trained
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="disagree"):
        run_export_onnx(
            compose_cfg(
                root, f"export.checkpoint={ckpt}", f"export.output={out}", "export.tolerance=-1"
            )
        )
    assert list(tmp_path.iterdir()) == []


def test_infer_json_csv_topk_and_sorting(trained, exported, tmp_path, capsys):
    root, _, images = trained
    onnx_path, _ = exported
    one = images / "dog" / "001.png"
    r = _infer(root, f"infer.model={onnx_path}", f"infer.input={one}")
    single = json.loads(capsys.readouterr().out)
    assert set(single) == {"path", "predicted_class", "confidence", "all_predictions"}
    assert list(single["all_predictions"])[0] == single["predicted_class"]
    assert abs(sum(single["all_predictions"].values()) - 1) < 1e-4
    assert r["rows"][0] == single

    out = tmp_path / "preds.csv"
    _infer(
        root,
        f"infer.model={onnx_path}",
        f"infer.input={images}",
        f"infer.output={out}",
        f"infer.sort_into={tmp_path / 'sorted'}",
        "infer.top_k=2",
    )
    rows = list(csv.DictReader(out.open()))
    # the summary counts what the folder came out as, most predicted first
    counts = Counter(r["predicted_class"] for r in rows).most_common()
    err = capsys.readouterr().err
    assert "  predicted classes: " + ", ".join(f"{c} {k}" for c, k in counts) in err, err
    # images in folders named after the classes: how often the folder is the prediction, and how
    # to test the model on them
    same = sum(Path(r["path"]).parent.name == r["predicted_class"] for r in rows)
    assert (
        f"  in folders named after a class: 24 images, {same} ({100 * same / 24:.1f} %) predicted "
        "as their folder; the full report on them: uv run python commands.py command=test "
        f"test.checkpoint={onnx_path} data=folder data.root={images} "
        "data.split=[0,0,1]"
    ) in err, err
    probs = ["prob_cat", "prob_dog", "prob_fox"]  # the model's classes, in its order
    assert len(rows) == 24 and list(rows[0]) == ["path", "predicted_class", "confidence", *probs]
    for row in rows:  # top_k=2: the third class's cell is empty; the first is the prediction
        cells = {p: float(row[p]) for p in probs if row[p]}
        assert len(cells) == 2 and max(cells, key=cells.get) == f"prob_{row['predicted_class']}"
        assert max(cells.values()) == float(row["confidence"])
    sorted_files = list((tmp_path / "sorted").rglob("*.png"))
    assert len(sorted_files) == 24
    assert {p.parent.name for p in sorted_files} <= {"cat", "dog", "fox"}

    js = tmp_path / "preds.json"
    r = _infer(
        root,
        f"infer.model={onnx_path}",
        f"infer.input='{images}/*/00[01].png'",
        f"infer.output={js}",
        "infer.top_k=1",
    )
    listed = json.loads(js.read_text())
    assert len(listed) == 6 and all(len(x["all_predictions"]) == 1 for x in listed)


def test_infer_without_a_model_names_the_newest_it_found(trained, exported, capsys):
    """Without infer.model, infer takes the newest best checkpoint's export: its summary named
    only `best.onnx`, which every run has, so which run answered was not said."""
    root, _, images = trained
    cfg = compose_cfg(root, f"infer.input={images / 'dog' / '001.png'}", "paths.search=[out]")
    model, registered = runs.model_location(cfg, cfg.infer.model, "infer.model")
    run_infer(cfg, model, registered)
    err = capsys.readouterr().err
    assert f"(the newest, {model})" in err and model.suffix == ".onnx"
    # the rate is the images' own, the model's loading said apart (3 images: "0.3 img/s" was 9 s
    # of loading a checkpoint)
    assert re.search(r"in \d+\.\d\ds \(\d+\.\d s loading the model, then [\d,.]+ img/s\)", err)


def test_the_infer_summary_counts_each_label_of_multi_label_rows(capsys):
    from omegaconf import OmegaConf

    from image_classifier.inference.infer import _summary

    rows = [
        {"path": "a.png", "predicted_class": "x", "predicted_labels": ["x", "y"]},
        {"path": "b.png", "predicted_class": "y", "predicted_labels": ["y"]},
        {"path": "c.png", "error": "empty (0 bytes)"},
    ]
    _summary(OmegaConf.create({"output": None, "sort_into": None}), rows, 3, "m", (1.0, 0.0), 0)
    err = capsys.readouterr().err
    assert "Predicted 2 of 3 image(s)" in err and "  predicted labels: y 2, x 1\n" in err


def test_onnx_and_checkpoint_backends_agree(trained, exported):
    root, ckpt, images = trained
    onnx_path, _ = exported
    a = _infer(
        root, f"infer.model={onnx_path}", f"infer.input={images}", f"infer.output={root / 'a.json'}"
    )["rows"]
    b = _infer(
        root, f"infer.model={ckpt}", f"infer.input={images}", f"infer.output={root / 'b.json'}"
    )["rows"]
    assert [x["predicted_class"] for x in a] == [x["predicted_class"] for x in b]
    assert max(abs(x["confidence"] - y["confidence"]) for x, y in zip(a, b, strict=True)) < 1e-4


def test_unreadable_files_become_error_rows(trained, exported, tmp_path):
    root, _, images = trained
    onnx_path, _ = exported
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.png").write_bytes((images / "cat" / "000.png").read_bytes())
    (d / "notes.txt").write_text("not an image")
    data = (images / "cat" / "001.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    from test_images import _png_header_only

    (d / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    listing = tmp_path / "list.txt"
    listing.write_text(
        "\n".join(
            [
                "mixed/good.png",
                "mixed/notes.txt",
                "mixed/truncated.png",
                "mixed/bomb.png",
                "mixed/gone.png",
            ]
        )
    )
    rows = {
        Path(r["path"]).name: r
        for r in _infer(
            root,
            f"infer.model={onnx_path}",
            f"infer.input={listing}",
            f"infer.output={tmp_path / 'o.json'}",
        )["rows"]
    }
    assert (
        rows["good.png"]["predicted_class"] in {"cat", "dog", "fox"}
        and "error" not in rows["good.png"]
    )
    assert "not an image" in rows["notes.txt"]["error"]
    assert "truncated" in rows["truncated.png"]["error"]
    assert "decompression bomb" in rows["bomb.png"]["error"]
    assert "no such file" in rows["gone.png"]["error"]


def test_ctrl_c_part_way_keeps_the_finished_rows(trained, exported, tmp_path, monkeypatch):
    from image_classifier.errors import Interrupted
    from image_classifier.inference import infer

    root, _, images = trained
    onnx_path, _ = exported
    predictor = load_predictor(onnx_path)
    calls, predict = [], predictor.predict

    def interrupted_on_the_third_batch(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict(x)

    monkeypatch.setattr(predictor, "predict", interrupted_on_the_third_batch)
    monkeypatch.setattr(infer, "load_predictor", lambda *a, **k: predictor)
    out = tmp_path / "rows.csv"
    overrides = [f"infer.model={onnx_path}", f"infer.input={images}", "infer.batch_size=5"]
    with pytest.raises(Interrupted, match=f"after 10 of 24 image.*written to {out}"):
        _infer(root, *overrides, f"infer.output={out}", "infer.min_confidence=0.5")
    with out.open() as f:
        kept = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in kept] == [p.name for p in collect_inputs(str(images))][
        :10
    ]
    assert all(r["predicted_class"] in {"cat", "dog", "fox"} for r in kept)
    # the finished rows are marked as a full run marks them
    assert [r["uncertain"] for r in kept] == [
        str(float(r["confidence"]) < 0.5).lower() for r in kept
    ]


def test_bad_model_and_input_paths(trained, exported, tmp_path):
    root, _, images = trained
    onnx_path, _ = exported
    fake = tmp_path / "model.onnx"
    fake.write_text("I am not a model")
    cases = [
        (f"infer.model={tmp_path / 'missing.onnx'}", f"infer.input={images}", "does not exist"),
        (f"infer.model={fake}", f"infer.input={images}", "not a loadable ONNX model"),
        (f"infer.model={tmp_path / 'model.pkl'}", f"infer.input={images}", "does not exist"),
        (
            f"infer.model={onnx_path}",
            f"infer.input={tmp_path}/nothing-*.jpg",
            "matches no image files",
        ),
    ]
    (tmp_path / "model.txt").write_text("x")
    cases.append(
        (
            f"infer.model={tmp_path / 'model.txt'}",
            f"infer.input={images}",
            "Cannot tell the backend",
        )
    )
    fake_ckpt = tmp_path / "model.ckpt"
    fake_ckpt.write_text("nope")
    cases.append((f"infer.model={fake_ckpt}", f"infer.input={images}", "not a readable checkpoint"))
    for model, inp, message in cases:
        with pytest.raises(UserError, match=message):
            _infer(root, model, inp)


def test_one_preprocessing_for_every_image_mode(trained, exported, tmp_path):
    """Training's eval path, and infer reading the ONNX metadata, give identical tensors."""
    _, ckpt, _ = trained
    onnx_path, _ = exported
    pred = load_predictor(onnx_path)
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (21, 37, 3), dtype=np.uint8), "RGB")
    images = {
        "grey.png": base.convert("L"),
        "rgb.png": base,
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "deep.png": Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257),
    }
    paths = []
    for name, im in images.items():
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(tmp_path / "rotated.jpg", exif=exif)
    paths.append(tmp_path / "rotated.jpg")

    import torch

    module_pre = Preprocessing.from_dict(
        torch.load(ckpt, weights_only=True)["image_classifier"]["preprocessing"]
    )
    for pre in (
        module_pre,
        Preprocessing(size=(16, 16), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3),
    ):
        train_eval = FileDataset([(str(p), 0) for p in paths], pre)
        for i, p in enumerate(paths):
            a = train_eval[i][0].numpy()
            b = load_array(p, pred.meta.preprocessing if pre is module_pre else pre)
            assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b), p.name
    assert pred.meta.preprocessing == module_pre


def test_collect_inputs_forms(tmp_path, capsys):
    make_class_folders(tmp_path / "d", per_class=2)
    (tmp_path / "d" / "cat" / "notes.txt").write_text("a stray file train skips too")
    assert len(collect_inputs(str(tmp_path / "d"))) == 6
    said = capsys.readouterr().err
    assert (
        "Skipping 1 file(s) under" in said
        and "not image file names, as train does: cat/notes.txt" in said
    )
    assert len(collect_inputs(str(tmp_path / "d" / "*" / "000.png"))) == 3
    (tmp_path / "list.txt").write_text("d\\cat\\000.png\nd/dog/001.png\n")  # Windows, then not
    assert collect_inputs(str(tmp_path / "list.txt")) == [
        tmp_path / "d" / "cat" / "000.png",
        tmp_path / "d" / "dog" / "001.png",
    ]
    assert len(collect_inputs(str(tmp_path / "d" / "**" / "*.png"))) == 6
    with pytest.raises(UserError, match="not set"):
        collect_inputs("")
    (tmp_path / "urls.txt").write_text("d/cat/000.png\nhttps://host/a.jpg\n")
    with pytest.raises(UserError, match=r"lists 1 URL\(s\) \('https://host/a.jpg'\): download"):
        collect_inputs(str(tmp_path / "urls.txt"))
    with pytest.raises(UserError, match="It is a URL: download the images first"):
        collect_inputs("https://host/a.jpg")
    (tmp_path / "shots.zip").write_bytes(b"PK\x03\x04")
    for spec in (tmp_path / "shots.zip", tmp_path / "gone.tar.gz"):
        with pytest.raises(UserError, match="It is an archive: unpack it"):
            collect_inputs(str(spec))


def test_a_csv_lists_what_infer_predicts(tmp_path):
    """Kaggle's test.csv (an id column, no extension) or a manifest was taken as one file that is
    not an image: one error row. Its file column (or only column) is now the list."""
    make_class_folders(tmp_path / "d", per_class=2)
    (tmp_path / "test.csv").write_text("id\nd/cat/000\nd/dog/001.png\n\n")
    assert collect_inputs(str(tmp_path / "test.csv")) == [
        tmp_path / "d" / "cat" / "000.png",
        tmp_path / "d" / "dog" / "001.png",
    ]
    (tmp_path / "m.csv").write_text("label;path\ncat;d/cat/001.png\n")  # Excel's ";"
    assert collect_inputs(str(tmp_path / "m.csv")) == [tmp_path / "d" / "cat" / "001.png"]
    (tmp_path / "odd.csv").write_text("a,b\nd/cat/000.png,cat\n")
    with pytest.raises(
        UserError,
        match=r"Cannot tell which column of odd.csv holds the image files: columns are "
        r"\['a', 'b'\]. Set infer.file_column=<column>, name it file or filename",
    ):
        collect_inputs(str(tmp_path / "odd.csv"))
    # infer.file_column names it: the list is read; a name it does not have is named back
    assert collect_inputs(str(tmp_path / "odd.csv"), "a") == [tmp_path / "d" / "cat" / "000.png"]
    with pytest.raises(
        UserError, match=r"infer.file_column='A ' is not a column of odd.csv; columns: \['a', 'b'\]"
    ):
        collect_inputs(str(tmp_path / "odd.csv"), "A ")
    with pytest.raises(UserError, match=r"infer.file_column='a' names a column of a CSV list"):
        collect_inputs(str(tmp_path / "d"), "a")  # a folder: the setting would be ignored
    (tmp_path / "urls.csv").write_text("image\nhttps://host/a.jpg\n")
    with pytest.raises(UserError, match=r"urls.csv lists 1 URL\(s\) \('https://host/a.jpg'\)"):
        collect_inputs(str(tmp_path / "urls.csv"))


def test_cuda_provider_that_cannot_start_is_reported(exported, monkeypatch, caplog):
    """ONNX Runtime drops to the CPU quietly when its CUDA provider cannot load: we say so."""
    import onnxruntime as ort

    from image_classifier.inference import predictor

    if predictor.has_nvidia_gpu():
        pytest.skip("a GPU is here, so the CUDA provider starts (tests/test_gpu.py checks it)")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (onnxruntime-gpu is x86-64 Linux)")
    onnx_path, _ = exported
    with pytest.raises(UserError, match="device=cuda was asked for, but there is no NVIDIA GPU"):
        load_predictor(onnx_path, "cuda")
    monkeypatch.setattr(predictor, "has_nvidia_gpu", lambda: True)  # a driver that is not there
    with caplog.at_level("WARNING"):
        p = load_predictor(onnx_path, "auto")
    assert p.providers == ["CPUExecutionProvider"]
    assert (
        "could not start its CUDA provider" in caplog.text and "running on the CPU" in caplog.text
    )
    with pytest.raises(
        UserError,
        match=r"device=cuda was asked for, but ONNX Runtime could not start its CUDA provider"
        r".*Use device=cpu",
    ):
        load_predictor(onnx_path, "cuda")


@pytest.mark.slow
def test_infer_on_onnx_does_not_import_torch(trained, exported):
    root, _, images = trained
    onnx_path, _ = exported
    code = (
        "import runpy, sys, json\n"
        f"sys.argv = ['commands.py', 'command=infer', 'infer.model={onnx_path}', "
        f"'infer.input={images / 'cat' / '000.png'}',"
        f" 'paths.root={root}']\n"
        "runpy.run_path('commands.py', run_name='__main__')\n"
        "heavy = [m for m in ('torch', 'torchvision', 'lightning', 'timm', 'mlflow') if m in "
        "sys.modules]\n"
        "print('HEAVY=' + json.dumps(heavy), file=sys.stderr)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["predicted_class"] in {"cat", "dog", "fox"}
    assert "HEAVY=[]" in p.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    HAS_TRT, reason="TensorRT is installed here; this checks the message when it is not"
)
def test_export_trt_without_tensorrt_exits_2_with_install_line(trained, exported):
    from conftest import run_cli

    root, _, _ = trained
    onnx_path, _ = exported
    p = run_cli("command=export-trt", f"export.trt.onnx={onnx_path}", f"paths.root={root}")
    assert p.returncode == 2
    assert "need" in p.stderr and "uv pip install tensorrt" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.skipif(
    not HAS_TRT, reason="TensorRT is not installable from the registries these machines reach"
)
@pytest.mark.skipif(HAS_TRT and not _cuda(), reason="TensorRT needs a CUDA GPU")
def test_export_trt_engine_parity_and_infer(trained, exported, tmp_path):
    from image_classifier.export.tensorrt import run_export_trt

    root, _, images = trained
    onnx_path, _ = exported
    r = run_export_trt(
        compose_cfg(
            root, f"export.trt.onnx={onnx_path}", f"export.trt.output={tmp_path / 'm.engine'}"
        )
    )
    assert r["parity"] <= 1e-2
    rows = _infer(
        root,
        f"infer.model={tmp_path / 'm.engine'}",
        f"infer.input={images}",
        f"infer.output={tmp_path / 'x.json'}",
    )["rows"]
    assert len(rows) == 24


def test_bad_export_and_infer_settings(trained, exported, tmp_path):
    from image_classifier.export.onnx import run_export_onnx

    root, ckpt, images = trained
    onnx_path, _ = exported
    with pytest.raises(UserError, match="must end in .onnx"):
        run_export_onnx(
            compose_cfg(root, f"export.checkpoint={ckpt}", f"export.output={tmp_path}/m.pt")
        )
    with pytest.raises(UserError, match="use a file name ending in .json or .csv"):
        _infer(
            root,
            f"infer.model={onnx_path}",
            f"infer.input={images}",
            f"infer.output={tmp_path}/o.txt",
        )


def test_flip_tta_in_test_and_in_the_exported_graph(trained, tmp_path, capsys):
    """test.tta and export.tta average the logits of each image and its mirror; the ONNX graph
    computes exactly what the checkpoint does with TTA, and differs from it without."""
    import torch

    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.training.evaluate import run_test

    root, ckpt, _ = trained
    plain = run_test(compose_cfg(root, f"test.checkpoint={ckpt}", f"paths.output_dir={tmp_path}/a"))
    tta = run_test(
        compose_cfg(
            root, f"test.checkpoint={ckpt}", "test.tta=true", f"paths.output_dir={tmp_path}/b"
        )
    )
    said = capsys.readouterr().out
    assert "with hflip TTA (each image and its mirror" in said
    # the tiny CNN trained without flips: mirror TTA on it is named as untried
    assert (
        "WARNING: test.tta=hflip averages each image with its mirror, but this model never" in said
    )
    assert json.loads(Path(tta["report"]).read_text())["tta"] == "hflip"
    assert "train.augment.hflip=false" in json.loads(Path(tta["report"]).read_text())["tta_warning"]
    assert json.loads(Path(plain["report"]).read_text())["tta"] is None
    rows = list(csv.DictReader(Path(tta["predictions"]).read_text().splitlines()))
    assert abs(np.mean([int(r["correct"]) for r in rows]) - tta["accuracy"]) < 1e-6

    out = tmp_path / "tta.onnx"
    r = run_export_onnx(
        compose_cfg(root, f"export.checkpoint={ckpt}", f"export.output={out}", "export.tta=true")
    )
    assert max(r["parity"].values()) <= 1e-4
    assert load_predictor(out).meta.extra["tta"] == "hflip"
    module = ckpt_file.load_module(ckpt).eval()
    x = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (6, 1, 16, 16)).astype(np.float32)
    )
    with torch.inference_mode():
        logits, mirrored = module.net(x), module.net(x.flip(3))
        want = module.probabilities((logits + mirrored) / 2).numpy()
        without = module.probabilities(logits).numpy()
    got = load_predictor(out).predict(x.numpy())
    assert np.abs(got - want).max() < 1e-5 and np.abs(got - without).max() > 1e-6


@pytest.mark.parametrize(
    "hparams, mode, warned",
    [
        (
            {"model": {"name": "cnn"}, "config": {"train": {"augment": {"hflip": False}}}},
            "hflip",
            1,
        ),
        ({"model": {"name": "cnn"}, "config": {"train": {"augment": {"hflip": True}}}}, "hflip", 0),
        ({"model": {"name": "cnn"}, "config": {"train": {"augment": {"hflip": False}}}}, None, 0),
        (
            {"model": {"name": "head"}, "config": {"train": {"augment": {"hflip": True}}}},
            "hflip",
            1,
        ),
        ({"model": {"name": "export"}, "config": {}}, "hflip+shift", 0),  # nothing to go by
    ],
)
def test_mirror_tta_is_named_when_the_model_never_saw_a_mirror(hparams, mode, warned):
    from image_classifier.models.tta import mirror_warning

    said = mirror_warning(hparams, mode, "export.tta")
    assert bool(said) == bool(warned)
    if warned:
        assert said.startswith(f"export.tta={mode} averages each image with its mirror")
        assert f"test.tta=false and test.tta={mode}" in said


def test_flip_and_shift_tta_averages_six_views_in_test_and_in_the_graph(trained, tmp_path, capsys):
    """test.tta=hflip+shift averages the logits of each image and its mirror, each as is and
    moved one pixel left and right (zero fill); the exported graph computes the same."""
    import torch

    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.training.evaluate import run_test

    root, ckpt, _ = trained
    r = run_test(
        compose_cfg(
            root, f"test.checkpoint={ckpt}", "test.tta=hflip+shift", f"paths.output_dir={tmp_path}"
        )
    )
    assert "with hflip+shift TTA" in capsys.readouterr().out
    assert json.loads(Path(r["report"]).read_text())["tta"] == "hflip+shift"

    out = tmp_path / "tta6.onnx"
    run_export_onnx(
        compose_cfg(
            root, f"export.checkpoint={ckpt}", f"export.output={out}", "export.tta=hflip+shift"
        )
    )
    assert load_predictor(out).meta.extra["tta"] == "hflip+shift"
    module = ckpt_file.load_module(ckpt).eval()
    x = torch.from_numpy(
        np.random.default_rng(1).integers(1, 256, (4, 1, 16, 16)).astype(np.float32)
    )
    views = []
    for v in (x, x.flip(3)):
        right, left = torch.zeros_like(v), torch.zeros_like(v)
        right[..., 1:], left[..., :-1] = v[..., :-1], v[..., 1:]
        views += [v, right, left]
    with torch.inference_mode():
        want = module.probabilities(sum(module.net(v) for v in views) / 6).numpy()
    assert np.abs(load_predictor(out).predict(x.numpy()) - want).max() < 1e-5


def test_a_bad_tta_mode_is_named_with_the_options(trained, tmp_path):
    from image_classifier.errors import UserError
    from image_classifier.training.evaluate import run_test

    root, ckpt, _ = trained
    with pytest.raises(UserError, match=r"test.tta='mirror' is not a TTA mode.*hflip\+shift"):
        run_test(compose_cfg(root, f"test.checkpoint={ckpt}", "test.tta=mirror"))


@pytest.mark.parametrize(
    "version, ok",
    [("10.13.3", True), ("11.4.1", True), ("9.3.0", False), ("12.0.0", False), ("dev", False)],
)  # noqa: E501
def test_tensorrt_versions_outside_10_and_11_are_refused_with_the_range(version, ok):
    from image_classifier.errors import UserError
    from image_classifier.export.tensorrt import check_version

    if ok:
        assert check_version(version) == int(version.split(".")[0])
    else:
        with pytest.raises(
            UserError,
            match=f"TensorRT {version} is installed; export-trt supports TensorRT 10.x and 11.x",
        ):  # noqa: E501
            check_version(version)


def test_fp16_graph_for_a_strongly_typed_build_keeps_float32_io_and_the_predictions(
    exported, tmp_path
):
    """What export-trt's fp16 build reads (TensorRT 11 takes precision from the graph), run here
    with ONNX Runtime on the CPU: float32 in and out, float16 inside, the same answers."""
    import onnx

    from image_classifier.export.tensorrt import float16_graph
    from image_classifier.inference.predictor import OnnxPredictor

    path, _ = exported
    half = float16_graph(path, tmp_path / "half.onnx")
    graph = onnx.load(str(half)).graph
    assert {i.type.tensor_type.elem_type for i in [*graph.input, *graph.output]} == {
        onnx.TensorProto.FLOAT
    }
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    x = np.random.default_rng(0).integers(0, 256, (8, 1, 16, 16)).astype(np.float32)
    full = OnnxPredictor(path, device="cpu").predict(x)
    # the metadata travels with the graph, so the fp16 file describes itself too
    reduced = OnnxPredictor(half, device="cpu").predict(x)
    assert np.abs(full - reduced).max() < 1e-2
    assert (full.argmax(1) == reduced.argmax(1)).all()


def test_a_checkpoint_and_its_onnx_export_describe_the_model_the_same_way(trained, exported):
    """One description (models/description.py): what the ONNX file carries and what the PyTorch
    predictor reads from the .ckpt agree, so serve names and treats both alike."""
    from image_classifier.inference.predictor import load_predictor

    _, ckpt, _ = trained
    onnx, _ = exported
    by_ckpt, by_onnx = load_predictor(ckpt).meta, load_predictor(onnx).meta
    same = ("classes", "preprocessing", "model", "temperature", "tta", "data_hash", "data_name")
    assert {k: by_ckpt.extra.get(k) for k in same} == {k: by_onnx.extra.get(k) for k in same}
    assert by_ckpt.name == by_onnx.name and by_ckpt.extra["data_name"]


def test_a_checkpoint_predicts_without_lightning_as_the_trained_module_does(trained, tmp_path):
    """The .ckpt predictor loads the network alone (`open_network`): the same probabilities and
    description as the LightningModule, and neither Lightning nor torchmetrics imported (their
    imports were 3 of a .ckpt infer's 5 s)."""
    import subprocess
    import sys

    import torch

    from image_classifier.inference.predictor import load_predictor
    from image_classifier.models import checkpoint as ckpt_file
    from image_classifier.models.description import model_description

    _, ckpt, _ = trained
    module = ckpt_file.load_module(ckpt).eval()
    module.temperature.fill_(1.7)  # a value the network must take from the file, not a default
    torch.save(
        {**torch.load(ckpt, weights_only=True), "state_dict": module.state_dict()},
        tmp_path / "warm.ckpt",
    )
    predictor = load_predictor(tmp_path / "warm.ckpt", device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = module.probabilities(module.net(torch.from_numpy(x))).numpy()
    assert np.abs(predictor.predict(x) - expected).max() < 1e-6
    described = model_description(module, tmp_path / "warm.ckpt")
    assert predictor.meta.extra["temperature"] == pytest.approx(1.7)
    assert {k: predictor.meta.extra.get(k) for k in described} == described
    probe = (
        "import sys, numpy as np\n"
        "from image_classifier.inference.predictor import load_predictor\n"
        f"p = load_predictor({str(ckpt)!r}, device='cpu')\n"
        "p.predict(np.zeros((1, 1, 16, 16), np.float32))\n"
        "print(sorted(m for m in ('lightning', 'torchmetrics') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_export_checks_parity_on_the_images_the_checkpoint_carries(trained, tmp_path, capsys):
    """Real-image parity needs nothing but the checkpoint: the data folder is gone here."""
    import shutil

    import torch

    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.models import checkpoint as ckpt_file

    root, ckpt, images = trained
    module, stored = ckpt_file.open_module(ckpt)
    carried = stored["parity_images"]
    pre = module.hparams.preprocessing
    assert carried.dtype == torch.uint8 and tuple(carried.shape[1:]) == (
        pre["channels"],
        *pre["size"],
    )
    moved = shutil.copy(ckpt, tmp_path / "alone.ckpt")  # no project, no data beside it
    r = run_export_onnx(compose_cfg(tmp_path, f"export.checkpoint={moved}", "logger.enabled=false"))
    assert set(r["parity"]) == {"random", "real"} and max(r["parity"].values()) <= 1e-4
    assert f"8 random, {len(carried)} real images the checkpoint carries" in capsys.readouterr().out
    limited = run_export_onnx(
        compose_cfg(
            tmp_path,
            f"export.checkpoint={moved}",
            f"export.output={tmp_path}/three.onnx",
            "export.parity_images=3",
            "logger.enabled=false",
        )
    )
    assert set(limited["parity"]) == {"random", "real"}
    assert "8 random, 3 real images" in capsys.readouterr().out


@pytest.mark.slow
def test_test_and_export_follow_the_recipes_tta_stored_in_the_checkpoint(trained, tmp_path):
    """A recipe's test.tta / export.tta (experiment=fmnist_fast sets both) reach `command=test`
    and `command=export-onnx` on its checkpoint without repeating the recipe; a value on the
    command line wins."""
    import torch
    from conftest import run_cli

    from image_classifier.models import checkpoint as ckpt_file

    root, ckpt, _ = trained
    stored = ckpt_file.read(ckpt)
    config = stored["hyper_parameters"]["config"]
    config["test"]["tta"] = config["export"]["tta"] = "hflip"  # as the recipe would have set
    recipe = tmp_path / "recipe.ckpt"
    torch.save(stored, recipe)

    def tested(*overrides):
        out = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        p = run_cli(
            "command=test",
            f"test.checkpoint={recipe}",
            f"paths.root={root}",
            f"paths.output_dir={out}",
            "logger.enabled=false",
            *overrides,
        )
        assert p.returncode == 0, p.stderr
        return json.loads((out / "test_report.json").read_text())["tta"]

    assert tested() == "hflip"
    assert tested("test.tta=false") is None
    assert tested("test.tta=hflip+shift") == "hflip+shift"
    p = run_cli(
        "command=export-onnx",
        f"export.checkpoint={recipe}",
        f"paths.root={root}",
        "logger.enabled=false",
    )
    assert p.returncode == 0, p.stderr
    assert load_predictor(recipe.with_suffix(".onnx")).meta.extra["tta"] == "hflip"


def test_infer_says_how_often_folder_names_agree_only_where_they_name_classes(tmp_path):
    from image_classifier.inference.infer import folder_agreement

    def rows(*pairs):
        return [{"path": f"in/{f}/{i}.png", "predicted_class": p} for i, (f, p) in enumerate(pairs)]

    model = tmp_path / "m.onnx"  # "in" is no folder here: no test command to offer
    some = rows(("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("owl", "cat"))
    assert folder_agreement(some, ["cat", "dog"], "in", model) == (
        "  in folders named after a class: 3 images, 2 (66.7 %) predicted as their folder; 1 in "
        "folders of no class (owl)"
    )
    flat = rows(("photos", "cat"), ("photos", "dog"), ("cat", "cat"))  # one image in "cat"
    assert folder_agreement(flat, ["cat", "dog"], "in", model) == ""
    nested = rows(("cat/2024", "cat"), ("cat/2024", "dog"), ("dog/dog", "dog"), ("dog/cat", "dog"))
    assert folder_agreement(nested, ["cat", "dog"], "in", model) == (  # as train reads them
        "  in folders named after a class: 4 images, 3 (75.0 %) predicted as their folder"
    )
    one = [{"path": f"in/x{i}.png", "predicted_class": "cat"} for i in range(2)]  # infer.input=in
    assert folder_agreement(one, ["cat", "in"], "in", model).startswith("  in folders named")
    (tmp_path / "cat" / "2024").mkdir(parents=True)  # a real folder: the test command is offered
    cats = [
        {"path": str(tmp_path / "cat" / "2024" / f"{i}.png"), "predicted_class": "cat"}
        for i in range(2)
    ]
    assert "data.root=" in folder_agreement(cats, ["cat", "dog"], str(tmp_path), model)
    # ... but not for one class's folder, whose subfolders a test would read as classes
    assert folder_agreement(cats, ["cat", "dog"], str(tmp_path / "cat"), model) == (
        "  in folders named after a class: 2 images, 2 (100.0 %) predicted as their folder"
    )
    many = [{**r, "predicted_labels": ["cat"]} for r in some]
    assert folder_agreement(many, ["cat", "dog"], "in", model) == ""  # multi-label


def test_infer_min_confidence_marks_rows_below_it_and_sorts_them_aside(
    trained, exported, tmp_path, capsys
):
    """Rows below infer.min_confidence keep their prediction and say `uncertain`; sort_into
    puts those images in _uncertain/, and the summary counts them. The floor is the tiny
    model's median confidence, so both sides hold images."""
    root, _, images = trained
    onnx_path, _ = exported
    out, review = tmp_path / "preds.csv", tmp_path / "review"
    overrides = [f"infer.model={onnx_path}", f"infer.input={images}", f"infer.output={out}"]
    floor = round(float(np.median([x["confidence"] for x in _infer(root, *overrides)["rows"]])), 6)
    r = _infer(root, *overrides, f"infer.min_confidence={floor}", f"infer.sort_into={review}")
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:4] == ["path", "predicted_class", "confidence", "uncertain"]
    below = [row for row in rows if float(row["confidence"]) < floor]
    assert 0 < len(below) < len(rows)
    assert [row["uncertain"] for row in rows] == [
        "true" if float(row["confidence"]) < floor else "false" for row in rows
    ]
    assert [x["uncertain"] for x in r["rows"]] == [float(x["confidence"]) < floor for x in rows]
    assert len(list((review / "_uncertain").glob("*.png"))) == len(below)
    assert len(list(review.rglob("*.png"))) == len(rows)
    assert f"; {len(below)} uncertain (below {floor}); " in capsys.readouterr().err


def test_infer_min_confidence_is_refused_for_a_multi_label_model_before_predicting():
    from types import SimpleNamespace

    from image_classifier.inference.infer import check_floor

    meta = SimpleNamespace(multi_label=True, classes=["a", "b"])
    with pytest.raises(
        UserError,
        match=r"min_confidence=0.8 is for single-label models; .* set "
        r"infer.threshold instead",
    ):
        check_floor(meta, SimpleNamespace(min_confidence=0.8, get=lambda k: 0.8))
    single = SimpleNamespace(multi_label=False, classes=["a", "b"])
    assert check_floor(single, SimpleNamespace(get=lambda k: 0.8)) == ["a", "b"]


def test_command_test_on_an_export_reports_what_its_checkpoint_does(trained, exported, tmp_path):
    """test.checkpoint=best.onnx was refused ("this command reads the training checkpoint").
    Through ONNX Runtime on the split its metadata names, the report is the checkpoint's, less
    what only training keeps: the loss and the ECE without the temperature."""
    import onnx

    from image_classifier.training.test_export import run_any_test

    root, ckpt, images = trained
    onnx_path, _ = exported
    a = run_any_test(compose_cfg(root, f"test.checkpoint={ckpt}", f"paths.output_dir={tmp_path}/a"))
    b = run_any_test(
        compose_cfg(root, f"test.checkpoint={onnx_path}", f"paths.output_dir={tmp_path}/b")
    )
    ra, rb = (json.loads(Path(r["report"]).read_text()) for r in (a, b))
    assert rb["data"]["test_images"] == ra["data"]["test_images"] > 0
    assert rb["confusion_matrix"] == ra["confusion_matrix"]
    assert rb["per_class"] == ra["per_class"]
    assert rb["accuracy"] == pytest.approx(ra["accuracy"]) and rb["ece"] == pytest.approx(
        ra["ece"], abs=1e-4
    )
    assert rb["loss"] is None and rb["ece_uncalibrated"] is None and ra["loss"] is not None
    assert [r["answered"] for r in rb["by_confidence"]] == [
        pytest.approx(r["answered"]) for r in ra["by_confidence"]
    ]
    assert (
        Path(b["predictions"]).is_file() and not (tmp_path / "b" / "plots" / "curves.png").exists()
    )

    # an export from before exports carried their data config: the data must be named
    old = onnx.load(str(onnx_path))
    meta = json.loads(old.metadata_props[0].value)
    meta.pop("data_config")
    old.metadata_props[0].value = json.dumps(meta)
    onnx.save(old, str(tmp_path / "old.onnx"))
    cfg = compose_cfg(root, f"test.checkpoint={tmp_path / 'old.onnx'}")
    with pytest.raises(
        UserError, match=r"exported before exports carried their data config: name "
    ):
        run_any_test(cfg)
    named = compose_cfg(
        root,
        f"test.checkpoint={tmp_path / 'old.onnx'}",
        "data=folder",
        f"data.root={images}",
        "data.split=[0,0,1]",
        f"paths.output_dir={tmp_path}/c",
    )
    assert run_any_test(named, use_checkpoint_data=False)["accuracy"] >= 0
    with pytest.raises(UserError, match=r"test.tta=true applies to a checkpoint; .* Drop test.tta"):
        run_any_test(compose_cfg(root, f"test.checkpoint={onnx_path}", "test.tta=true"))


def test_a_grey_model_given_colour_images_says_it_sees_them_in_grey(tmp_path, trained, capsys):
    """The tour's mistake: a model trained on grey images run on colour photos answers with
    confidence all the same. Colour inputs get a warning; grey pictures saved in a colour mode
    (RGB JPEGs) do not, nor does a colour model."""
    from image_classifier.inference.infer import colour_note
    from image_classifier.inference.meta import ModelMeta

    root, ckpt, _ = trained
    colour = make_class_folders(tmp_path / "colour", per_class=4, mode="RGB")
    _infer(root, f"infer.model={ckpt}", f"infer.input={colour}")
    err = capsys.readouterr().err
    assert (
        "WARNING: 12 of 12 sampled images are in colour, and images-cnn was trained on grey" in err
    )
    grey_rgb = make_class_folders(tmp_path / "grey", per_class=4)
    for p in grey_rgb.rglob("*.png"):
        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=80)
        p.unlink()
    _infer(root, f"infer.model={ckpt}", f"infer.input={grey_rgb}")
    assert "sampled images are in colour" not in capsys.readouterr().err
    paths = sorted(colour.rglob("*.png"))
    rgb = ModelMeta(["a"], Preprocessing((16, 16), 3, (0.5,) * 3, (0.5,) * 3), {})
    assert colour_note(paths, rgb) == ""


def test_infer_with_no_readable_input_writes_the_rows_and_exits_2(tmp_path, trained):
    """Every input unreadable ended with exit 0, as if the folder had been predicted: now the
    rows with their reasons are written first, then the run stops as bad input does (exit 2)."""
    root, ckpt, _ = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not an image")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "rows.csv"
    with pytest.raises(
        UserError,
        match=r"None of the 2 input\(s\) could be read as an image; each "
        f"row, written to {out}, holds its reason",
    ):
        _infer(root, f"infer.model={ckpt}", f"infer.input={bad}", f"infer.output={out}")
    rows = list(csv.DictReader(out.open()))
    assert [r["error"] != "" for r in rows] == [True, True]
    (bad / "c.png").write_bytes((root / "images" / "cat" / "000.png").read_bytes())
    assert len(_infer(root, f"infer.model={ckpt}", f"infer.input={bad}")["rows"]) == 3  # one read


def test_sort_into_gives_classes_that_would_share_a_folder_one_each(tmp_path):
    """`Cat` and `cat` are one folder on macOS's and Windows' disks, `a/b` and `a_b` one anywhere,
    and a class named `_uncertain` would take the unsure images' folder: each gets its own."""
    from image_classifier.inference.sorting import class_dirs, sort_into

    classes = ["Cat", "cat", "a/b", "a_b", "_uncertain", "dog"]
    dirs = class_dirs(classes)
    assert dirs == {
        "Cat": "Cat",
        "cat": "cat (2)",
        "a/b": "a_b",
        "a_b": "a_b (2)",
        "_uncertain": "_uncertain (2)",
        "dog": "dog",
    }
    src = tmp_path / "x.png"
    Image.new("L", (4, 4)).save(src)
    rows = [{"path": str(src), "predicted_class": c} for c in classes]
    rows.append({"path": str(src), "predicted_class": "dog", "uncertain": True})
    assert sort_into(rows, tmp_path / "out", "copy", classes) == 7
    made = sorted(p.parent.name for p in (tmp_path / "out").rglob("x.png"))
    assert made == sorted([*dirs.values(), "_uncertain"])


def test_the_python_use_docs_show_runs_as_written(trained, exported, tmp_path, capsys):
    """docs/commands.md's "From Python" block, run with this session's model and two images in
    place of its names (a cat that is a PNG of the first class, a dog that is not an image)."""
    import re

    text = (ROOT / "docs" / "commands.md").read_text()
    block = re.search(r"### From Python\n.*?```python\n(.*?)```", text, re.S).group(1)
    model, (_, _, images) = exported[0], trained
    cat = next((images / sorted(p.name for p in images.iterdir())[0]).iterdir())
    (tmp_path / "dog.png").write_text("not an image")
    code = block.replace('"best.onnx"', repr(str(model)))
    code = code.replace('"cat.jpg"', repr(str(cat))).replace(
        '"dog.png"', repr(str(tmp_path / "dog.png"))
    )
    exec(compile(code, "docs/commands.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    classes = load_predictor(model).meta.classes
    assert out[0].startswith(str(classes))
    assert out[1].split()[1] in classes and out[1].endswith("None")  # the cat: a prediction
    assert " None None " in out[2] and "dog.png" in out[2]  # the dog: its reason instead
    assert out[3] == out[1].split()[1]  # the same image from memory, the same answer
