"""`command=export-trt`: ONNX -> TensorRT engine (TensorRT 10 Python API), metadata beside it.

The runtime that loads engines is `image_classifier/inference/tensorrt.py`; it also says what is
missing when TensorRT or a GPU is not there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from image_classifier import runs
from image_classifier.errors import ExportError, UserError
from image_classifier.inference.predictor import OnnxPredictor
from image_classifier.inference.tensorrt import TensorRTPredictor, meta_path, require_tensorrt

PRECISIONS = ("fp16", "fp32")  # export.trt.precision


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
    if precision not in PRECISIONS:
        raise UserError(f"export.trt.precision={precision!r}: use {' or '.join(PRECISIONS)}.")
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
            "export.trt batch range must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
            f"{lo}, {opt}, {hi}."
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


def run_export_trt(cfg) -> dict:
    started = time.perf_counter()
    t = cfg.export.trt
    require_tensorrt()  # fail in a second, before anything else is read
    onnx_path = runs.checkpoint(cfg, t.get("onnx"), "export.trt.onnx")
    if not t.get("onnx"):
        onnx_path = onnx_path.with_suffix(".onnx")
    if not onnx_path.is_file():
        raise UserError(
            f"ONNX model {str(onnx_path)!r} does not exist: run command=export-onnx first, or set "
            "export.trt.onnx=PATH."
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
            f"TensorRT and ONNX Runtime disagree: max |dp| {diff:.2e} > {t.tolerance}; engine "
            "removed."
        )
    print(
        f"Built {engine} ({info['precision']}, batch {info['batch_range']}) from {onnx_path} in "
        f"{time.perf_counter() - started:.0f}s; parity vs ONNX Runtime max |dp| {diff:.1e}; "
        f"metadata in {meta_path(engine).name}"
    )
    return {"engine": str(engine), "parity": diff, **info}
