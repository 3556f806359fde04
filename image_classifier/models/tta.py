"""Test-time augmentation: the views of a batch whose logits `test.tta` and `export.tta` average.

    hflip        each image and its left-right mirror (2 forward passes)
    hflip+shift  those two, each also moved one pixel left and one pixel right with zero fill,
                 as the batch translations of training do (6 forward passes)

`true` is kept as another name for hflip. Torch is imported only when views are made, so
config validation can read the options cheaply.
"""

from __future__ import annotations

from image_classifier.errors import UserError, did_you_mean

VIEWS = {"hflip": 2, "hflip+shift": 6}  # mode -> forward passes per image
TTA_MODES = ("none", *VIEWS)
TTA_VALUES = (False, True, *TTA_MODES)  # what test.tta / export.tta accept


def tta_mode(value, key: str = "test.tta") -> str | None:
    """The mode a config value names (None for no TTA)."""
    if value in (None, False, "none"):
        return None
    if value is True:
        return "hflip"
    if value in VIEWS:
        return value
    raise UserError(
        f"{key}={value!r} is not a TTA mode.{did_you_mean(str(value), TTA_MODES)} It takes "
        f"{', '.join(TTA_MODES)} (true means hflip, false none)."
    )


def chosen_tta(module, section: str, given, from_checkpoint: bool) -> str | None:
    """The mode `test` (section "test") or `export-onnx` ("export") uses: `given`, or with
    `from_checkpoint` (the command line set neither the key nor a recipe) the value the training
    config stored in the checkpoint under `section` (a recipe's, e.g. experiment=fmnist_fast)."""
    if from_checkpoint:
        given = ((module.hparams.get("config") or {}).get(section) or {}).get("tta", given)
    return tta_mode(given, f"{section}.tta")


def mirror_warning(hparams, mode: str | None, key: str) -> str:
    """A warning when `mode` averages mirrored views for a model that never trained on mirrors
    (random flips off, e.g. where train.augment.hflip=auto found mirrored images to look like
    other classes, or a head fitted on cached features): on spectrograms whose mirror is another
    class, hflip TTA took such a model from 100 % to 85 % test accuracy (docs/benchmarks.md)."""
    if not mode:
        return ""
    train = (hparams.get("config") or {}).get("train") or {}
    if (hparams.get("model") or {}).get("name") == "head":
        why = "a head fitted on cached features of the images as they are"
    elif (train.get("augment") or {}).get("hflip") is False:  # an export holds no train config
        why = "it trained with train.augment.hflip=false"
    else:
        return ""
    return (
        f"{key}={mode} averages each image with its mirror, but this model never saw mirrored "
        f"images ({why}); where a mirror is another class (text, arrows, spectrograms) that "
        f"costs accuracy. Compare command=test test.tta=false and test.tta={mode} first."
    )


def describe(mode: str) -> str:
    what = "each image and its mirror"
    if mode == "hflip+shift":
        what += ", each also shifted 1 px left and right"
    return f"{mode} TTA ({what}; {VIEWS[mode]}x compute per image)"


def tta_views(x, mode: str) -> list:
    """The views of batch `x` (N, C, H, W) whose logits are averaged; ONNX-exportable."""
    import torch.nn.functional as F

    views = [x, x.flip(3)]
    if mode == "hflip+shift":
        w = x.shape[3]
        views += [F.pad(v, (1, 0))[..., :w] for v in views[:2]]  # content moves right
        views += [F.pad(v, (0, 1))[..., 1:] for v in views[:2]]  # content moves left
    return views
