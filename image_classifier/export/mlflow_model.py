"""An MLflow pyfunc model that takes images, not tensors.

`predict` accepts a DataFrame (column `image`), a list, or a single value, where each image is raw
encoded bytes (PNG/JPEG/...), a base64 string, or a path to a file. It returns one infer row per
image (the shape `infer` writes). The signature declares `image` as binary, so MLflow's scoring
server base64-decodes JSON input itself and a plain curl works:

    uv run mlflow models serve -m models:/<model_id> --env-manager local -p 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d "{\"inputs\": {\"image\": [\"$(base64 -w0 img.png)\"]}}"

The ONNX file (with its metadata: classes, preprocessing) is the model's only artifact; the code it
needs (this package) travels in `code/`, and it runs on numpy, Pillow and ONNX Runtime alone.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import logging
import os
import re
import warnings
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

ARTIFACT_NAME = "image_classifier"
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from image_classifier.inference.predictor import OnnxPredictor

        self.predictor = OnnxPredictor(Path(context.artifacts["onnx"]), device="auto")

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """`model_input`: a DataFrame as pyfunc passes it (a list or one value when called
        directly). The hint is one MLflow infers no schema from: the signature below is given."""
        from image_classifier.inference.rows import decoded, rows_for

        meta = self.predictor.meta
        top_k = (params or {}).get("top_k")
        thresholds = meta.thresholds((params or {}).get("threshold"))
        items = list(_images(model_input))
        loaded = [decoded(data, meta.preprocessing, name) for name, data in items]
        return rows_for(self.predictor, [n for n, _ in items], loaded, top_k, thresholds)


def _values(model_input) -> list:
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, dict):
        value = model_input.get("image", next(iter(model_input.values()), []))
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(model_input, (bytes, bytearray, str, Path)):
        return [model_input]
    return list(model_input)


def _images(model_input):
    """(name, encoded bytes) for each image: bytes as they are, paths read, base64 decoded."""
    for i, v in enumerate(_values(model_input)):
        name = f"image[{i}]"
        if isinstance(v, (bytes, bytearray)):
            # MLflow's `inputs` JSON hands a binary column over as the base64 text's bytes
            yield name, _maybe_base64(bytes(v))
        elif isinstance(v, Path) or (isinstance(v, str) and len(v) < 4096 and Path(v).is_file()):
            yield str(v), Path(v).read_bytes()
        elif isinstance(v, str):
            try:
                yield name, base64.b64decode("".join(v.split()), validate=True)
            except (binascii.Error, ValueError):
                yield name, b""  # reported as an error row ("empty")
        else:
            yield name, b""


def _maybe_base64(data: bytes) -> bytes:
    """Encoded images never consist of base64 characters only (PNG starts with 0x89, JPEG 0xFF)."""
    if data and _BASE64.fullmatch(data):
        try:
            return base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            pass
    return data


def log_mlflow_model(onnx_path: Path, name: str = ARTIFACT_NAME) -> str:
    """Log the pyfunc model into the active MLflow run; returns its models:/ URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    package = Path(__file__).resolve().parents[1]
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        params=ParamSchema(
            [ParamSpec("top_k", "long", None), ParamSpec("threshold", "double", None)]
        ),
    )
    requirements = [
        f"{pkg}=={v}"
        for pkg in ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu")
        if (v := _version(pkg))
    ]
    # MLflow's own lines (the lock files it copied, pip's missing version, CloudPickle advice,
    # a download bar) came before the export's summary; its errors still raise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    quiet, level = logging.getLogger("mlflow"), logging.getLogger("mlflow").level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # advice about input examples, not problems
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=ImageClassifierModel(),
                artifacts={"onnx": str(onnx_path)},
                code_paths=[str(package)],
                signature=signature,
                pip_requirements=requirements,
            )
    finally:
        quiet.setLevel(level)
    return info.model_uri


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
