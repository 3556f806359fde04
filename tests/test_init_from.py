"""train.init_from: a new run on other data starts from a trained model's network."""

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, make_class_folders

from image_classifier.errors import UserError


def test_a_new_network_takes_the_weights_and_the_classifier_rows_by_class_name(trained):
    """Classes cat, dog, fox -> fox, cat, owl: every tensor but the classifier's is the
    checkpoint's; fox's and cat's rows move to their new places, owl's stays as initialised."""
    from image_classifier.models.checkpoint import starting_point
    from image_classifier.models.module import ClassifierModule
    from image_classifier.models.pretrained import start_from

    _, ckpt, _ = trained
    start = starting_point(ckpt)
    assert start.classes == ["cat", "dog", "fox"]
    torch.manual_seed(1)
    new = ClassifierModule(
        model=start.config["model"],
        classes=["fox", "cat", "owl"],
        preprocessing=start.preprocessing,
        optim={"optimizer": "adamw"},
    )
    fresh = new.net.net.head[2].weight.detach().clone()
    note = start_from(new.net.net, start, ["fox", "cat", "owl"])
    got = new.net.net.state_dict()
    for key, value in start.state.items():
        if not key.startswith("head."):
            assert torch.equal(got[key], value), key
    w, b = start.state["head.2.weight"], start.state["head.2.bias"]
    assert torch.equal(got["head.2.weight"][0], w[2]) and torch.equal(got["head.2.weight"][1], w[0])
    assert torch.equal(got["head.2.bias"][:2], b[[2, 0]])
    assert torch.equal(got["head.2.weight"][2], fresh[2])
    assert note == (
        "  classifier rows kept for 2 of the 3 classes (by name); new, learnt from scratch: owl; "
        "not in this data: dog"
    )


def test_train_init_from_a_run_folder_trains_its_network_on_new_data(
    trained, tmp_path, capsys, caplog
):
    """The run folder stands for its best.ckpt; architecture, size and channels come from it
    (the new folder's 24x20 colour images are read at the model's 16x16 grey, with no warning
    about sizes meant for ImageNet networks), and the new checkpoint records where it started."""
    from image_classifier.models.checkpoint import read
    from image_classifier.training.train import run_train

    _, ckpt, _ = trained
    images = make_class_folders(tmp_path / "new", ("cat", "owl"), per_class=8, size=24, mode="RGB")
    run = ckpt.parent.parent
    r = run_train(
        compose_cfg(tmp_path, "data=folder", f"data.root={images}", f"train.init_from={run}")
    )
    out = capsys.readouterr().out
    assert "stride" not in caplog.text and "data.size=auto" not in caplog.text, caplog.text
    assert f"Training cnn from the weights of {ckpt} (" in out
    assert (
        "classifier rows kept for 1 of the 2 classes (by name); new, learnt from scratch: owl"
        in out
    )
    assert r["chosen"][:3] == [
        f"model=cnn (train.init_from: the network of {ckpt})",
        "data.size=[16, 16] (what it was trained with)",
        "data.channels=1 (what it was trained with)",
    ]
    hp = read(r["checkpoint"])["hyper_parameters"]
    assert hp["model"]["init_from"] == str(ckpt) and hp["model"]["pretrained"] is False
    assert hp["preprocessing"]["size"] == [16, 16] and hp["preprocessing"]["channels"] == 1
    assert hp["classes"] == ["cat", "owl"]


def test_a_grey_network_starts_a_colour_run_with_its_first_convolution_adapted(
    trained, tmp_path, capsys
):
    """data.channels=3 from a grey checkpoint stopped in torch's load_state_dict ("size mismatch
    for features.0.weight"): each colour channel now gets a third of the grey weight, so a grey
    picture reads as before."""
    from image_classifier.models.checkpoint import read
    from image_classifier.models.pretrained import _adapt
    from image_classifier.training.train import run_train

    _, ckpt, _ = trained
    images = make_class_folders(tmp_path / "new", ("cat", "dog"), per_class=8, size=16, mode="RGB")
    r = run_train(
        compose_cfg(
            tmp_path,
            "data=folder",
            f"data.root={images}",
            f"train.init_from={ckpt}",
            "data.channels=3",
            "train.epochs=1",
            "train.lr=1e-12",  # the first convolution stays as it was adapted
        )
    )
    assert "; features.0.weight adapted from 1 to 3 input channels" in capsys.readouterr().out
    grey = read(ckpt)["state_dict"]["net.net.features.0.weight"]
    colour = read(r["checkpoint"])["state_dict"]["net.net.features.0.weight"]
    assert colour.shape[1] == 3
    torch.testing.assert_close(colour, grey.repeat(1, 3, 1, 1) / 3, atol=1e-6, rtol=1e-4)
    w = torch.randn(8, 3, 3, 3)  # colour to grey: timm's sum over the channels
    torch.testing.assert_close(_adapt("w", w, torch.empty(8, 1, 3, 3)), w.sum(1, keepdim=True))


def test_train_init_from_refuses_another_architecture_and_resume_together(trained, monkeypatch):
    from image_classifier.training import resume

    root, ckpt, images = trained
    monkeypatch.setattr(resume, "command_line_overrides", lambda: ["model"])
    cfg = compose_cfg(
        root,
        "data=folder",
        f"data.root={images}",
        "model=efficientnet_lite0",
        f"train.init_from={ckpt}",
    )
    with pytest.raises(
        UserError,
        match=r"holds a cnn network, and model=tf_efficientnet_lite0 "
        r"asks for another. Drop the model override",
    ):
        resume.init_point(cfg)
    cfg = compose_cfg(
        root, "data=folder", f"data.root={images}", "train.resume=last", f"train.init_from={ckpt}"
    )
    with pytest.raises(
        UserError,
        match="train.resume continues an interrupted run; train.init_from starts a new one",
    ):
        resume.init_point(cfg)


def test_train_init_from_a_file_it_cannot_start_from_says_why(trained, tmp_path):
    """Not a training checkpoint, a head (its backbone is the feature cache's), an export."""
    from image_classifier.training.resume import init_point

    root, ckpt, images = trained
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    head = tmp_path / "head.ckpt"
    stored = {**torch.load(ckpt, weights_only=True)}
    stored["hyper_parameters"] = {**stored["hyper_parameters"], "model": {"name": "head"}}
    torch.save(stored, head)
    onnx = tmp_path / "best.onnx"
    onnx.write_bytes(b"onnx")
    cases = {
        other: "is not a checkpoint written by this tool's train",
        head: "is a model=head, which has no network of its own to start from",
        onnx: "is an exported model; this command reads the training checkpoint",
        tmp_path / "none.ckpt": "does not exist",
        "models:/shapes-cnn@champion": "is a registered model, an ONNX export without the training",
    }
    for path, said in cases.items():
        cfg = compose_cfg(root, "data=folder", f"data.root={images}", f"train.init_from={path}")
        with pytest.raises(UserError, match=said):
            init_point(cfg)
    assert Path(ckpt).is_file()


def test_train_init_from_carries_the_augmentation_and_model_options_unless_asked_otherwise(
    trained, tmp_path, monkeypatch
):
    """A model fine-tuned with flips and shifts goes on with them; train.augment.* or an
    experiment on the command line is the user's choice instead, and so is a model.* option."""
    from image_classifier.training import resume

    root, ckpt, images = trained
    stored = torch.load(ckpt, weights_only=True)
    config = stored["hyper_parameters"]["config"]
    config["train"]["augment"] = {**config["train"]["augment"], "hflip": True, "shift": 2}
    flipped = tmp_path / "flipped.ckpt"
    torch.save(stored, flipped)
    cfg = compose_cfg(root, "data=folder", f"data.root={images}", f"train.init_from={flipped}")
    carried, _, notes = resume.init_point(cfg)
    assert (carried.train.augment.hflip, carried.train.augment.shift) == (True, 2)
    assert "train.augment.hflip=true train.augment.shift=2 (what it was trained with)" in notes
    monkeypatch.setattr(resume, "command_line_overrides", lambda: ["train.augment.shift"])
    mine, _, notes = resume.init_point(cfg)
    assert (mine.train.augment.hflip, mine.train.augment.shift) == (False, 0)
    assert not [n for n in notes if "augment" in n]
    # a model option on the command line goes on top of the checkpoint's model config
    keys = ["model", "model.dropout"]
    monkeypatch.setattr(resume, "command_line_overrides", lambda: keys)
    cfg = compose_cfg(
        root,
        "data=folder",
        f"data.root={images}",
        f"train.init_from={flipped}",
        "model.dropout=0.3",
    )
    tuned, _, _ = resume.init_point(cfg)
    assert tuned.model.dropout == 0.3 and tuned.model.channels == config["model"]["channels"]
    assert tuned.model.init_from == str(flipped)


def test_model_pretrained_given_a_checkpoint_of_this_tool_names_train_init_from(trained):
    """It stopped at "unexpected tensor 'temperature'; it does not fit this architecture"."""
    from image_classifier.models.pretrained import file_state

    _, ckpt, _ = trained
    with pytest.raises(
        UserError, match=rf"is a checkpoint this tool trained: .* train.init_from={ckpt} "
    ):
        file_state(str(ckpt))


def test_a_12_bit_model_keeps_its_grey_white_and_hands_it_to_a_run_started_from_it(tmp_path):
    """train on 12-bit scans records data.grey_white=4095 in the model's preprocessing; a run
    started from that model (train.init_from) reads its images the same way."""
    from conftest import twelve_bit_folder

    from image_classifier.models.checkpoint import read
    from image_classifier.training.train import run_train

    scans = twelve_bit_folder(tmp_path / "scans", per_class=10)
    quick = ("data.size=16", "logger.enabled=false")
    first = run_train(compose_cfg(tmp_path, "data=folder", f"data.root={scans}", *quick))
    assert any(c.startswith("data.grey_white=4095 (20 of 20 sampled") for c in first["chosen"])
    assert read(first["checkpoint"])["hyper_parameters"]["preprocessing"]["grey_white"] == 4095
    more = twelve_bit_folder(tmp_path / "more", per_class=10, top=1000)  # its own depth: 1023
    start = f"train.init_from={first['checkpoint']}"
    again = ("logger.enabled=false", f"paths.output_dir={tmp_path}/again")
    r = run_train(compose_cfg(tmp_path, "data=folder", f"data.root={more}", start, *again))
    assert "data.grey_white=4095 (what it was trained with)" in r["chosen"]
    assert read(r["checkpoint"])["hyper_parameters"]["preprocessing"]["grey_white"] == 4095
