"""Finding and opening the self-describing checkpoints that `train` writes."""

from __future__ import annotations

from pathlib import Path

from image_classifier.errors import UserError


def newest_best(root: str | Path, search: list[str]) -> Path:
    """The most recently written best checkpoint under <root>/<each of search>."""
    root = Path(root)
    found = [p for d in search for p in (root / d).glob("**/checkpoints/best*.ckpt")]
    if not found:
        where = ", ".join(f"{root / d}/" for d in search)
        raise UserError(
            f"No trained checkpoint found under {where}. Train one first "
            "(`uv run python commands.py command=train`) or name one with test.checkpoint=PATH."
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def load_module(path: str | Path, map_location: str = "cpu"):
    """The LightningModule from a checkpoint file alone; clear errors for anything else."""
    import pickle
    import zipfile

    from image_classifier.models.module import ClassifierModule

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        return ClassifierModule.load_from_checkpoint(path, map_location=map_location)
    except (KeyError, TypeError) as e:
        raise UserError(
            f"{str(path)!r} is a checkpoint, but not one written by image_classifier ({e})."
        ) from None
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint file ({type(e).__name__}: {e})."
        ) from None
