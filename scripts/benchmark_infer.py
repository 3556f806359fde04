"""Inference benchmark: cold-start `infer` on one image, and ONNX Runtime vs PyTorch eager.

    uv run python scripts/benchmark_infer.py                # about 3 minutes on 2 cores
    uv run python scripts/benchmark_infer.py --device cuda  # ONNX Runtime's CUDA provider vs
                                                            # PyTorch eager on the GPU

1. Cold start through the exact command lines README gives (`uv run python commands.py
   command=infer ...` on one image with an .onnx model and with the same network's .ckpt, and a
   bad config value that exits 2),
   beside `uv run --no-sync python -c pass` and the same infer without uv, alternating, median
   of 5 rounds.
2. Throughput (images/s) of ONNX Runtime vs PyTorch eager (inference_mode) at batch 1 and 32, for
   the default model (cnn, 28x28 grey) and a timm resnet18 (224x224 RGB), same thread count, both
   fed the same float32 pixels; weights are random (speed does not depend on them). On `--device
   cuda` both take the pixels from host memory and return probabilities to it (what `infer` and
   `serve` do), at batch 1, 32 and 256; `--skip-cold` leaves out part 1, `--cold-only` part 2.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build(name: str, size: int, channels: int, classes: int = 10):
    from image_classifier.models.module import ClassifierModule

    spec = {"name": name}
    if name == "cnn":
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "cnn.yaml"))
    from image_classifier.data.images import Preprocessing

    pre = Preprocessing(
        size=(size, size), channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels
    ).to_dict()
    optim = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0}
    return ClassifierModule(
        model=spec, classes=[f"c{i}" for i in range(classes)], preprocessing=pre, optim=optim
    ).eval()


def rate(fn, batch: np.ndarray, seconds: float = 4.0, min_iters: int = 5) -> float:
    fn(batch)  # warm-up
    fn(batch)
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn(batch)
        n += 1
    return n * len(batch) / (time.perf_counter() - t0)


def uv_binary() -> str:
    """The uv that started this script (`uv run` sets UV), else the project's .uv/ or PATH's."""
    found = os.environ.get("UV") or shutil.which("uv") or str(ROOT / ".uv" / "bin" / "uv")
    if not Path(found).exists():
        sys.exit("uv not found: run this script as README does, `uv run python scripts/...`.")
    return found


def checkpoint_of(module, path: Path) -> Path:
    """A .ckpt of `module` as `train` writes the parts a predictor reads (weights and
    hyperparameters), for the cold start of `infer` on a checkpoint."""
    import torch

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def cold_start(model: Path, ckpt: Path, tmp: Path, rounds: int = 5) -> None:
    """The exact command lines README gives, each a new process, alternating in every round so
    they share the machine's state; PYTHONDONTWRITEBYTECODE is unset as on a user's machine (the
    first start after an install writes the bytecode; the warm-up round pays it)."""
    from PIL import Image

    img = tmp / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(img)
    uv = uv_binary()
    infer = ["command=infer", f"infer.model={model}", f"infer.input={img}"]
    on_ckpt = ["command=infer", f"infer.model={ckpt}", f"infer.input={img}"]
    lines = {
        "uv run python commands.py command=infer (one image)": (
            [uv, "run", "python", "commands.py", *infer],
            0,
        ),
        "uv run python commands.py command=infer (one image, the same network's .ckpt)": (
            [uv, "run", "python", "commands.py", *on_ckpt],
            0,
        ),
        "uv run python commands.py command=train train.optimizer=adamx": (
            [uv, "run", "python", "commands.py", "command=train", "train.optimizer=adamx"],
            2,
        ),
        "uv run --no-sync python -c pass": ([uv, "run", "--no-sync", "python", "-c", "pass"], 0),
        "uv run python -c pass": ([uv, "run", "python", "-c", "pass"], 0),
        ".venv/bin/python commands.py command=infer (no uv)": (
            [sys.executable, "commands.py", *infer],
            0,
        ),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times: dict[str, list[float]] = {k: [] for k in lines}
    for r in range(rounds + 1):  # round 0 warms up (bytecode, page cache) and is not counted
        for name, (cmd, code) in lines.items():
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if r:
                times[name].append(time.perf_counter() - t0)
            if p.returncode != code:
                sys.exit(f"{' '.join(cmd)} exited {p.returncode}, not {code}:\n{p.stderr[-2000:]}")
    base = statistics.median(times["uv run --no-sync python -c pass"])
    targets = {
        "uv run python commands.py command=infer (one image)": 2.0,
        "uv run python commands.py command=train train.optimizer=adamx": 1.5,
    }
    print(f"\nCold start, wall seconds, median of {rounds} alternating rounds (uv {uv}):")
    print("| command line | median s | min-max s | / `uv run --no-sync python -c pass` | target |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        goal = (
            f"<= {targets[name]} s: {'met' if med <= targets[name] else 'NOT met'}"
            if (name in targets)
            else ""
        )
        print(
            f"| `{name}` | {med:.2f} | {min(ts):.2f}-{max(ts):.2f} | {med / base:.1f}x | {goal} |"
        )


def main():
    import argparse

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--skip-cold", action="store_true", help="only the throughput table")
    ap.add_argument("--cold-only", action="store_true", help="only the cold-start table")
    args = ap.parse_args()
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU here.")

    from image_classifier.export.onnx import export_onnx
    from image_classifier.inference.predictor import OnnxPredictor

    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    rows = []
    models = {}
    for name, size, channels in (("cnn", 28, 1), ("resnet18", 224, 3)):
        module = build(name, size, channels)
        path = tmp / f"{name}.onnx"
        export_onnx(module, Path(f"<random {name}>"), path, 17)
        models[name] = (module, path, size, channels)
        ort = OnnxPredictor(path, device=dev, threads=threads)
        if dev == "cuda" and ort.providers[0] != "CUDAExecutionProvider":
            sys.exit(f"ONNX Runtime did not start its CUDA provider (providers: {ort.providers}).")
        net = module.net.to(dev)

        def eager(x, net=net):
            with torch.inference_mode():
                return torch.softmax(net(torch.from_numpy(x).to(dev)), dim=1).cpu().numpy()

        for bs in () if args.cold_only else (1, 32) if dev == "cpu" else (1, 32, 256):
            x = (
                np.random.default_rng(0)
                .integers(0, 256, (bs, channels, size, size))
                .astype(np.float32)
            )
            r_ort, r_pt = rate(ort.predict, x), rate(eager, x)
            rows.append((name, bs, r_ort, r_pt))
            print(
                f"  {name} batch {bs}: onnxruntime {r_ort:.0f} img/s, pytorch {r_pt:.0f} img/s, "
                f"ratio {r_ort / r_pt:.2f}"
            )

    if args.skip_cold:
        table(rows, f"{dev}, {threads} CPU threads")
        return
    cold_start(models["cnn"][1], checkpoint_of(models["cnn"][0], tmp / "cnn.ckpt"), tmp)
    if rows:
        table(rows, f"{dev}, {threads} threads")


def table(rows, where: str):
    print(f"Throughput on {where} (ONNX Runtime / PyTorch eager; target >= 1.3 at batch 1 on CPU):")
    print("| model | batch | ONNX Runtime img/s | PyTorch eager img/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, bs, a, b in rows:
        print(f"| {name} | {bs} | {a:.0f} | {b:.0f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
