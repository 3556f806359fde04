"""One predictor interface over three backends, chosen by the model file's extension:
.onnx (ONNX Runtime, the default), .ckpt (PyTorch), .engine/.plan (TensorRT).

Every model file carries its metadata (classes, preprocessing, source), so a predictor needs
nothing else. This module imports neither torch nor lightning at the top: the ONNX path stays light.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from image_classifier.errors import UserError
from image_classifier.inference.meta import ModelMeta
from image_classifier.rules import REGISTRY_PREFIX

METADATA_KEY = "image_classifier"
log = logging.getLogger(__name__)
BACKENDS = {".onnx": "onnxruntime", ".ckpt": "pytorch", ".engine": "tensorrt", ".plan": "tensorrt"}
DEVICES = ("auto", "cpu", "cuda")  # infer.device, serve.device


def has_nvidia_gpu() -> bool:
    """Without importing torch: is an NVIDIA driver with a device present?"""
    return os.path.exists("/proc/driver/nvidia/version") and any(
        os.path.exists(f"/dev/nvidia{i}") for i in range(16)
    )


class OnnxPredictor:
    backend = "onnxruntime"

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        ort.set_default_logger_severity(3)
        providers = ["CPUExecutionProvider"]
        cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers() and has_nvidia_gpu()
        if device in ("auto", "cuda") and cuda_ok:
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN libraries from the nvidia-* wheels
                ort.preload_dlls()
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise UserError(
                "device=cuda was asked for, but there is no NVIDIA GPU or no CUDA build of ONNX "
                "Runtime "
                "here. Use device=cpu or auto."
            )
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise UserError(
                f"{str(path)!r} is not a loadable ONNX model ({type(e).__name__}: {e})."
            ) from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise UserError(
                f"{str(path)!r} is an ONNX model without image_classifier metadata (class names, "
                "preprocessing). Export it with `uv run python commands.py command=export-onnx`."
            )
        self.meta = ModelMeta.from_dict(json.loads(raw))
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()
        if providers[0] != self.providers[0]:  # ONNX Runtime falls back to the CPU quietly
            msg = (
                "ONNX Runtime could not start its CUDA provider (CUDA or cuDNN libraries missing, "
                f"or not the CUDA {getattr(ort, 'cuda_version', '?')} "
                "that this onnxruntime-gpu build needs)"
            )
            if device == "cuda":
                raise UserError(f"device=cuda was asked for, but {msg}. Use device=cpu or auto.")
            log.warning("%s; running on the CPU.", msg)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """uint8 or float NCHW pixels (0..255) -> class probabilities (N, K)."""
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]


class TorchPredictor:
    backend = "pytorch"

    def __init__(self, path: Path, device: str = "auto"):
        import torch

        from image_classifier.models.checkpoint import open_network
        from image_classifier.models.description import model_description

        self.torch = torch
        self.device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        network = open_network(path, map_location=self.device)
        self.network = network.eval()
        self.meta = ModelMeta.from_dict({**model_description(network, path), "source": str(path)})

    def predict(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self.network(x).cpu().numpy()


def load_predictor(path: str | Path, device: str = "auto", threads: int | None = None):
    """The predictor for a model file; `threads`: ONNX Runtime's intra-op threads (None: its
    default, one per core)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file {str(path)!r} does not exist.")
    backend = BACKENDS.get(path.suffix.lower())
    if backend is None:
        raise UserError(
            f"Cannot tell the backend of {path.name!r} from its extension; use .onnx (ONNX "
            "Runtime), "
            ".ckpt (PyTorch checkpoint) or .engine (TensorRT)."
        )
    if backend == "onnxruntime":
        return OnnxPredictor(path, device, threads)
    if backend == "pytorch":
        return TorchPredictor(path, device)
    from image_classifier.inference.tensorrt import TensorRTPredictor

    return TensorRTPredictor(path)


def given_model(resolved: Path | None, setting_value, setting: str) -> Path:
    """The model file a command was handed (resolved by commands.py), else the setting's value
    when that is a path: resolving registry addresses and the newest export is `runs`' job."""
    if resolved is not None:
        return Path(resolved)
    if not setting_value or str(setting_value).startswith(REGISTRY_PREFIX):
        raise UserError(
            f"{setting}={setting_value!r}: a library caller passes the model file, e.g. "
            f"`model, registry = runs.model_location(cfg, cfg.{setting}, {setting!r})`; the "
            "command line resolves it itself."
        )
    return Path(str(setting_value))
