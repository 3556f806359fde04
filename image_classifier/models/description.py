"""The description a model file carries (see `model_description`)."""

from __future__ import annotations


def model_description(module, source) -> dict:
    """What a model file says about itself: classes, preprocessing, architecture, temperature,
    TTA, multi-label thresholds, the data and the run it came from, and its input and output.
    The one description: `export-onnx` writes it into the ONNX file (and TensorRT's engine
    beside it), and the PyTorch predictor reads it from the module of a .ckpt."""
    hp = module.hparams
    multi = (
        {"multi_label": True, "thresholds": module.thresholds.tolist()}
        if module.multi_label
        else {}
    )
    return {
        "format": 1,
        **multi,
        "temperature": float(module.temperature),
        "tta": module.tta,
        "classes": module.classes,
        "preprocessing": dict(hp["preprocessing"]),
        "model": dict(hp["model"]),
        "source_checkpoint": str(source),
        "data_hash": (hp.get("data") or {}).get("hash"),
        "data_name": (hp.get("data") or {}).get("name"),
        "data_config": (hp.get("config") or {}).get("data"),  # test on an export: the same split
        "mlflow_run_id": getattr(module, "mlflow_run_id", None),
        "input": "image: float32 [batch, channels, height, width], pixel values 0..255",
        "output": "probabilities: float32 [batch, classes], in the order of `classes`"
        + (
            "; each label's own sigmoid, present when >= its threshold"
            if module.multi_label
            else ""
        ),
    }
