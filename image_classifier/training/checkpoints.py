"""Finding and opening the self-describing checkpoints that `train` writes."""

from __future__ import annotations

from pathlib import Path

from image_classifier.errors import UserError


def newest_best(root: str | Path, search: list[str], setting: str) -> Path:
    """The most recently written best checkpoint under <root>/<each of search>; `setting` is the
    option that would have named a file instead (the error message tells the user to set it)."""
    return newest(root, search, "best*.ckpt", setting)


def newest(root: str | Path, search: list[str], pattern: str, setting: str) -> Path:
    root = Path(root)
    found = [p for d in search for p in (root / d).glob(f"**/checkpoints/{pattern}")]
    if not found:
        where = ", ".join(f"{root / d}/" for d in search)
        raise UserError(
            f"No trained checkpoint found under {where}. Train one first "
            f"(`uv run python commands.py command=train`) or name one with {setting}=PATH."
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def load_module(path: str | Path, map_location: str = "cpu"):
    """The LightningModule from a checkpoint file alone; clear errors for anything else."""
    import pickle
    import zipfile

    import torch

    from image_classifier.models.module import ClassifierModule

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        OSError,
    ) as e:
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint file ({type(e).__name__}: {e})."
        ) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "classes" not in hp or "state_dict" not in ckpt:
        raise UserError(f"{str(path)!r} is a checkpoint, but not one written by image_classifier.")
    # the weights come from the checkpoint: never fetch pretrained ones again
    hp = {**hp, "model": {**hp["model"], "pretrained": False}}
    module = ClassifierModule(**hp)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(map_location)
