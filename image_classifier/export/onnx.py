"""`command=export-onnx`: checkpoint -> .onnx with its own metadata, checked and parity-tested.

The graph takes float32 NCHW pixels in 0..255 (normalisation is inside) with a dynamic batch axis
and outputs class probabilities. The file is written under a temporary name and moved into place
only after `onnx.checker` and the parity check pass, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from image_classifier import runs, tracking
from image_classifier.errors import ExportError, UserError, override
from image_classifier.inference.predictor import METADATA_KEY, OnnxPredictor
from image_classifier.models import checkpoint as ckpt_file
from image_classifier.models.description import model_description
from image_classifier.models.tta import chosen_tta, describe, mirror_warning

log = logging.getLogger(__name__)


class _Probabilities(torch.nn.Module):
    """The deployed graph: pixels in, what `module.probabilities` makes of the logits out
    (calibrated softmax; multi-label: one sigmoid per label)."""

    def __init__(self, module, tta: str | None = None):
        super().__init__()
        self.module, self.tta = module, tta

    def forward(self, image):
        return self.module.probabilities(self.module.logits(image, self.tta))


def parity_inputs(module, images, n_real: int) -> tuple[np.ndarray, np.ndarray | None]:
    """8 random inputs, and up to n_real of `images`: uint8 NCHW pixels at the model's input
    size (what a checkpoint carries as "parity_images", or a few a caller passes); None
    when there are none."""
    from image_classifier.data.images import Preprocessing

    pre = Preprocessing.from_dict(module.hparams.preprocessing)
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, (8, pre.channels, *pre.size)).astype(np.float32)
    if images is None or n_real <= 0 or not len(images):
        return random, None
    images = np.asarray(images)
    idx = np.linspace(0, len(images) - 1, min(n_real, len(images))).astype(int)
    return random, images[idx].astype(np.float32)


def export_onnx(module, checkpoint: Path, output: Path, opset: int) -> None:
    net = _Probabilities(module.eval(), module.tta).eval()
    pre = module.hparams.preprocessing
    dummy = torch.zeros(2, pre["channels"], *pre["size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (dummy,),
            str(output),
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    model = onnx.load(str(output))
    meta = model_description(module, checkpoint)
    for key, value in {
        METADATA_KEY: json.dumps(meta),
        "classes": json.dumps(meta["classes"]),
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = (
        f"image_classifier model: {len(meta['classes'])} classes, from {checkpoint.name}"
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(output))


def write_checked(module, checkpoint: Path, output: Path, cfg, images=None) -> tuple[dict, int]:
    """Export under a temporary name, check parity on 8 random inputs and on `images` (see
    `parity_inputs`), then move into place: (max |dp| per input kind, number of real images
    checked). A failed check leaves no file at `output`."""
    e = cfg.export
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        export_onnx(module, checkpoint, tmp, int(e.opset))
        random, real = parity_inputs(module, images, int(e.parity_images))
        ort = OnnxPredictor(tmp, device="cpu")
        diffs = {}
        for name, x in (("random", random), ("real", real)):
            if x is None:
                continue
            with torch.inference_mode():
                ref = module.probabilities(module.logits(torch.from_numpy(x), module.tta))
                ref = ref.numpy()
            diffs[name] = float(np.abs(ort.predict(x) - ref).max())
        worst = max(diffs.values())
        if worst > float(e.tolerance):
            raise ExportError(
                f"ONNX Runtime and PyTorch disagree: max |difference| of probabilities {worst:.2e} "
                f"> export.tolerance={e.tolerance} ({diffs}); {output} was not written."
            )
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return diffs, 0 if real is None else len(real)


def run_export_onnx(cfg, use_checkpoint_tta: bool = False) -> dict:
    """`use_checkpoint_tta`: the command line when export.tta is not on it: the graph gets the
    test-time augmentation the training config named for export (a recipe's)."""
    started = time.perf_counter()
    e = cfg.export
    checkpoint = runs.checkpoint(cfg, e.get("checkpoint"), "export.checkpoint")
    output = Path(e.output) if e.get("output") else checkpoint.with_suffix(".onnx")
    if output.suffix != ".onnx":
        raise UserError(f"export.output={str(output)!r} must end in .onnx.")
    module, ckpt = ckpt_file.open_module(checkpoint)
    module.tta = chosen_tta(module, "export", e.get("tta"), use_checkpoint_tta)
    diffs, n_real = write_checked(module, checkpoint, output, cfg, ckpt.get("parity_images"))
    run_id, model_uri = _log_to_mlflow(cfg, checkpoint, output)
    parity = ", ".join(f"{k} images {v:.1e}" for k, v in diffs.items())
    warning = mirror_warning(module.hparams, module.tta, "export.tta")
    print(
        "\n".join(
            line
            for line in [
                f"Exported {checkpoint} -> {output} ({output.stat().st_size / 1e6:.1f} MB, opset "
                f"{e.opset}, dynamic batch) in {time.perf_counter() - started:.0f}s",
                f"  parity ONNX Runtime vs PyTorch, max |dp|: {parity} (8 random, {n_real} real "
                f"images the checkpoint carries; tolerance {e.tolerance})",
                f"  metadata: {len(module.classes)} classes, preprocessing "
                f"{dict(module.hparams.preprocessing)}"
                + (f"; {describe(module.tta)} in the graph" if module.tta else ""),
                f"  WARNING: {warning}" if warning else "",
                "  mlflow: "
                + (f"artifact of run {run_id}" if run_id else "not logged (no training run)"),
                f"  mlflow model (takes image bytes): {model_uri}; serve it with "
                f"`uv run mlflow models serve -m {model_uri} --env-manager local -p 5001`"
                if model_uri
                else "",
                "  next: uv run python commands.py command=infer "
                f"{override('infer.model', output)} infer.input=PATH",
            ]
            if line
        )
    )
    result = {"output": str(output), "parity": diffs, "mlflow_run_id": run_id}
    result["mlflow_model"] = model_uri  # this export's pyfunc model (None when not logged)
    if e.get("register"):
        from image_classifier.export.registry import print_registered, register

        name = None if e.register is True else str(e.register)  # true: the default name
        result["registered"] = register(cfg, output, name, cfg.register.get("alias"), model_uri)
        print_registered(result["registered"], output)
    return result


def _log_to_mlflow(cfg, checkpoint: Path, output: Path) -> tuple[str | None, str | None]:
    """Attach the export (and the MLflow model that takes image bytes) to the checkpoint's
    training run, when there is one: (run id, model URI)."""
    run_id, model_uri = ckpt_file.mlflow_run_id(checkpoint), None
    if not cfg.logger.enabled or not run_id:
        return None, None
    logger = tracking.open_run(cfg, run_id)
    try:
        tracking.log_artifacts(logger, [output], artifact_path="export")
        if cfg.export.get("mlflow_model", True):
            from image_classifier.export.mlflow_model import log_mlflow_model

            with tracking.active_run(logger):
                model_uri = log_mlflow_model(output)
    except Exception as err:  # the export itself succeeded; tracking is best effort here
        log.warning("Could not log %s to MLflow run %s: %s", output, run_id, err)
        return None, None
    return run_id, model_uri
