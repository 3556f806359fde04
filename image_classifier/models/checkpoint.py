"""The only place a `.ckpt` file is read: the module, and what `train` stored beside the weights
(the per-epoch history, the MLflow run id, the resolved training config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from image_classifier.errors import UserError


def read(path: str | Path, map_location: str = "cpu") -> dict:
    """The checkpoint as a dict, or a UserError that says why it is not one."""
    import pickle
    import zipfile

    import torch

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
    if not isinstance(ckpt, dict):
        raise UserError(f"{str(path)!r} is not a checkpoint written by image_classifier.")
    return ckpt


# (path, mtime) -> (history, MLflow run id, stored config): what is read besides the weights,
# kept so that a command asking for several of them (or loading the module too) reads once
_SUMMARIES: dict[tuple[str, float], tuple] = {}  # history, run id, config, classes, hash, digests


def _key(path: str | Path) -> tuple[str, float]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {str(path)!r} does not exist.")
    return str(path.resolve()), path.stat().st_mtime


def _remember(key: tuple[str, float], ckpt: dict) -> tuple:
    history = next(
        (
            list(s.get("epochs", []))
            for k, s in ckpt.get("callbacks", {}).items()
            if k.startswith("History")
        ),
        [],
    )
    run_id = ckpt.get("image_classifier", {}).get("mlflow_run_id")
    hp = ckpt.get("hyper_parameters", {})
    if len(_SUMMARIES) > 16:
        _SUMMARIES.clear()
    data_hash = (hp.get("data") or {}).get("hash")
    digests = ckpt.get("image_classifier", {}).get("train_digests")
    _SUMMARIES[key] = (history, run_id, hp.get("config"), hp.get("classes"), data_hash, digests)
    return _SUMMARIES[key]


def _cached(path: str | Path):
    key = _key(path)
    return _SUMMARIES.get(key) or _remember(key, read(path))


def history(path: str | Path) -> list[dict]:
    """Per-epoch metrics that the History callback stored."""
    return _cached(path)[0]


def mlflow_run_id(path: str | Path) -> str | None:
    """The MLflow run the checkpoint was trained in, when tracking was on."""
    return _cached(path)[1]


def trained_on(path: str | Path) -> tuple[list[str] | None, str | None]:
    """(class names, content hash) of the data the checkpoint was trained on."""
    return _cached(path)[3:5]


def train_digests(path: str | Path) -> list[str] | None:
    """The content digests of the images the checkpoint was trained on (a folder's; None for
    array data and checkpoints from before they were kept)."""
    return _cached(path)[5]


def stored_config(path: str | Path) -> dict | None:
    """The resolved training config (what train.resume continues with)."""
    return _cached(path)[2]


def load_module(path: str | Path, map_location: str = "cpu"):
    """The LightningModule from a checkpoint file alone; clear errors for anything else."""
    return open_module(path, map_location)[0]


def open_module(path: str | Path, map_location: str = "cpu") -> tuple:
    """(module, the checkpoint dict it came from), from one read of the file: what a command that
    fits a value and stores it back (`store_buffers`) uses, so the file is read and written once."""
    from image_classifier.models.module import ClassifierModule

    ckpt, hp = _read_ours(path, map_location)
    module = ClassifierModule(**hp)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    module.mlflow_run_id = ckpt.get("image_classifier", {}).get("mlflow_run_id")
    return module.to(map_location), ckpt


PREDICTING = ("net", "temperature", "thresholds")  # the state a prediction uses


def open_network(path: str | Path, map_location: str = "cpu"):
    """The trained network alone (`factory.TrainedNetwork`: weights, temperature, thresholds),
    for predicting: without Lightning and torchmetrics, whose imports were most of a .ckpt
    `infer`'s start (importing the module took 4.2 s, the network's own 1.2 s, CPU B)."""
    import torch

    from image_classifier.models.factory import TrainedNetwork

    ckpt, hp = _read_ours(path, map_location)
    network = TrainedNetwork(hp)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.split(".")[0] in PREDICTING}
    state.setdefault("temperature", torch.ones(()))  # written before calibration existed
    network.load_state_dict(state)
    network.mlflow_run_id = ckpt.get("image_classifier", {}).get("mlflow_run_id")
    return network.to(map_location)


def _read_ours(path: str | Path, map_location: str) -> tuple[dict, dict]:
    """(the checkpoint, its hyperparameters as the module takes them), read once."""
    key = _key(path)
    ckpt = read(path, map_location)
    _remember(key, ckpt)
    hp = ckpt.get("hyper_parameters")
    if not hp or "classes" not in hp or "state_dict" not in ckpt:
        raise UserError(f"{str(path)!r} is a checkpoint, but not one written by image_classifier.")
    # the weights come from the checkpoint: never fetch pretrained ones again
    return ckpt, {**hp, "model": {**hp["model"], "pretrained": False}}


def store_buffers(path: str | Path, ckpt: dict, **values) -> None:
    """Store fitted values (the temperature, multi-label thresholds) in `ckpt`, the dict
    `open_module` read from `path`, with the weights and in the plain summary, and write it back
    atomically."""
    import os

    import torch

    path = Path(path)
    for name, value in values.items():
        ckpt["state_dict"][name] = torch.tensor(value, dtype=torch.float32)
        ckpt.setdefault("image_classifier", {})[name] = value
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class StartingPoint:
    """What `train.init_from` takes from a checkpoint: read once, copied into the new network."""

    path: Path
    config: dict  # the resolved training config it was trained with
    classes: list[str]
    preprocessing: dict
    state: dict  # the network's tensors (the module's `net.net.*`)


def starting_point(path: str | Path) -> StartingPoint:
    """A checkpoint `train` wrote, as the start of a new run on other data; a UserError for a
    file that is not one, or a model with nothing to start from."""
    ckpt = read(path)
    hp = ckpt.get("hyper_parameters") or {}
    if not hp.get("config") or "classes" not in hp or "state_dict" not in ckpt:
        raise UserError(
            f"train.init_from: {str(path)!r} is not a checkpoint written by this tool's train."
        )
    name = hp["model"]["name"]
    if name in ("head", "baseline"):
        raise UserError(
            f"train.init_from: {str(path)!r} is a model={name}, which has no network of its own "
            "to start from (a head's backbone is the feature cache's). Start from a checkpoint "
            "of an image model, or train model=head again."
        )
    state = {
        k.removeprefix("net.net."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("net.net.")
    }
    return StartingPoint(Path(path), hp["config"], list(hp["classes"]), hp["preprocessing"], state)
