"""Load test for `command=serve`: N concurrent clients, M requests, real images, loopback only.

    uv run python scripts/load_test.py                   # default model, 16 clients, 2,000 requests
    uv run python scripts/load_test.py --model resnet18  # resnet18 at 224 px (random weights)
    uv run python scripts/load_test.py --model PATH.onnx --clients 32 --requests 5000

It starts the service itself on 127.0.0.1 (a free port), waits for /health, runs the clients
(asyncio + httpx, one keep-alive connection each, one image per request), stops the service with
SIGTERM and checks it exits cleanly. Bounded: it stops after --requests or --max-seconds, whichever
comes first. Then it runs the same images through ONNX Runtime in this process (decode +
preprocess + one image per call, as a service client's request is), and prints the ratio.

Images: Fashion-MNIST test images (data/, as PNG at their native 28x28), or for a 224-px model the
same images enlarged to 224x224 JPEGs, so decoding costs what it would for real photos.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def default_model() -> Path:
    """What `command=serve` serves without serve.model: the .onnx beside the newest best."""
    from image_classifier.config import compose_config
    from image_classifier.errors import UserError
    from image_classifier.runs import model_file

    cfg = compose_config(root=ROOT)
    try:
        return model_file(cfg, None, "--model")
    except UserError as e:
        sys.exit(str(e))


def resnet18_model(folder: Path) -> Path:
    from benchmark_infer import build  # beside this script: on sys.path as Python runs it

    from image_classifier.export.onnx import export_onnx

    out = folder / "resnet18.onnx"
    export_onnx(build("resnet18", 224, 3), folder / "resnet18.ckpt", out, 17)
    return out


def sample_images(folder: Path, size: int, n: int) -> list[bytes]:
    """n Fashion-MNIST test images encoded as files (PNG at 28 px, JPEG when enlarged)."""
    from PIL import Image

    from image_classifier.data.idx import read_idx

    raw = ROOT / "data" / "fashion_mnist" / "t10k-images-idx3-ubyte"
    if raw.exists():
        images = read_idx(raw)[:n]
    else:  # no data here: random pictures of the same size
        images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    encoded = []
    for arr in images:
        im = Image.fromarray(arr)
        buf = io.BytesIO()
        if size != 28:
            im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(
                buf, "JPEG", quality=90
            )
        else:
            im.save(buf, "PNG")
        encoded.append(buf.getvalue())
    return encoded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int) -> subprocess.Popen:
    import httpx

    cmd = [
        sys.executable,
        str(ROOT / "commands.py"),
        "command=serve",
        f"serve.model={model}",
        f"serve.port={port}",
        "serve.host=127.0.0.1",
        f"hydra.run.dir={tempfile.mkdtemp(prefix='serve-')}",
        "hydra.output_subdir=null",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the service exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("the service did not start within 120 s")


async def run_clients(
    url: str, images: list[bytes], clients: int, requests: int, max_seconds: float
):
    import httpx

    latencies: list[float] = []
    counts = {"2xx": 0, "4xx": 0, "5xx": 0, "connection errors": 0}
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def client(i: int):
        nonlocal issued
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            while issued < requests and time.perf_counter() < deadline:
                k = issued
                issued += 1
                data = images[k % len(images)]
                t0 = time.perf_counter()
                try:
                    r = await c.post(
                        url, files={"file": (f"{k}.img", data, "application/octet-stream")}
                    )
                except httpx.HTTPError:
                    counts["connection errors"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                counts[f"{r.status_code // 100}xx"] = counts.get(f"{r.status_code // 100}xx", 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, counts, time.perf_counter() - t0


def direct_rate(model: Path, images: list[bytes], n: int, max_seconds: float) -> float:
    """ONNX Runtime in this process: decode + preprocess + predict, one image per call."""
    from image_classifier.data.images import decode_bytes
    from image_classifier.inference.predictor import OnnxPredictor

    p = OnnxPredictor(model, device="cpu")
    pre = p.meta.preprocessing
    for data in images[:5]:  # warm-up
        p.predict(decode_bytes(data, pre)[None])
    done, t0 = 0, time.perf_counter()
    while done < n and time.perf_counter() - t0 < max_seconds:
        p.predict(decode_bytes(images[done % len(images)], pre)[None])
        done += 1
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default | resnet18 | PATH.onnx")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--max-seconds", type=float, default=300)
    ap.add_argument("--no-direct", action="store_true", help="skip the in-process comparison")
    args = ap.parse_args()
    from image_classifier.tracking import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "default":
            model = default_model()
        elif args.model == "resnet18":
            model = resnet18_model(Path(tmp))
        else:
            model = Path(args.model)
        from image_classifier.inference.predictor import OnnxPredictor

        size = OnnxPredictor(model, device="cpu").meta.preprocessing.size[0]
        images = sample_images(Path(tmp), size, 256)
        port = free_port()
        proc = start_server(model, port)
        try:
            lat, counts, seconds = asyncio.run(
                run_clients(
                    f"http://127.0.0.1:{port}/predict",
                    images,
                    args.clients,
                    args.requests,
                    args.max_seconds,
                )
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                err = "did not stop within 60 s"
        done = len(lat)
        service = done / seconds
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
        print(
            f"model {model.name} ({size}x{size}), {args.clients} clients, {done} answered of "
            f"{args.requests} requested in {seconds:.1f}s on {os.cpu_count()} cores"
        )
        print(f"  service throughput   {service:8.1f} req/s")
        print(f"  latency p50 / p99    {q[49] * 1000:8.1f} / {q[98] * 1000:.1f} ms")
        print("  responses            " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        clean = proc.returncode == 0 and "Stopped cleanly" in err
        print(f"  shutdown on SIGTERM  {'clean (exit 0)' if clean else 'NOT clean: ' + err[-500:]}")
        if not args.no_direct:
            direct = direct_rate(model, images, done, min(args.max_seconds, 120))
            print(
                f"  direct ONNX Runtime  {direct:8.1f} img/s (in-process, decode + 1 image per "
                "call)"
            )
            print(f"  service / direct     {service / direct:8.2f}x")
        if counts["5xx"] or counts["connection errors"] or not clean:
            sys.exit(1)


if __name__ == "__main__":
    main()
