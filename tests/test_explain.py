"""command=explain and test's mistakes_explained.png: Grad-CAM maps checked against a hand
computation, the layouts of the networks it takes, and the command's outputs and refusals."""

import csv
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, run_cli

from image_classifier import runs
from image_classifier.data.images import display_name
from image_classifier.errors import UserError
from image_classifier.inference.explain import Explainer, Split, gallery_rows, run_explain
from image_classifier.models.factory import MostFrequentClass, Normalized
from image_classifier.models.module import ClassifierModule


def _module(name: str, size=(16, 16), in_chans=1, classes=("a", "b", "c"), **model):
    pre = {"size": list(size), "channels": in_chans, "mean": [0.5] * in_chans}
    pre |= {"std": [0.5] * in_chans, "resize": "stretch"}
    torch.manual_seed(0)
    return ClassifierModule({"name": name, **model}, list(classes), pre, optim={}).eval()


def _explain(cfg):
    """run_explain with the checkpoint resolved as commands.py resolves it."""
    return run_explain(cfg, runs.network_checkpoint(cfg, cfg.explain.model, "explain.model"))


def _by_hand(module, x: torch.Tensor, target: list[int]) -> np.ndarray:
    """Grad-CAM from its definition: the last feature map's channels weighted by the mean
    gradient of the target logit, summed, negatives cut, bilinear to the input, max 1."""
    net = module.net.net
    f = net.forward_features(module.net.normalize(x))
    f.retain_grad()
    logits = net.forward_head(f)
    logits[torch.arange(len(x)), target].sum().backward()
    cam = F.relu((f.grad.mean((2, 3), keepdim=True) * f).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).detach().numpy()


def test_maps_equal_grad_cam_by_hand_for_the_predicted_and_a_named_class():
    module = _module("cnn", channels=[8, 16])
    images = np.random.default_rng(0).integers(0, 255, (4, 1, 16, 16), dtype=np.uint8)
    explainer = Explainer(module)
    heat, probs, chosen = explainer(images)
    x = torch.from_numpy(images).float()
    with torch.no_grad():
        expected = module.probabilities(module.net(x)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert chosen == expected.argmax(1).tolist()
    np.testing.assert_allclose(heat, _by_hand(module, x, chosen), atol=1e-5)
    heat_b, _, chosen_b = explainer(images, [1, 1, 1, 1])
    assert chosen_b == [1, 1, 1, 1]
    np.testing.assert_allclose(heat_b, _by_hand(module, x, [1, 1, 1, 1]), atol=1e-5)
    assert heat.shape == (4, 16, 16) and heat.max() <= 1 and heat.min() >= 0


@pytest.mark.parametrize(
    "name, size, grid, spec",
    [
        ("resnet10t", (64, 48), (2, 2), {}),  # NCHW, stride 32
        ("swin_tiny_patch4_window7_224", (224, 224), (7, 7), {}),  # NHWC
        ("head", (64, 64), (2, 2), {"backbone": "resnet10t", "dim": 512}),  # backbone, then head
    ],
)
def test_each_layout_keeps_the_networks_answer_and_maps_its_grid(name, size, grid, spec):
    module = _module(name, size=size, in_chans=3, **spec)
    explainer = Explainer(module)
    assert explainer.split.map_shape == grid
    images = np.random.default_rng(1).integers(0, 255, (2, 3, *size), dtype=np.uint8)
    x = torch.from_numpy(images).float()
    with torch.no_grad():
        np.testing.assert_allclose(
            explainer.split(x).numpy(), module.net(x).numpy(), rtol=1e-5, atol=1e-5
        )
    heat, _, _ = explainer(images)
    assert heat.shape == (2, *size) and np.isclose(heat.max(), 1.0)


def test_a_network_with_no_feature_map_is_refused_with_the_reason():
    net = Normalized(MostFrequentClass(1, 3), [0.5], [0.5])
    with pytest.raises(UserError, match="model 'baseline' has no feature map.*most frequent"):
        Split(net, (16, 16), "baseline")
    vit = _module("vit_tiny_patch16_224", size=(224, 224), in_chans=3)
    with pytest.raises(UserError, match="3-D feature .* not a map of the image.*Swin"):
        Explainer(vit)


def test_the_gallery_takes_each_predicted_class_in_turn():
    rows = [{"overlay": f"{c}{i}.png", "predicted_class": c} for c in "aab" for i in range(3)]
    rows.insert(1, {"path": "broken.jpg", "error": "truncated"})
    shown = gallery_rows(rows, 4)
    assert [r["predicted_class"] for r in shown] == ["a", "b", "a", "b"]


def test_explain_writes_an_overlay_per_image_a_table_and_a_gallery(
    trained, exported, tmp_path, capsys
):
    root, ckpt, images = trained
    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    latin1 = folder / "dog" / os.fsdecode(b"caf\xe9.png")  # a name that is not UTF-8
    shutil.copy(images / "dog" / "000.png", latin1)
    out = tmp_path / "maps"
    onnx, _ = exported
    r = _explain(
        compose_cfg(
            root, f"explain.input={folder}", f"explain.output={out}", f"explain.model={onnx}"
        )
    )
    files = sorted(p for p in folder.rglob("*.png"))
    assert len(r["rows"]) == len(files) == 26
    said = capsys.readouterr().err
    assert "Explained 24 of 26 image(s) with Grad-CAM" in said and "2 unreadable" in said
    assert "broken.png: " in said and f"overlays:  {out}/" in said, said
    assert f"gallery:   {out / 'explanations.png'}" in said
    with open(out / "explanations.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [t["path"] for t in table] == [display_name(p) for p in files]
    assert next(t for t in table if "caf" in t["path"])["error"]
    broken = next(t for t in table if t["path"].endswith("broken.png"))
    assert broken["error"] and not broken["overlay"]
    good = [t for t in table if not t["error"]]
    assert all(t["explained_class"] == t["predicted_class"] for t in good)
    for t in good:  # each overlay mirrors the input folder, and is the image beside its map
        rel = t["path"][len(str(folder)) + 1 :]
        assert t["overlay"] == str(out / f"{rel}.png")
        from PIL import Image

        with Image.open(t["overlay"]) as im:
            assert im.width > 2 * im.height * 0.9 and im.height >= 224
    assert (out / "explanations.png").is_file()
    r = _explain(
        compose_cfg(
            root,
            f"explain.input={folder / 'dog'}",
            f"explain.output={tmp_path / 'fox'}",
            f"explain.model={ckpt}",
            "explain.target=fox",
            "explain.gallery=0",
        )
    )
    assert {row.get("explained_class") for row in r["rows"] if "error" not in row} == {"fox"}
    assert not (tmp_path / "fox" / "explanations.png").exists()


def test_own_output_inside_the_input_is_not_read_again(trained, exported, tmp_path, capsys):
    """explain.output and infer.sort_into inside the input folder: a second run reads the same
    images, not the first run's overlays or sorted copies."""
    from image_classifier.inference.infer import run_infer

    root, ckpt, images = trained
    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    for _ in range(2):
        given = (f"explain.input={folder}", f"explain.output={folder / 'maps'}")
        r = _explain(compose_cfg(root, *given, f"explain.model={ckpt}"))
        assert len(r["rows"]) == 24
    err = capsys.readouterr().err
    assert "Leaving out 26 file(s) under explain.output=" in err, err[-3000:]
    assert "not image file names" not in err  # its table was left out before that count
    onnx, _ = exported
    for _ in range(2):
        r = run_infer(
            compose_cfg(
                root,
                f"infer.model={onnx}",
                f"infer.input={folder}",
                f"infer.sort_into={folder / 'sorted'}",
                f"infer.output={tmp_path / 'p.csv'}",
            ),
            onnx,
        )
        assert r["images"] == 24 + 24 + 1  # the images, explain's overlays and gallery
    err = capsys.readouterr().err
    assert "Leaving out 49 file(s) under infer.sort_into=" in err, err
    inside = [f"explain.input={folder / 'maps'}", f"explain.output={folder}"]
    with pytest.raises(UserError, match="Every input file lies under explain.output=.*nothing"):
        _explain(compose_cfg(root, *inside, f"explain.model={ckpt}"))


def test_ctrl_c_part_way_keeps_the_finished_overlays_and_rows(trained, tmp_path, monkeypatch):
    from image_classifier.errors import Interrupted
    from image_classifier.inference import explain

    root, ckpt, images = trained
    calls, explain_batch = [], explain._explain_batch

    def interrupted_on_the_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return explain_batch(*args)

    monkeypatch.setattr(explain, "_explain_batch", interrupted_on_the_third_batch)
    out = tmp_path / "maps"
    given = [f"explain.input={images}", f"explain.output={out}", f"explain.model={ckpt}"]
    with pytest.raises(Interrupted, match=f"after 10 of 24 image.*in {out}/ \\(explanations"):
        _explain(compose_cfg(root, *given, "explain.batch_size=5"))
    with open(out / "explanations.csv", encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == 10 and all(t["overlay"] for t in kept)
    assert len(list(out.rglob("*.png.png"))) == 10


def test_explain_refuses_what_it_cannot_explain_with_the_fix(trained, tmp_path):
    root, ckpt, images = trained
    cases = [
        (["explain.target=cow"], "explain.target='cow' is not a class of this model"),
        (["explain.target=do"], "Did you mean 'dog'"),
        (["explain.model=models:/tiny@champion"], "registered export.*best.ckpt"),
        (
            [f"explain.model={tmp_path / 'x.onnx'}"],
            "exported model; this command reads the training",
        ),
        ([f"explain.model={tmp_path / 'x.ckpt'}"], "does not exist"),
        ([f"explain.input={tmp_path / 'none'}"], "matches no image files"),
        *(
            []
            if torch.cuda.is_available()
            else [(["explain.device=cuda"], "explain.device=cuda was asked for.*use cpu")]
        ),
    ]
    for overrides, message in cases:
        cfg = compose_cfg(root, f"explain.input={images}", f"explain.model={ckpt}", *overrides)
        with pytest.raises(UserError, match=message):
            _explain(cfg)


@pytest.mark.slow
def test_explain_on_the_command_line(trained, exported, tmp_path):
    root, _, images = trained
    onnx, _ = exported
    r = run_cli(
        "command=explain",
        f"explain.model={onnx}",  # stands for the best.ckpt beside it
        f"explain.input={images / 'cat'}",
        f"explain.output={tmp_path / 'maps'}",
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    assert "Explained 8 of 8 image(s) with Grad-CAM" in r.stderr
    assert f"of {onnx.with_suffix('.ckpt')} in" in r.stderr
    assert len(list((tmp_path / "maps").glob("*.png.png"))) == 8
    for setting, message in (
        ("explain.gallery=-1", "explain.gallery"),
        ("explain.device=tpu", "is not one of auto, cpu, cuda"),
    ):
        r = run_cli("command=explain", f"explain.input={images}", setting, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_test_explains_its_mistakes_with_a_checkpoint_not_an_export(trained, tmp_path):
    from image_classifier.models.checkpoint import load_module
    from image_classifier.training import predictions

    module = load_module(trained[1])
    rng = np.random.default_rng(0)
    dataset = [(rng.integers(0, 255, (1, 16, 16), dtype=np.uint8), 0) for _ in range(5)]
    probs = np.tile([[0.1, 0.2, 0.7]], (5, 1))
    targets = np.array([0, 0, 1, 2, 0])
    made = predictions.mistake_galleries(module, dataset, probs, targets, tmp_path / "a")
    assert [p.name for p in made] == ["mistakes.png", "mistakes_explained.png"]
    export = type("Export", (), {"classes": module.classes})()  # what `test` has for an .onnx
    made = predictions.mistake_galleries(export, dataset, probs, targets, tmp_path / "b")
    assert [p.name for p in made] == ["mistakes.png"]


def test_explain_with_no_readable_input_writes_its_table_and_exits_2(trained, tmp_path):
    root, ckpt, _ = trained
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "maps"
    cfg = compose_cfg(
        root, f"explain.input={tmp_path / 'in'}", f"explain.output={out}", f"explain.model={ckpt}"
    )
    with pytest.raises(
        UserError,
        match=r"None of the 1 input\(s\) could be read as an image; "
        f"each row, written to {out / 'explanations.csv'}, holds its reason",
    ):
        _explain(cfg)
    assert "a.png" in (out / "explanations.csv").read_text()
