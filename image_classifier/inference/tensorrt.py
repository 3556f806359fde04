"""The TensorRT runtime: a serialized engine (from `command=export-trt`) and its metadata file.

TensorRT is not part of the default install: its wheels come from NVIDIA's own index and need an
NVIDIA GPU. Without either, loading an engine exits 2 and says what is missing and how to install
it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from image_classifier.errors import UserError
from image_classifier.inference.meta import ModelMeta

INSTALL_HINT = (
    "On a machine with an NVIDIA GPU and driver: `uv pip install tensorrt` (NVIDIA's wheels, "
    "matching your CUDA major version, e.g. tensorrt-cu12), then run the command again."
)


def require_tensorrt():
    """The tensorrt module and torch with CUDA, or a UserError naming what is missing."""
    missing = []
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    except ImportError:
        missing.append("torch")
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("the TensorRT Python package (`import tensorrt` failed)")
    if missing:
        raise UserError(
            f"export-trt and .engine models need {' and '.join(missing)}. {INSTALL_HINT}"
        )
    return trt


def meta_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


class TensorRTPredictor:
    backend = "tensorrt"

    def __init__(self, path: Path):
        trt = require_tensorrt()
        import torch

        self.torch = torch
        side = meta_path(path)
        if not side.exists():
            raise UserError(
                f"{path} has no metadata file beside it ({side.name}); rebuild it with "
                "command=export-trt."
            )
        self.meta = ModelMeta.from_dict(json.loads(side.read_text()))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path} is not a TensorRT engine this TensorRT version can load.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        )
        self.output = next(
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        )
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        outs = []
        stream = torch.cuda.current_stream()
        for start in range(0, len(batch), self.max_batch):
            x = torch.from_numpy(
                np.ascontiguousarray(batch[start : start + self.max_batch], dtype=np.float32)
            ).cuda()
            out = torch.empty((len(x), len(self.meta.classes)), dtype=torch.float32, device="cuda")
            self.context.set_input_shape(self.input, tuple(x.shape))
            self.context.set_tensor_address(self.input, x.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            stream.synchronize()
            outs.append(out.cpu().numpy())
        return np.concatenate(outs)
