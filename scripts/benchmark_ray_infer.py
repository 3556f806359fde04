"""`infer` on one process against `infer.engine=ray` on the same cores, side by side in one run.

    uv run python scripts/benchmark_ray_infer.py              # about 3 minutes on 2 cores
    uv run python scripts/benchmark_ray_infer.py --images 100000

A Ray head is started on this machine first (`ray start --head`, as a user with a cluster has
one already), so both commands pay only their own costs. Each command runs exactly as README
writes it (`uv run python commands.py command=infer ...`), on a folder of N and of N/4 PNG
files (28x28 grey, the default model's input), alternating engines, for `--rounds` rounds.

Printed per engine: the median wall time of the command at both sizes, its end-to-end rate at
N, and its marginal rate (the 3N/4 extra images over the extra seconds: the throughput once
started, without the start-up that does not grow with the input). The ratios are Ray over
local; the issue's target is >= 0.8 on one machine. Both engines' CSV rows are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n PNGs in 10 class folders: smooth random shapes (what photos of objects decode like)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (7, 7), dtype=np.uint8)
        img = Image.fromarray(small).resize((28, 28), Image.BILINEAR)
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.png")
    return root


def default_model(tmp: Path) -> Path:
    """The default CNN (random weights: speed does not depend on them), exported to ONNX."""
    from benchmark_infer import build

    from image_classifier.export.onnx import export_onnx

    path = tmp / "cnn.onnx"
    export_onnx(build("cnn", 28, 1), Path("<random cnn>"), path, 17)
    return path


def start_head(tmp: Path, cpus: int) -> tuple[str, list[str]]:
    from load_test import free_port  # beside this script

    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    cmd = [ray, "start", "--head", f"--port={port}", f"--num-cpus={cpus}"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={tmp / 'ray'}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"ray start failed:\n{p.stderr[-2000:]}")
    return f"127.0.0.1:{port}", [ray, "stop", "--force"]


def run(uv: str, model: Path, folder: Path, out: Path, engine: list[str], batch: int) -> float:
    cmd = [uv, "run", "python", "commands.py", "command=infer", f"infer.model={model}"]
    cmd += [f"infer.input={folder}", f"infer.output={out}", f"infer.batch_size={batch}", *engine]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return seconds


def main() -> None:
    from benchmark_infer import uv_binary

    from image_classifier.lineage import describe_machine, machine_info

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    print(f"machine: {describe_machine(machine_info())}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-", dir="/tmp"))  # AF_UNIX paths: short
    sizes = {"N/4": args.images // 4, "N": args.images}
    folders = {k: make_folder(tmp / k.replace("/", "_"), n) for k, n in sizes.items()}
    model, uv = default_model(tmp), uv_binary()
    address, stop = start_head(tmp, os.cpu_count() or 1)
    engines = {"local": [], "ray": ["infer.engine=ray", f"infer.address={address}"]}
    times = {(e, k): [] for e in engines for k in sizes}
    try:
        for r in range(args.rounds):
            for k, folder in folders.items():
                for e, extra in engines.items():
                    out = tmp / f"{e}-{k.replace('/', '_')}.csv"
                    times[e, k].append(run(uv, model, folder, out, extra, args.batch_size))
                    print(f"  round {r + 1}: {e} on {sizes[k]} images: {times[e, k][-1]:.1f} s")
    finally:
        subprocess.run(stop, capture_output=True)
    for k in sizes:
        same = (tmp / f"local-{k.replace('/', '_')}.csv").read_bytes() == (
            tmp / f"ray-{k.replace('/', '_')}.csv"
        ).read_bytes()
        print(f"rows on {sizes[k]} images: {'identical' if same else 'DIFFERENT'}")
    table(times, sizes, args)


def table(times: dict, sizes: dict, args) -> None:
    med = {key: statistics.median(ts) for key, ts in times.items()}
    extra = sizes["N"] - sizes["N/4"]
    rate = {e: sizes["N"] / med[e, "N"] for e in ("local", "ray")}
    marginal = {e: extra / max(med[e, "N"] - med[e, "N/4"], 1e-9) for e in ("local", "ray")}
    print(
        f"\n`uv run python commands.py command=infer ... infer.batch_size={args.batch_size}` "
        f"[infer.engine=ray infer.address=<local head>], median of {args.rounds} rounds:"
    )
    head = f"| engine | {sizes['N/4']} images, s | {sizes['N']} images, s | img/s end to end"
    print(f"{head} | img/s once started |")
    print("| --- | --- | --- | --- | --- |")
    for e in ("local", "ray"):
        print(
            f"| {e} | {med[e, 'N/4']:.1f} | {med[e, 'N']:.1f} | {rate[e]:,.0f} "
            f"| {marginal[e]:,.0f} |"
        )
    print(
        f"| ray / local | | | {rate['ray'] / rate['local']:.2f}x "
        f"| {marginal['ray'] / marginal['local']:.2f}x (target >= 0.8x) |"
    )


if __name__ == "__main__":
    main()
