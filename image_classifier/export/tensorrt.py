"""`command=export-trt`: ONNX -> TensorRT engine, metadata beside it. TensorRT 10.x and 11.x.

One build path for both: a strongly typed network, where precision comes from the ONNX graph's own
types. TensorRT 11 removed weak typing (`BuilderFlag.FP16`, `Builder.platform_has_fast_fp16`);
10.x accepts the strongly typed flag and 11.x always builds that way. So `precision=fp16` first
converts the graph to float16 with float32 inputs and outputs (onnxconverter-common's
`convert_float_to_float16(keep_io_types=True)`, the role NVIDIA's docs give ModelOpt AutoCast) and
builds from that. The graph conversion is tested on the CPU with ONNX Runtime; the engine build
has not run on a GPU here (TensorRT's wheels are not on the package registries these machines
reach).

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
SUPPORTED_MAJORS = (10, 11)  # TensorRT versions this build path is written for


def check_version(version: str) -> int:
    """The major version of an installed TensorRT this code supports, else a UserError."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = -1
    if major not in SUPPORTED_MAJORS:
        raise UserError(
            f"TensorRT {version} is installed; export-trt supports TensorRT 10.x and 11.x. "
            "Install one of those (`uv pip install 'tensorrt-cu12>=10,<12'`) or use the ONNX "
            "model with ONNX Runtime (infer.model=PATH.onnx)."
        )
    return major


def float16_graph(onnx_path: Path, out: Path) -> Path:
    """The ONNX model with float16 weights and computation and float32 inputs and outputs: what a
    strongly typed TensorRT build needs to run in fp16."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(onnx_path))
    _drop_noop_casts(model)
    model = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(model, str(out))
    return out


def _drop_noop_casts(model) -> None:
    """Remove Casts of float32 tensors to float32 (the model's `x.float()`, `logits.float()`):
    the converter mistakes them for its own input and output casts and leaves mismatched types."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.input, *inferred.value_info, *inferred.output]
    }
    graph = model.graph
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        float_to_float = types.get(node.input[0]) == to == onnx.TensorProto.FLOAT
        if node.op_type != "Cast" or not float_to_float or node.output[0] in outputs:
            continue
        for other in graph.node:
            other.input[:] = [node.input[0] if i == node.output[0] else i for i in other.input]
        graph.node.remove(node)


def build_engine(onnx_path: Path, engine_path: Path, t) -> dict:
    trt = require_tensorrt()
    check_version(trt.__version__)
    precision = str(t.precision)
    if precision not in PRECISIONS:
        raise UserError(f"export.trt.precision={precision!r}: use {' or '.join(PRECISIONS)}.")
    source = onnx_path
    if precision == "fp16":
        source = float16_graph(onnx_path, engine_path.with_name(f".{engine_path.stem}.fp16.onnx"))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: required on 11.x (where the flag is accepted and ignored), chosen on 10.x
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(source))
    if source != onnx_path:
        source.unlink(missing_ok=True)
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(float(t.workspace_gb) * (1 << 30))
    )
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
    return {"precision": precision, "batch_range": [lo, opt, hi], "tensorrt": trt.__version__}


def run_export_trt(cfg) -> dict:
    started = time.perf_counter()
    t = cfg.export.trt
    require_tensorrt()  # fail in a second, before anything else is read
    onnx_path = runs.model_file(cfg, t.get("onnx"), "export.trt.onnx")
    if not onnx_path.is_file() or onnx_path.suffix != ".onnx":
        raise UserError(
            f"export.trt.onnx={str(onnx_path)!r} is not an .onnx file: run command=export-onnx "
            "first, or set export.trt.onnx=PATH."
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
