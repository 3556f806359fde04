"""`command=export-triton`: an exported .onnx file -> a Triton Inference Server model repository.

    <output>/<name>/config.pbtxt     platform onnxruntime_onnx, inputs/outputs read from the ONNX
                                     graph, dynamic batching, instance group
    <output>/<name>/1/model.onnx     the model, unchanged (its metadata still inside)
    <output>/<name>/labels.txt       class names in output order (Triton's classification extension)
    <output>/<name>/preprocessing.json  what a client must do to an image before sending it

Triton takes tensors, not images: a client decodes, converts to the model's channels and resizes
(see preprocessing.json; `image_classifier.data.images.to_array` does exactly that) and sends
float32 NCHW pixels in 0..255. The normalisation is inside the graph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from image_classifier.errors import UserError

# ONNX TensorProto element types -> Triton data types
TRITON_TYPES = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
}
KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")


def _tensors(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out.append({"name": v.name, "data_type": TRITON_TYPES[t.elem_type], "dims": dims})
    return out


def model_signature(onnx_path: Path) -> dict:
    """Inputs and outputs of the graph (names, Triton types, dims with batch first) and metadata."""
    import onnx

    from image_classifier.inference.predictor import METADATA_KEY

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta:
        raise UserError(
            f"{onnx_path} has no image_classifier metadata; export it with "
            "`uv run python commands.py command=export-onnx` first."
        )
    return {
        "inputs": _tensors(i for i in model.graph.input if i.name not in initializers),
        "outputs": _tensors(model.graph.output),
        "meta": json.loads(meta[METADATA_KEY]),
    }


def _tensor_block(t: dict, label_file: str | None = None) -> str:
    dims = ", ".join(str(d) for d in t["dims"][1:])  # Triton's dims exclude the batch axis
    extra = f'\n    label_filename: "{label_file}"' if label_file else ""
    return (
        f'  {{\n    name: "{t["name"]}"\n    data_type: {t["data_type"]}\n'
        f"    dims: [ {dims} ]{extra}\n  }}"
    )


def triton_config(
    name: str, sig: dict, max_batch_size: int, max_queue_delay_us: int, instances: int, kind: str
) -> str:
    for t in sig["inputs"] + sig["outputs"]:
        if not t["dims"] or t["dims"][0] != -1:
            raise UserError(
                f"Tensor {t['name']!r} has no dynamic batch axis (dims {t['dims']}); "
                "re-export with the current export-onnx."
            )
    inputs = ",\n".join(_tensor_block(t) for t in sig["inputs"])
    outputs = ",\n".join(
        _tensor_block(t, "labels.txt" if i == 0 else None) for i, t in enumerate(sig["outputs"])
    )
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    )


def export_triton(
    onnx_path: Path,
    output: Path,
    name: str,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 1000,
    instances: int = 1,
    kind: str = "KIND_AUTO",
) -> Path:
    if kind not in KINDS:
        raise UserError(f"export.triton.kind={kind!r} is not one of {', '.join(KINDS)}.")
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise UserError(
            f"export.triton.name={name!r}: use a plain folder name (letters, digits, _ -)."
        )
    if int(max_batch_size) < 1:
        raise UserError(f"export.triton.max_batch_size={max_batch_size} must be at least 1.")
    sig = model_signature(onnx_path)
    config = triton_config(
        name, sig, int(max_batch_size), int(max_queue_delay_us), int(instances), kind
    )
    output.mkdir(parents=True, exist_ok=True)
    final = output / name
    # built beside its destination, swapped in only when complete
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=output))
    staging.chmod(0o755)  # mkdtemp makes it private; a server in a container must read it
    try:
        (staging / "1").mkdir()
        shutil.copyfile(onnx_path, staging / "1" / "model.onnx")
        (staging / "config.pbtxt").write_text(config, encoding="utf-8")
        (staging / "labels.txt").write_text(
            "\n".join(sig["meta"]["classes"]) + "\n", encoding="utf-8"
        )
        pre = {
            "preprocessing": sig["meta"]["preprocessing"],
            "input": sig["meta"].get("input"),
            "output": sig["meta"].get("output"),
            "source": str(onnx_path),
        }
        (staging / "preprocessing.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
        if final.exists():
            old = output / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def run_export_triton(cfg) -> dict:
    from image_classifier import runs

    t = cfg.export.triton
    onnx_path = runs.model_file(cfg, t.get("onnx"), "export.triton.onnx")
    if not onnx_path.is_file() or onnx_path.suffix != ".onnx":
        raise UserError(
            f"export.triton.onnx={str(onnx_path)!r} is not an .onnx file; export one "
            "with `uv run python commands.py command=export-onnx`."
        )
    output = Path(t.output)
    if not output.is_absolute():
        output = Path(cfg.paths.root) / output
    name = t.get("name") or "image_classifier"
    folder = export_triton(
        onnx_path, output, name, t.max_batch_size, t.max_queue_delay_us, t.instances, t.kind
    )
    print(
        "\n".join(
            [
                f"Triton model repository: {output} (model {name!r} from {onnx_path})",
                f"  {folder}/config.pbtxt, {folder}/1/model.onnx, {folder}/labels.txt, "
                f"{folder}/preprocessing.json",
                f"  start: docker run --rm -p8000:8000 -p8001:8001 -v {output.resolve()}:/models "
                "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models",
            ]
        )
    )
    return {"repository": str(output), "model": str(folder)}
