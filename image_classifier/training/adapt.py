"""Defaults that follow the data: `model=auto`, `data.size=auto` and `train.epochs=auto` become a
model, a size and a number of epochs chosen from the images, before anything is built; a
pretrained model chosen so is fine-tuned with random shifts and flips (`hflip=auto`, mirror.py).
Every choice is printed in one line of the run summary with its reason; any explicit value
wins, and the run stores the concrete values (`train.resume`, `test`, `export-onnx` never see
`auto`). Rules chosen on the validation splits of scripts/benchmark_datasets.py (benchmarks.md)."""

from __future__ import annotations

import logging
import math

from omegaconf import OmegaConf, open_dict

from image_classifier import CONFIG_DIR
from image_classifier.data.datamodule import train_batch_size
from image_classifier.data.profile import (
    PRETRAINED_SIZES,
    ImageProfile,
    auto_size,
    choose_grey_white,
    median_text,
    profile_folder,
)
from image_classifier.models.factory import OWN_MODELS
from image_classifier.rules import fine_tunes, is_auto, items
from image_classifier.training.resume import command_line_overrides

log = logging.getLogger(__name__)

# train.epochs=auto: enough epochs for at least this many optimizer steps (a network trained from
# scratch at batch 128, a pretrained one fine-tuned at 32: train.batch_size=auto), and never fewer
# than MIN_EPOCHS nor more than MAX_EPOCHS. Chosen on validation (docs/benchmarks.md): from
# scratch 1,000 steps beat 300 by a mean 0.3 points over three small data sets, 2,000 gained one
# image in 179; fine-tuning, 300 steps of 32 beat 100 of 128 by a mean 5.6 points over colour-96
# (300, 1,000 and 2,000 images) and photos-7, in less time. MAX_EPOCHS bounds the per-epoch cost
# (validation, checkpoints) on a tiny folder: 500 images at batch 128 still get their 1,000 steps.
MIN_STEPS = {"scratch": 1000, "pretrained": 300}
# From scratch, Fashion-MNIST (430 steps an epoch) gets 4 epochs: 4 against 3 gained 0.22 points of
# val accuracy (7 of 8 seeds, CPU B) in 1.3x the time; lowest test accuracy 92.88 -> 93.26 %.
MIN_EPOCHS, MAX_EPOCHS = {"scratch": 4, "pretrained": 3}, 250
# Too few train images for MAX_EPOCHS epochs to make MIN_STEPS (under ~385 at batch 128): batch=auto
# is halved, not below MIN_AUTO_BATCH, until they do. Chosen on validation (12th session, 80 images
# from scratch, 3-seed mean best val at batch 128 / 16): digits 92.5 / 96.3 %, FMNIST 69.5 / 76.0 %.
MIN_AUTO_BATCH = 16
# Schedules whose rate anneals to the end of the run: early stopping would cut them in their
# high-rate middle, so under train.epochs=auto they run whole and the best epoch on validation is
# kept. With a fifth of the schedule as patience, early stopping ended fmnist-500 at 128 of its
# 400 steps, on a lucky epoch of a 100-image validation split (docs/benchmarks.md).
ANNEALED = ("onecycle", "cosine")
# Fine-tuning keeps the stem and this many of the first stages at their pretrained weights: no
# backward pass through the largest activations. EfficientNet-Lite0 at 160 px on 2 CPU cores: 0.6x
# the step time; colour-96 0.87x the training time at the same validation accuracy (79.6 %, two
# seeds), photos-7 0.70x at 100 % against 99.05 % (docs/benchmarks.md, tenth session)
FROZEN_STAGES = 2
# model=auto fine-tuning a pretrained backbone: random horizontal flips and shifts of up to this
# fraction of the side, per batch (train.augment.hflip, .shift), unless augmentation is given
# (fine_tuning_augment). Chosen on validation (docs/benchmarks.md): colour-96 66.0 -> 72.4 % at
# 96 px (8 px shifts), photos-7 98.1 -> 100 %.
FINE_TUNE_SHIFT = 1 / 12
# ... and AdamW's rate there (train.lr, 3e-3 from scratch): best val accuracy on colour-96, seeds
# 42 / 1 / 2 / 3 / 4, 81.2 / 78.0 / 80.0 / 80.8 / 80.8 -> 82.0 / 80.8 / 80.4 / 82.4 / 85.6 %; its
# 300-image subset +2.8 / +10.0, cells 95.8 -> 100 %, photos-7 and spectrograms-4 the same (100,
# 97.5 %); docs/benchmarks.md, thirty-sixth session
FINE_TUNE_LR = 6e-3


def choose_model_and_size(cfg) -> tuple[object, list[str]]:
    """(config with a concrete model and data.size, what was chosen and why). Only folder data
    has anything to choose from; packaged data sets fix their size."""
    needs_model = cfg.model.get("name") == "auto"
    needs_size = is_auto(cfg.data.get("size"))
    column = cfg.data.get("csv_file_column")
    profile = profile_folder(cfg.data.root, file_column=column) if cfg.data.get("root") else None
    cfg, white = choose_grey_white(cfg, profile)  # the same profile: headers read once
    if not (needs_model or needs_size):
        return _note_enlarged(_square_size(cfg), profile), white
    cfg = _square_size(cfg.copy())
    notes = []
    with open_dict(cfg):
        if needs_model:
            choice, why = model_for(profile, cfg.model)
            cfg.model = OmegaConf.load(CONFIG_DIR / "model" / f"{choice}.yaml")
            notes.append(f"model={choice} ({why})")
        if needs_size and cfg.model.get("name") == "head":  # it sees images through the backbone
            cfg.data.size = list(cfg.features.size)
            notes.append(
                f"data.size={list(cfg.data.size)} (model=head: the backbone's features.size)"
            )
        elif needs_size:
            profile = profile or ImageProfile(0, False, (28, 28))
            cfg.data.size = auto_size(profile.median_size, fine_tunes(cfg.model))
            notes.append(
                f"data.size={list(cfg.data.size)} ({median_text(profile)}; "
                f"{'pretrained' if fine_tunes(cfg.model) else 'from scratch'} limits)"
            )
        if needs_model and cfg.model.get("pretrained"):
            notes += fine_tuning_augment(cfg) + fine_tuning_lr(cfg)
    return (cfg if needs_size else _note_enlarged(cfg, profile)), notes + white


# a given data.size this many times the pixels of what data.size=auto would take gets a warning
ENLARGED = 16


def _note_enlarged(cfg, profile: ImageProfile | None):
    """data.size=5000 for 40x50 px images (a typo for 500?) built a 4.5 GB decoded cache of 60
    images before the first step: a warning first, with the size auto would take. A pretrained
    network given a side under its stride (32 px) trained on less than a pixel of its last stage:
    a warning too. (train.init_from's size is its network's: neither applies to it.)"""
    if profile is None or cfg.model.get("name") == "head" or cfg.model.get("init_from"):
        return cfg
    median = profile.median_size
    auto = auto_size(median, fine_tunes(cfg.model))
    h, w = (int(x) for x in cfg.data.size)
    timm = cfg.model.get("name") not in OWN_MODELS
    if fine_tunes(cfg.model) and timm and min(h, w) < PRETRAINED_SIZES["step"]:
        log.warning(
            "data.size=%s is under the %d px stride of the pretrained network's last stage: "
            "it sees less than one pixel of it. data.size=auto takes %s for these images.",
            [h, w],
            PRETRAINED_SIZES["step"],
            auto,
        )
    if h * w > ENLARGED * auto[0] * auto[1]:
        log.warning(
            "data.size=%s is %.0fx the pixels data.size=auto would take (%s, from the images' "
            "%s): the decoded cache and every step grow with it.",
            [h, w],
            h * w / (auto[0] * auto[1]),
            auto,
            median_text(profile),
        )
    return cfg


def _square_size(cfg):
    """data.size=128 as [128,128] (in place), so the run and the model file state both sides."""
    if isinstance(cfg.data.get("size"), int):
        with open_dict(cfg):
            cfg.data.size = items(cfg.data.size, 2)
    return cfg


def fine_tuning_augment(cfg) -> list[str]:
    """Flips and shifts for model=auto's fine-tuning (in place; the note), unless the command line
    names any train.augment key or an experiment, or the config already turns either on."""
    a = cfg.train.augment
    given = {k for k in command_line_overrides() if k.startswith(("train.augment", "experiment"))}
    if given or a.get("hflip") or int(a.get("shift") or 0):
        return []
    a.hflip, a.shift = "auto", max(1, round(min(cfg.data.size) * FINE_TUNE_SHIFT))
    return [
        f"train.augment.shift={a.shift} (fine-tuning: random shifts of up to "
        f"1/{round(1 / FINE_TUNE_SHIFT)} of the side)"
    ]


def fine_tuning_lr(cfg) -> list[str]:
    """FINE_TUNE_LR for model=auto's fine-tuning (in place; the note), unless the command line
    names train.lr or an experiment."""
    if any(k == "train.lr" or k.startswith("experiment") for k in command_line_overrides()):
        return []
    cfg.train.lr = FINE_TUNE_LR
    return [f"train.lr={FINE_TUNE_LR:g} (fine-tuning: twice the from-scratch rate)"]


def model_for(profile: ImageProfile | None, auto) -> tuple[str, str]:
    """(model config name, why) for model=auto."""
    if profile is None:
        return str(auto.small_grey), "a packaged data set, not a folder to judge"
    if profile.colour:
        return str(auto.colour_or_large), f"{profile.describe()}: colour, a pretrained backbone"
    if max(profile.median_size) >= int(auto.large):
        return str(auto.colour_or_large), f"{profile.describe()}: large, a pretrained backbone"
    return str(auto.small_grey), f"{profile.describe()}: small and grey, trained from scratch"


def choose_before_data(cfg, chosen: list[str]) -> tuple[object, list[str]]:
    """(config, `chosen` and more notes) with every `auto` the images decide before the data is
    built: model, data.size, data.grey_white, fine-tuning's augmentation and rate, batch, frozen
    stages."""
    cfg, notes = choose_model_and_size(cfg)
    chosen = [*chosen, *notes]
    for choose in (choose_batch_size, choose_frozen_stages):
        cfg, notes = choose(cfg)
        chosen += notes
    return cfg, chosen


def choose_batch_size(cfg) -> tuple[object, list[str]]:
    """(config with a concrete train.batch_size, the note) for train.batch_size=auto."""
    if not is_auto(cfg.train.get("batch_size")):
        return cfg, []
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.train.batch_size = train_batch_size(cfg)
    why = "fine-tuning a pretrained network" if fine_tunes(cfg.model) else "from scratch"
    return cfg, [f"train.batch_size={cfg.train.batch_size} ({why})"]


def choose_frozen_stages(cfg) -> tuple[object, list[str]]:
    """(config with a concrete train.frozen_stages, the note) for train.frozen_stages=auto:
    FROZEN_STAGES when fine-tuning a pretrained timm network, else 0."""
    if not is_auto(cfg.train.get("frozen_stages")):
        return cfg, []
    m = cfg.model
    tuned = fine_tunes(m) and not m.get("freeze_backbone") and m.name not in OWN_MODELS
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.train.frozen_stages = FROZEN_STAGES if tuned else 0
    if not tuned:
        return cfg, []
    return cfg, [
        f"train.frozen_stages={FROZEN_STAGES} (fine-tuning: the first {FROZEN_STAGES} feature "
        "stages and the stem before them keep their pretrained weights)"
    ]


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last batch may be short)."""
    return max(1, math.ceil(train_images / batch_size))


def small_folder_batch(
    cfg, train_images: int, auto_batch: bool, chosen: list[str] = ()
) -> tuple[object, list[str]]:
    """(config, `chosen`): with `auto_batch` (train.batch_size was auto), a folder too small for
    MIN_STEPS within MAX_EPOCHS epochs gets the batch halved, not below MIN_AUTO_BATCH, while
    that adds steps to an epoch, whatever then sets the epochs (auto, given or
    train.time_budget, whose train.epochs=N then repeats the run); its note replaces the batch
    note in `chosen`. Under train.time_budget=30, 80 train images, mean best validation accuracy
    of three seeds at batch 16 / 128: digits 96.1 / 93.3 %, Fashion-MNIST 75.9 / 69.1 %
    (docs/benchmarks.md, fourteenth session)."""
    kind = "pretrained" if fine_tunes(cfg.model) else "scratch"
    asked = batch = int(cfg.train.batch_size)
    while (
        auto_batch
        and batch > MIN_AUTO_BATCH
        and MAX_EPOCHS * steps_per_epoch(train_images, batch) < MIN_STEPS[kind]
    ):
        batch = max(MIN_AUTO_BATCH, batch // 2)
    if steps_per_epoch(train_images, batch) == steps_per_epoch(train_images, asked):
        return cfg, list(chosen)  # no more steps: keep the batch
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.train.batch_size = batch
    note = (
        f"train.batch_size={batch} ({asked} halved, not below {MIN_AUTO_BATCH}: more steps an "
        f"epoch for {train_images} train images)"
    )
    return cfg, [*(c for c in chosen if not c.startswith("train.batch_size=")), note]


def choose_epochs(cfg, train_images: int, chosen: list[str] = ()) -> tuple[object, list[str]]:
    """(config with a concrete train.epochs, `chosen` and its notes) for train.epochs=auto:
    enough epochs for MIN_STEPS optimizer steps at train.batch_size, up to MAX_EPOCHS. An
    annealed schedule (ANNEALED) runs whole; under any other, early stopping's patience grows
    with the schedule (a fifth of it). A train.early_stopping given on the command line is kept
    as it is."""
    if not is_auto(cfg.train.get("epochs")):
        return cfg, list(chosen)
    kind = "pretrained" if fine_tunes(cfg.model) else "scratch"
    per_epoch = steps_per_epoch(train_images, int(cfg.train.batch_size))
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS[kind], math.ceil(MIN_STEPS[kind] / per_epoch)))
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.train.epochs = epochs
    cfg, _ = annealed_runs_whole(cfg)  # the epochs' note says so
    explicit = "train.early_stopping" in command_line_overrides()  # the command line's wins
    if int(cfg.train.early_stopping) > 0 and not explicit:
        with open_dict(cfg):
            cfg.train.early_stopping = max(int(cfg.train.early_stopping), math.ceil(epochs / 5))
    return cfg, [*chosen, _epoch_note(cfg, kind, train_images, per_epoch)]


def annealed_runs_whole(cfg) -> tuple[object, list[str]]:
    """(config, [its note]): under a schedule that anneals to the last epoch (ANNEALED), early
    stopping is off unless train.early_stopping is on the command line, whether the epochs are
    auto, given or fitted to train.time_budget: its patience cuts the schedule in its warm-up.
    100 images, train.epochs=100 (or train.time_budget=30): stopped after 6 epochs at chance."""
    t = cfg.train
    if (
        str(t.get("scheduler")) not in ANNEALED
        or int(t.get("early_stopping") or 0) == 0
        or "train.early_stopping" in command_line_overrides()
    ):
        return cfg, []
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.train.early_stopping = 0
    return cfg, [
        f"train.early_stopping=0 (the {t.scheduler} schedule anneals to its last epoch: it runs "
        "whole, its best epoch on validation kept)"
    ]


def _epoch_note(cfg, kind: str, train_images: int, per_epoch: int) -> str:
    epochs, batch = int(cfg.train.epochs), int(cfg.train.batch_size)
    if str(cfg.train.scheduler) in ANNEALED and int(cfg.train.early_stopping) == 0:
        end = f"; the whole {cfg.train.scheduler} schedule, its best epoch on validation kept)"
    elif (stopping := int(cfg.train.early_stopping)) > 0:
        end = f"; early stopping after {stopping} epochs without gain)"
    else:
        end = ")"
    steps, wanted = epochs * per_epoch, MIN_STEPS[kind]
    net = "pretrained" if kind == "pretrained" else "from-scratch"
    if epochs == MIN_EPOCHS[kind] and steps - per_epoch >= wanted:  # the epochs' floor binds
        enough = f"at least {wanted} and {epochs} epochs"
    elif steps >= wanted:
        enough = f"at least {wanted}"
    else:
        enough = f"{wanted} wanted, {MAX_EPOCHS} epochs at most"
    return (
        f"train.epochs={epochs} ({steps} steps: {enough} for a {net} network, {train_images} "
        f"train images at batch {batch}" + end
    )
