"""`train.augment.hflip=auto` (what model=auto's fine-tuning asks for): random horizontal flips,
unless the data says a mirrored image belongs to another class. Flips are the field's default for
photos; on spectrograms they teach a rising chirp as a falling one (best val accuracy 82.5 % with
them, 97.5 % without), on colour digits 95.2 against 96.1 % (three seeds); text, arrows and
left/right-handed parts are the same.

The check, before training: a stratified sample of the train split through the pretrained backbone
of cfg.features (the cached-feature head's), as it is and mirrored; a ridge classifier on the
unmirrored features, K-fold, predicts each held-out image and its mirror. Flips go off when the
mirrors lose clearly more images than they gain (MIRROR_LOSS of the sample, and Z standard
errors of the paired difference)."""

from __future__ import annotations

import math

import numpy as np
from omegaconf import open_dict

from image_classifier.data.datamodule import labels_of
from image_classifier.errors import UserError

# The sample: at most PROBE_IMAGES train images (stratified), their shorter side brought down to
# PROBE_SIDE (never enlarged), in K_FOLDS folds: 9-12 s on two CPU cores for 400 images at 160 px.
# At 96 px (3 s) the colour digits' verdict hung on the split: 61 lost / 35 gained on one, 42 / 36
# on another; at 160 px 53 / 32 and 56 / 33, photos-7 0 / 1 (docs/benchmarks.md).
PROBE_IMAGES, PROBE_SIDE, K_FOLDS = 400, 160, 5
# Flips off when (held-out images right as they are but wrong mirrored) - (the other way round)
# is at least MIRROR_LOSS of the sample and Z standard errors. Chosen on validation, the fine-tuned
# network's best val accuracy with flips and shifts / shifts only (docs/benchmarks.md), against
# the net loss here: spectrograms 82.5 / 97.5 % (23 % lost, z 7.6), colour digits mean 95.2 /
# 96.1 % over three seeds (5.8 %, z 2.4), photos-7 100 / 99 % (-0.3 %), colour-96 81.2 / 79.2 %
# (0.5 %). Flips kept on a mirrored class cost 15 points, flips dropped 1-2: sensitive it is.
MIRROR_LOSS, Z = 0.03, 2.0


def choose_flips(cfg, dm, info, chosen: list[str]) -> tuple[object, list[str]]:
    """(config with a concrete train.augment.hflip, `chosen` and its note) for hflip=auto."""
    if str(cfg.train.augment.get("hflip")).lower() != "auto":
        return cfg, chosen
    flips, why = _verdict(cfg, dm, info)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.train.augment.hflip = flips
    return cfg, [*chosen, f"train.augment.hflip={str(flips).lower()} ({why})"]


def _verdict(cfg, dm, info) -> tuple[bool, str]:
    if info.multi_label:
        return True, "random flips; multi-label data is not checked for mirrored classes"
    labels = labels_of(dm.dataset("train")).astype(int)
    rows = _sample(labels, int(cfg.seed))
    if rows is None:
        return True, "random flips; too few images a class to check mirrored ones"
    try:
        lost, gained = mirror_losses(_features_both_ways(cfg, dm, rows), labels[rows], cfg.seed)
    except UserError as e:  # e.g. features.backbone from a hub, offline
        return True, f"random flips; mirrored images not checked: {e}"
    n, net = len(rows), lost - gained
    counts = f"of {n} held-out train images, {lost} lost and {gained} gained their class mirrored"
    if net >= MIRROR_LOSS * n and net >= Z * math.sqrt(lost + gained):
        return False, f"no flips: mirrored images look like other classes, {counts}"
    return True, f"random flips: mirrored images keep their class, {counts}"


def _sample(labels: np.ndarray, seed: int) -> np.ndarray | None:
    """About PROBE_IMAGES rows, each class in its share and at least 2 (of PROBE_IMAGES / 2
    classes drawn at random when there are more); None when a class has one image."""
    counts = np.bincount(labels)
    if len(counts[counts > 0]) < 2 or counts[counts > 0].min() < 2:
        return None
    rng = np.random.default_rng(seed)
    classes = np.flatnonzero(counts)
    if len(classes) > PROBE_IMAGES // 2:
        classes = np.sort(rng.choice(classes, PROBE_IMAGES // 2, replace=False))
    share = min(1.0, PROBE_IMAGES / counts[classes].sum())
    rows = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        rows += list(rng.choice(members, max(2, round(share * len(members))), replace=False))
    return np.sort(np.asarray(rows))


def _features_both_ways(cfg, dm, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features, features of the mirrors) of these train rows from cfg.features' backbone."""
    import torch
    import torch.nn.functional as F

    from image_classifier.models.factory import create_backbone

    with torch.random.fork_rng(devices=[]):  # building it draws: training's draws stay as they were
        net = create_backbone(cfg.features)
    channels, ds, out = int(cfg.features.channels), dm.dataset("train"), ([], [])
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            x = torch.stack([ds[int(i)][0] for i in rows[start : start + 64]]).float()
            if x.shape[1] != channels:
                x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
            h, w = x.shape[2:]
            scale = min(1.0, PROBE_SIDE / min(h, w))
            if scale < 1:
                size = (round(h * scale), round(w * scale))
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
            out[0].append(net(x).numpy())
            out[1].append(net(x.flip(3)).numpy())
    return np.concatenate(out[0]), np.concatenate(out[1])


def mirror_losses(features: tuple[np.ndarray, np.ndarray], y: np.ndarray, seed) -> tuple[int, int]:
    """(held-out images a ridge classifier gets right as they are and wrong mirrored, the other
    way round): K-fold, fitted on the unmirrored features of the other folds."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    plain, mirrored = features
    folds = min(K_FOLDS, int(np.bincount(y)[np.unique(y)].min()))
    right, right_mirrored = np.zeros(len(y), bool), np.zeros(len(y), bool)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=int(seed)).split(plain, y):
        clf = make_pipeline(StandardScaler(), RidgeClassifier(alpha=100.0)).fit(plain[tr], y[tr])
        right[te] = clf.predict(plain[te]) == y[te]
        right_mirrored[te] = clf.predict(mirrored[te]) == y[te]
    return int((right & ~right_mirrored).sum()), int((~right & right_mirrored).sum())
