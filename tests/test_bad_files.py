"""The bad-file matrix: one folder with every pathological kind of file, mixed with good images,
through every command that reads images. Each command finishes (or answers 4xx), names each bad
file with its reason, counts them, and prints no traceback. The in-process part runs several times,
with threads and with PIL's bomb warning turned into an error (the race that once crashed train).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import class_image, make_class_folders, run_cli
from PIL import Image

from image_classifier.data.images import MAX_PIXELS, ImageError, display_name, open_image
from image_classifier.data.layouts import discover

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
NON_UTF8 = os.fsdecode(b"caf\xe9-latin1.png")  # a Latin-1 name: not valid UTF-8


def _with_dims(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """A real small PNG/JPEG whose header claims w x h (what a decompression bomb looks like)."""
    b = bytearray(data)
    if fmt == "png":
        ihdr = b[12:29]
        ihdr[4:12] = struct.pack(">II", w, h)
        b[12:29] = ihdr
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    else:
        i = b.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
        b[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def good_kinds(rng) -> dict[str, bytes]:
    """Unusual but valid images: every command must use them, not skip them."""
    grey = Image.fromarray(class_image(0, rng, 24))
    rgb = grey.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [grey, Image.fromarray(class_image(1, rng, 24))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    pal = grey.convert("P")
    return {
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "sixteen_bit.png": _encoded(
            Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257), "PNG"
        ),
        "palette_transparent.png": _encoded(pal, "PNG", transparency=0),
        "exif_rotated.jpg": _encoded(rgb, "JPEG", exif=exif),
        "animated.gif": gif.getvalue(),
    }


def bad_kinds(rng) -> dict[str, tuple[bytes | None, str]]:
    """name -> (content, a word the reason must contain); None content: made specially."""
    png = _encoded(Image.fromarray(class_image(2, rng, 24)), "PNG")
    jpg = _encoded(Image.fromarray(class_image(2, rng, 24)), "JPEG")
    return {
        "huge.png": (_with_dims(png, "png", 20000, 20000), "20000x20000 exceeds the pixel limit"),
        "huge.jpg": (_with_dims(jpg, "jpeg", 20000, 20000), "20000x20000 exceeds the pixel limit"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "empty.png": (b"", "empty"),
        "text.jpg": (b"this is not an image\n" * 20, "not an image PIL can read: a text file"),
        # a scraped folder's failed download, and a document: each named for what it is
        "page.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "an HTML page"),
        "scan.png": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document"),
        "loop.png": (None, "symlink"),
        NON_UTF8: (png, "UTF-8"),
    }


def make_bad_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 10) -> dict:
    """Class folders of good images plus every bad kind; returns {display name: reason word}."""
    rng = np.random.default_rng(0)
    expected = {}
    for label, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, rng, 24)).save(d / f"{i:03d}.png")
    first = root / classes[0]
    for name, data in good_kinds(rng).items():
        (first / name).write_bytes(data)
    for k, (name, (data, word)) in enumerate(bad_kinds(rng).items()):
        target = root / classes[k % len(classes)] / name
        if data is None:
            target.symlink_to(target.name)  # points at itself: a loop
        else:
            target.write_bytes(data)
        expected[display_name(target.name)] = word
    (first / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))  # never listed
    locked = root / classes[1] / "locked.png"
    locked.write_bytes(_encoded(Image.fromarray(class_image(1, rng, 24)), "PNG"))
    locked.chmod(0)
    if not ROOT_USER:  # root reads a mode-000 file anyway
        expected["locked.png"] = "permission denied"
    return expected


def make_presplit(root: Path) -> dict:
    expected = {}
    for split in ("train", "val"):
        for name, word in make_bad_folder(root / split).items():
            expected[name] = word
    return expected


def make_manifest(root: Path) -> dict:
    expected = make_bad_folder(root / "images")
    rows = [("file", "label")]
    for d in sorted((root / "images").iterdir()):
        for f in sorted(d.iterdir()):
            if f.name not in (".DS_Store", NON_UTF8):  # a manifest is UTF-8 text
                rows.append((str(f.relative_to(root)), d.name))
    rows.append(("images/cat/missing.png", "cat"))
    expected["missing.png"] = "no such file"
    expected.pop(display_name(NON_UTF8))
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return expected


@pytest.fixture(autouse=True)
def _unlock(tmp_path):
    yield
    for p in tmp_path.rglob("locked.png"):
        p.chmod(0o644)


def _assert_named(text: str, expected: dict[str, str]):
    for name, word in expected.items():
        lines = [ln for ln in text.splitlines() if name in ln]
        assert lines, f"{name} is not named in:\n{text[-3000:]}"
        assert any(word.lower() in ln.lower() for ln in lines), (name, word, lines)


def _assert_clean(proc):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    return out


# -- in process, repeated: threads, and PIL's warning as an error --------------------------------
@pytest.mark.parametrize("escalate", [False, True], ids=["default-warnings", "bomb-warning-error"])
def test_each_kind_is_refused_with_its_reason(tmp_path, escalate):
    expected = make_bad_folder(tmp_path / "data")
    with warnings.catch_warnings():
        if escalate:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        for _ in range(5):  # the threaded scan, again and again: no race may let a warning out
            samples = discover(tmp_path / "data")
            skipped = {Path(p).name: why for p, why in samples.skipped.items()}
            for name, word in expected.items():
                assert word.lower() in skipped.get(name, "").lower(), (name, skipped.get(name))
            used = {Path(p).name for items in samples.splits.values() for p, _ in items}
            assert {
                "cmyk.jpg",
                "sixteen_bit.png",
                "palette_transparent.png",
                "exif_rotated.jpg",
                "animated.gif",
            } <= used
            assert len(samples.skipped) == len(expected)


def test_between_our_limit_and_pils_own_guard_is_refused_by_size(tmp_path):
    png = _encoded(Image.new("L", (8, 8)), "PNG")
    side = int((4 * MAX_PIXELS) ** 0.5) + 1000  # above PIL's own guard too: still one clear refusal
    for w, h in ((20000, 20000), (side, side)):
        p = tmp_path / f"{w}.png"
        p.write_bytes(_with_dims(png, "png", w, h))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ImageError, match="exceeds the pixel limit"):
                open_image(p)


def test_infer_serve_and_mlflow_model_survive_every_kind(tmp_path, trained, exported):
    from fastapi.testclient import TestClient

    from image_classifier.export.mlflow_model import ImageClassifierModel
    from image_classifier.inference.infer import collect_inputs
    from image_classifier.inference.predictor import load_predictor
    from image_classifier.inference.rows import predict_paths
    from image_classifier.serving.app import create_app

    expected = make_bad_folder(tmp_path / "data")
    onnx, _ = exported
    predictor = load_predictor(onnx)
    model = ImageClassifierModel()
    model.predictor = predictor
    files = [p for p in sorted((tmp_path / "data").rglob("*")) if not p.is_dir()]
    with TestClient(create_app(predictor)) as client, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for _ in range(3):
            rows = predict_paths(predictor, collect_inputs(str(tmp_path / "data")), batch_size=4)
            errors = {Path(r["path"]).name: r["error"] for r in rows if r.get("error")}
            for name, word in expected.items():
                assert word.lower() in errors.get(name, "").lower(), (name, errors.get(name))
            assert len(errors) == len(expected)
            for f in files:
                if f.is_symlink() or display_name(f.name) != f.name:
                    continue  # an upload is bytes: no file name, no link
                data = f.read_bytes() if os.access(f, os.R_OK) else b""
                r = client.post("/predict", files={"file": ("x", data)})
                # sent as bytes, a .DS_Store is one more thing that is not an image
                bad = f.name in (*expected, ".DS_Store") or f.name == "locked.png" and not data
                assert (r.status_code >= 400) == bad, (f.name, r.status_code, r.text)
                assert r.status_code < 500, (f.name, r.text)
            model_rows = model.predict(
                None,
                [f.read_bytes() for f in files if os.access(f, os.R_OK) and not f.is_symlink()],
            )
            assert sum(1 for r in model_rows if r.get("error")) >= 5
            assert all(r.get("error") or r["predicted_class"] for r in model_rows)


# -- every command, as a user runs it -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "presplit", "csv"])
def test_train_on_every_layout_skips_and_names_bad_files(tmp_path, layout):
    make = {"folder": make_bad_folder, "presplit": make_presplit, "csv": make_manifest}[layout]
    expected = make(tmp_path / "data")
    proc = run_cli(
        "command=train",
        "data=folder",
        f"data.root={tmp_path / 'data'}",
        "data.size=[16,16]",
        "train.epochs=1",
        "train.num_workers=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"paths.root={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    out = _assert_clean(proc)
    count = len(expected) * (2 if layout == "presplit" else 1)
    assert f"{count} file(s) skipped" in out or f"{count} unusable files skipped" in out, out
    listed = (tmp_path / "run" / "unusable_files.csv").read_text(encoding="utf-8")
    _assert_named(listed, expected)
    if layout == "folder":  # the example from the bug report: the message a user sees
        assert "refused: 20000x20000 exceeds the pixel limit" in out


@pytest.mark.slow
def test_test_cache_features_audit_and_infer_commands_on_a_bad_folder(tmp_path, trained, exported):
    _, ckpt, _ = trained
    onnx, _ = exported
    data = tmp_path / "data"
    expected = make_bad_folder(data)
    common = (
        "data=folder",
        f"data.root={data}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"paths.root={tmp_path}",
    )

    proc = run_cli(
        "command=test", f"test.checkpoint={ckpt}", *common, f"hydra.run.dir={tmp_path / 'test'}"
    )
    out = _assert_clean(proc)
    assert f"unusable: {len(expected)} file(s) skipped" in out
    _assert_named((tmp_path / "test" / "unusable_files.csv").read_text(encoding="utf-8"), expected)

    proc = run_cli(
        "command=cache-features",
        "features.backbone=resnet18",
        "features.pretrained=false",
        "features.size=[32,32]",
        f"features.dir={tmp_path / 'cache'}",
        *common,
        f"hydra.run.dir={tmp_path / 'features'}",
    )
    out = _assert_clean(proc)
    assert f"unusable: {len(expected)} file(s) skipped" in out
    _assert_named((tmp_path / "features" / "unusable_files.csv").read_text("utf-8"), expected)
    # the head trains on this cache with the same data, features and paths settings, as typed
    assert (
        "  next: uv run python commands.py command=train model=head features.backbone=resnet18 "
        f"features.pretrained=false 'features.size=[32,32]' features.dir={tmp_path / 'cache'} "
        f"data=folder data.root={data} paths.root={tmp_path}\n"
    ) in out, out

    proc = run_cli("command=audit", *common, f"hydra.run.dir={tmp_path / 'audit'}")
    out = _assert_clean(proc)
    assert f"unusable files: {len(expected)}" in out
    report = json.loads((tmp_path / "audit" / "audit" / "report.json").read_text("utf-8"))
    _assert_named(
        "\n".join(f"{u['path']}: {u['reason']}" for u in report["unusable_files"]), expected
    )

    listing = tmp_path / "list.txt"
    listing.write_text(
        "\n".join(
            os.fsdecode(p).encode("utf-8", "replace").decode() for p in sorted(data.rglob("*.png"))
        ),
        encoding="utf-8",
    )
    shutil.copy(sorted(data.rglob("huge.png"))[0], tmp_path / "one_huge.png")
    inputs = {
        "file": tmp_path / "one_huge.png",
        "folder": data,
        "glob": f"{data}/*/*",
        "list": listing,
    }
    for kind, spec in inputs.items():
        out_csv = tmp_path / f"preds-{kind}.csv"
        proc = run_cli(
            "command=infer", f"infer.model={onnx}", f"infer.input={spec}", f"infer.output={out_csv}"
        )
        if kind == "file":  # nothing readable: the row is written, then exit 2
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert "None of the 1 input(s) could be read as an image" in proc.stderr
        out = proc.stdout + proc.stderr if kind == "file" else _assert_clean(proc)
        assert "unreadable" in out, (kind, out)
        written = out_csv.read_text(encoding="utf-8")
        if kind == "file":
            assert "20000x20000 exceeds the pixel limit" in written
        elif kind in ("folder", "glob"):
            _assert_named(written, expected)


def test_a_class_folder_named_in_another_encoding_is_named_with_the_fix(tmp_path):
    """It said "has no images (12 other file(s))": each of its images was skipped as a file
    whose name is not UTF-8, though the folder's name was the one to fix."""
    from image_classifier.data.images import path_problem
    from image_classifier.data.layouts import discover
    from image_classifier.errors import UserError

    root = make_class_folders(tmp_path / "d", ("cat", "dog"), per_class=3)
    latin = root / os.fsdecode(b"caf\xe9")
    (root / "dog").rename(latin)
    with pytest.raises(UserError) as e:
        discover(root)
    assert str(e.value) == (
        f"Class folder '{root}/caf\\udce9': its name is not valid UTF-8. Rename it."
    )
    assert path_problem(latin / "000.png") == (
        "a folder's name in its path is not valid UTF-8 (rename the folder)"
    )
