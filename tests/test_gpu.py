"""The CUDA paths: training on a GPU (bf16 mixed precision), the checkpoint backend on CUDA and
ONNX Runtime's CUDA provider. Skipped, with the reason, on machines without an NVIDIA GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, make_class_folders

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")

GPU = ["trainer.accelerator=gpu", "logger.enabled=false"]


@pytest.fixture(scope="module")
def gpu_trained(tmp_path_factory):
    from lightning.pytorch.callbacks import Callback

    from image_classifier.training.train import run_train

    class Spy(Callback):  # where the weights and the batches are while training
        def __init__(self):
            self.devices = set()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.devices.add((next(module.parameters()).device.type, batch[0].device.type))

    root = tmp_path_factory.mktemp("gpu")
    images = make_class_folders(root / "images", per_class=16)
    spy = Spy()
    cfg = compose_cfg(
        root,
        "data=folder",
        f"data.root={images}",
        "data.size=[16,16]",
        "train.epochs=5",
        *GPU,
    )
    result = run_train(cfg, callbacks=[spy])
    return root, result, images, spy.devices


def test_device_batches_on_cuda_equal_the_cpu_batches():
    from image_classifier.data.device import DeviceBatches, EpochPermutation

    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50)
    gpu = DeviceBatches(images, labels, 8, EpochPermutation(50, 1), "cuda")
    cpu = DeviceBatches(images, labels, 8, EpochPermutation(50, 1), "cpu")
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert xg.device.type == "cuda" and xg.dtype == torch.uint8
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)


def test_batch_augmentation_runs_on_the_gpu():
    from image_classifier.data.augment import augment_batch

    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, device="cuda")
    y = augment_batch(x, hflip=True, shift=2, erase=0.5)
    assert y.device.type == "cuda" and y.shape == x.shape and y.dtype == torch.uint8


def test_training_runs_on_the_gpu_in_bf16(gpu_trained):
    _, result, _, devices = gpu_trained
    assert devices == {("cuda", "cuda")}  # the weights and every batch were on the GPU
    assert result["precision"] == "bf16-mixed"  # trainer.precision=null picks it on CUDA
    assert result["batching"].startswith("on the device (cuda")  # uint8 data held on the GPU
    assert result["decoded_cache"]  # the folder was decoded once, then batched from the GPU
    assert Path(result["checkpoint"]).is_file()
    assert result["best_score"] is not None and result["best_score"] > 0.5  # it learned
    # The checkpoint is portable: it loads on a machine without a GPU.
    from image_classifier.models.checkpoint import load_module

    module = load_module(Path(result["checkpoint"]), map_location="cpu")
    assert next(module.parameters()).device.type == "cpu"


def _pixels(images: Path, predictor) -> np.ndarray:
    from image_classifier.data.images import load_array

    files = sorted(images.rglob("*.png"))
    return np.stack([load_array(f, predictor.meta.preprocessing) for f in files])


def test_checkpoint_backend_on_cuda_matches_cpu(gpu_trained):
    from image_classifier.inference.predictor import load_predictor

    _, result, images, _ = gpu_trained
    gpu = load_predictor(result["checkpoint"], device="cuda")
    cpu = load_predictor(result["checkpoint"], device="cpu")
    assert gpu.device == "cuda" and cpu.device == "cpu"
    x = _pixels(images, cpu)
    np.testing.assert_allclose(gpu.predict(x), cpu.predict(x), atol=1e-4)


def test_onnx_runtime_cuda_provider_matches_cpu(gpu_trained):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (onnxruntime-gpu is x86-64 Linux)")
    from image_classifier.export.onnx import run_export_onnx
    from image_classifier.inference.predictor import load_predictor

    root, result, images, _ = gpu_trained
    onnx_path = Path(
        run_export_onnx(compose_cfg(root, f"export.checkpoint={result['checkpoint']}", *GPU))[
            "output"
        ]
    )
    gpu = load_predictor(onnx_path, device="cuda")
    cpu = load_predictor(onnx_path, device="cpu")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert cpu.providers == ["CPUExecutionProvider"]
    x = _pixels(images, cpu)
    p_gpu, p_cpu = gpu.predict(x), cpu.predict(x)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=1e-4)
    assert (p_gpu.argmax(1) == p_cpu.argmax(1)).all()
