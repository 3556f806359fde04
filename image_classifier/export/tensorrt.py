"""`command=export-trt`: ONNX -> TensorRT engine (TensorRT 10 Python API), metadata beside it.

TensorRT is not part of the default install: its wheels come from NVIDIA's own index and need an
NVIDIA GPU. Without either, the command exits 2 and says what is missing and how to install it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from image_classifier.errors import ExportError, UserError
from image_classifier.inference.predictor import ModelMeta, OnnxPredictor

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


def build_engine(onnx_path: Path, engine_path: Path, t) -> dict:
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(float(t.workspace_gb) * (1 << 30))
    )
    precision = str(t.precision)
    if precision not in ("fp16", "fp32"):
        raise UserError(f"export.trt.precision={precision!r}: use fp16 or fp32.")
    if precision == "fp16":
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            precision = "fp32 (this GPU has no fast fp16)"
    inp = network.get_input(0)
    chw = tuple(inp.shape[1:])
    lo, opt, hi = int(t.min_batch), int(t.opt_batch), int(t.max_batch)
    if not 1 <= lo <= opt <= hi:
        raise UserError(
            f"export.trt batch range must satisfy 1 <= min_batch <= opt_batch <= max_batch, got {lo}, {opt}, {hi}."
        )
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (lo, *chw), (opt, *chw), (hi, *chw))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {onnx_path} (see its log above)."
        )
    tmp = engine_path.with_name(f".{engine_path.name}.partial")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    return {"precision": precision, "batch_range": [lo, opt, hi]}


class TensorRTPredictor:
    backend = "tensorrt"

    def __init__(self, path: Path):
        trt = require_tensorrt()
        import torch

        self.torch = torch
        side = meta_path(path)
        if not side.exists():
            raise UserError(
                f"{path} has no metadata file beside it ({side.name}); rebuild it with command=export-trt."
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


def run_export_trt(cfg) -> dict:
    started = time.perf_counter()
    t = cfg.export.trt
    require_tensorrt()  # fail in a second, before anything else is read
    if t.get("onnx"):
        onnx_path = Path(t.onnx)
    else:
        from image_classifier.training.checkpoints import newest_best

        onnx_path = newest_best(cfg.paths.root, cfg.paths.search, "export.trt.onnx").with_suffix(
            ".onnx"
        )
    if not onnx_path.is_file():
        raise UserError(
            f"ONNX model {str(onnx_path)!r} does not exist: run command=export-onnx first, or set export.trt.onnx=PATH."
        )
    engine = Path(t.output) if t.get("output") else onnx_path.with_suffix(".engine")
    ort = OnnxPredictor(onnx_path, device="cpu")
    info = build_engine(onnx_path, engine, t)
    meta = {**ort.meta.extra, "source_onnx": str(onnx_path), "tensorrt": info}
    meta_path(engine).write_text(json.dumps(meta, indent=2))
    trt_pred = TensorRTPredictor(engine)
    pre = ort.meta.preprocessing
    x = np.random.default_rng(0).integers(0, 256, (8, pre.channels, *pre.size)).astype(np.float32)
    diff = float(np.abs(trt_pred.predict(x) - ort.predict(x)).max())
    if diff > float(t.tolerance):
        engine.unlink(missing_ok=True)
        meta_path(engine).unlink(missing_ok=True)
        raise ExportError(
            f"TensorRT and ONNX Runtime disagree: max |dp| {diff:.2e} > {t.tolerance}; engine removed."
        )
    print(
        f"Built {engine} ({info['precision']}, batch {info['batch_range']}) from {onnx_path} in "
        f"{time.perf_counter() - started:.0f}s; parity vs ONNX Runtime max |dp| {diff:.1e}; metadata in {meta_path(engine).name}"
    )
    return {"engine": str(engine), "parity": diff, **info}
