"""`train.resume`: which checkpoint a run continues, with the config it was trained with, and
what the command line that resumes it may change; `train.init_from`: the checkpoint a new run
starts from, on data of its own."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from image_classifier import runs
from image_classifier.data.identity import class_change
from image_classifier.errors import UserError, override
from image_classifier.models import checkpoint as ckpt_file
from image_classifier.rules import REGISTRY_PREFIX, is_auto
from image_classifier.training.callbacks import interruptible

log = logging.getLogger(__name__)

# What a resumed run may take from the command line that resumes it; every other override must
# repeat the interrupted run's value (train.epochs beyond a one-cycle schedule is refused later).
RESUME_MAY_CHANGE = (
    "paths",
    "hydra",
    "command",
    "train.resume",
    "train.epochs",
    "train.num_workers",
    "train.threads",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "data.root",
    "data.cache_dir",
    "logger.connect_timeout",
)


def resume_point(cfg):
    """(config, checkpoint) for train.resume=last|PATH: the interrupted run's own config and
    folder, with the current paths and the RESUME_MAY_CHANGE overrides applied (MLflow records a
    changed value as a `resumed.<key>` tag of the run); (cfg, None) without resume."""
    r = cfg.train.get("resume") or runs.requeued_checkpoint(cfg)
    if not r:
        return cfg, None
    ckpt = runs.last_checkpoint(cfg, r, "train.resume")
    if not ckpt.is_file():
        raise UserError(f"train.resume={r!r}: no such checkpoint.")
    stored = ckpt_file.stored_config(ckpt)
    if not stored:
        raise UserError(f"train.resume={r!r}: {ckpt} holds no training config to resume from.")
    resumed = OmegaConf.create(stored)
    overrides = command_line_overrides()
    check_resume_overrides(cfg, resumed, overrides, ckpt)
    with open_dict(resumed):
        resumed.paths = OmegaConf.to_container(cfg.paths, resolve=True)
        resumed.paths.output_dir = str(ckpt.parent.parent.resolve())
        for key in overrides:
            if key != "paths" and not key.startswith(("paths.", "hydra")) and may_change(key):
                OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
    print(f"Resuming {resumed.paths.output_dir} from {ckpt}")
    # the resumed run writes into its own checkpoints/ on purpose: Lightning's warning that the
    # folder "exists and is not empty" is for runs that would mix with another's
    warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
    return resumed, ckpt


def init_point(cfg):
    """(config, models/checkpoint.StartingPoint or None, notes) for train.init_from=PATH (a
    checkpoint or run folder): a new run on this data, from that model's network. Its
    architecture (the model config), input size, normalisation and augmentation come with it; a
    model= naming another network is refused; model.* options, data.size, data.channels and
    train.augment given on the command line win."""
    given = cfg.train.get("init_from")
    if not given:
        return cfg, None, []
    if cfg.train.get("resume"):
        raise UserError(
            "train.resume continues an interrupted run; train.init_from starts a new one from a "
            "trained model's weights. Give one of them."
        )
    if str(given).startswith(REGISTRY_PREFIX):
        raise UserError(
            f"train.init_from={given} is a registered model, an ONNX export without the training "
            "weights. Give the run folder or best.ckpt it was exported from."
        )
    start = ckpt_file.starting_point(runs.checkpoint(cfg, given, "train.init_from"))
    model, pre = start.config["model"], start.preprocessing
    given_keys = command_line_overrides()
    asked = [k for k in given_keys if k == "model" or k.startswith("model.")]
    if asked and cfg.model.get("name") not in ("auto", model["name"]):
        raise UserError(
            f"train.init_from={given} holds a {model['name']} network, and model="
            f"{cfg.model.get('name')} asks for another. Drop the model override (the network "
            "comes from the checkpoint), or drop train.init_from to train that model."
        )
    mine = {
        k: OmegaConf.select(cfg, k)
        for k in asked
        if k.startswith("model.") and k not in ("model.name", "model.pretrained")
    }
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model = {**model, "pretrained": False, "init_from": str(start.path)}
        for key, value in mine.items():  # model.drop_rate=0.3...: the command line's, on top
            OmegaConf.update(cfg, key, value, force_add=True)
        notes = [f"model={model['name']} (train.init_from: the network of {start.path})"]
        for key in ("size", "channels", "grey_white"):  # grey_white: 16-bit models only
            if is_auto(cfg.data.get(key)) and key in pre:
                cfg.data[key] = pre[key]
                notes.append(f"data.{key}={pre[key]} (what it was trained with)")
        if cfg.data.channels == pre["channels"]:
            cfg.data.mean, cfg.data.std = pre["mean"], pre["std"]
        was = start.config["train"]["augment"]
        if not any(k.startswith(("train.augment", "experiment")) for k in given_keys):
            now = OmegaConf.to_container(cfg.train.augment)
            if changed := {k: v for k, v in was.items() if now.get(k) != v}:
                cfg.train.augment = was
                said = " ".join(f"train.augment.{k}={_text(v)}" for k, v in changed.items())
                notes.append(f"{said} (what it was trained with)")
    return cfg, start, notes


def _text(value) -> str:  # as it is typed on the command line
    return str(value).lower() if isinstance(value, bool) else str(value)


def command_line_overrides() -> list[str]:
    """The keys this process's command line overrides ([] when called from Python)."""
    return [o.split("=")[0].lstrip("+~") for o in given_overrides()]


def given_overrides(*keys: str) -> list[str]:
    """This process's command-line overrides, as typed ([] when called from Python); with
    `keys`, those of these top-level keys (`data` takes data=folder and data.root=...)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    task = HydraConfig.get().overrides.task
    return [o for o in task if not keys or o.lstrip("+~").split("=")[0].split(".")[0] in keys]


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def check_resume_overrides(cfg, stored, keys: list[str], ckpt: Path) -> None:
    """Exit 2 before any training when the command line changes what the interrupted run was
    trained with (a config group by its name, any other key by its value)."""
    changed = []
    for key in keys:
        if may_change(key):
            continue
        now, then = OmegaConf.select(cfg, key), OmegaConf.select(stored, key)
        if OmegaConf.is_config(now) and "name" in now:  # a group (data=folder, model=cnn4)
            now, then = now.name, (then or {}).get("name")
        elif OmegaConf.is_config(now):
            now = OmegaConf.to_container(now, resolve=True)
        if now != then:
            changed.append(f"{key}={now!r} (the run has {then!r})")
    if changed:
        raise UserError(
            f"train.resume continues {ckpt} with the settings it was trained with, and this "
            f"command line changes {'; '.join(changed)}. Drop "
            f"{'that override' if len(changed) == 1 else 'those overrides'} to resume, or start "
            f"a new run without train.resume. A resumed run may change only "
            f"{', '.join(RESUME_MAY_CHANGE)}."
        )


def check_stretch(cfg, asked: int | None) -> None:
    """A resumed run may ask for more epochs than it stored, unless its schedule is one-cycle."""
    stored = int(cfg.train.epochs)
    if (asked or 0) > stored and cfg.train.scheduler == "onecycle":
        raise UserError(
            f"train.epochs={asked}: this run's one-cycle schedule was laid out for {stored} "
            "epochs and cannot be stretched. Resume without train.epochs, or start a new run "
            f"with train.epochs={asked} (schedules that can be extended: cosine, step, "
            "plateau, none)."
        )


def check_resumed_data(ckpt: Path, info) -> None:
    """A run resumes on the classes it was trained with (its weights fit no others): a clear
    error when they changed; a warning when only the files did."""
    classes, data_hash = ckpt_file.trained_on(ckpt)
    if classes != info.classes:
        raise UserError(
            f"train.resume: the data's classes changed since {ckpt} was written"
            f"{class_change(classes, info.classes)}. A run resumes on the classes it was trained "
            "with: start a new run (without train.resume) to train on these."
        )
    if data_hash and data_hash != info.data_hash:
        log.warning(
            "Resuming on data that changed since %s was written (content hash %s, was %s).",
            ckpt.name,
            info.data_hash,
            data_hash,
        )


def asked_epochs(cfg) -> int | None:
    """train.epochs when the command line gives it; None when it is only the default (a resumed
    run then keeps its own number of epochs, not the current default's) or `auto` (chosen
    from the data later; a resumed run keeps its own)."""
    from hydra.core.hydra_config import HydraConfig

    if is_auto(cfg.train.epochs):
        return None
    if not HydraConfig.initialized():  # called from Python with a composed config: take it
        return int(cfg.train.epochs)
    return int(cfg.train.epochs) if "train.epochs" in command_line_overrides() else None


def fit(trainer, module, dm, resume_from: Path | None, checkpoint, last) -> None:
    """trainer.fit; Ctrl-C names what the finished epochs kept and the command that continues."""
    interruptible(
        trainer,
        lambda: trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from or "") or None),
        lambda: interrupted(trainer, checkpoint, last),
    )


def interrupted(trainer, checkpoint, last) -> str:
    done, last_file = trainer.current_epoch, Path(last.dirpath) / "last.ckpt"
    said = f"train interrupted after {done} finished epoch(s) of {trainer.max_epochs}"
    if not last_file.is_file():
        return said + ": no epoch finished, nothing was kept."
    best = checkpoint.best_model_path
    kept = (
        f"{best} (best {checkpoint.monitor} {float(checkpoint.best_model_score):.4f} so far) and "
        if best and checkpoint.best_model_score is not None
        else ""
    )
    return (
        f"{said}. Kept: {kept}{last_file} (the last finished epoch). Continue it with `uv run "
        f"python commands.py command=train {override('train.resume', last_file)}`"
        + (
            f", or test what it has with `command=test {override('test.checkpoint', best)}`."
            if kept
            else "."
        )
    )
