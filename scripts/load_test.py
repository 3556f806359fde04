"""Load test, side by side in one run on one model file: in-process ONNX Runtime, `command=serve`
on `/predict`, the same service on its Open Inference Protocol route, and `serve.engine=triton`
(a real Triton server), each at 1, 16 and 64 concurrent clients. Loopback only.

    uv run python scripts/load_test.py                   # default model
    uv run python scripts/load_test.py --model resnet18  # resnet18 at 224 px (random weights)
    uv run python scripts/load_test.py --model cnn       # the default CNN, random weights
    uv run python scripts/load_test.py --model PATH.onnx --clients 16 64 --requests 3000
    uv run python scripts/load_test.py --targets predict v2   # leave Triton out
    uv run python scripts/load_test.py --serve serve.max_batch=64  # serve overrides, every target

For each target it starts the service itself on 127.0.0.1 (free ports), waits for
`/v2/models/NAME/ready` (both engines answer it), runs the clients (asyncio + aiohttp, or httpx
with `--client`; one keep-alive connection each, one encoded image per request: a multipart upload
on /predict, the protocol's binary tensor extension with a BYTES input on the v2 routes, built by
tritonclient), stops the service with SIGTERM and checks it exits cleanly. Bounded: each level
warms up on a quarter of --requests, then stops after --requests or --max-seconds. In process:
the same images through ONNX Runtime (decode + preprocess + one image per call, as one request
is). It prints throughput, p50/p99 latency and errors per target and level, and each service's
throughput over the in-process rate.

Images: Fashion-MNIST test images (data/, as PNG at their native 28x28), or for a 224-px model the
same images enlarged to 224x224 JPEGs, so decoding costs what it would for real photos.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import signal
import socket
import ssl
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


RANDOM_MODELS = {"resnet18": (224, 3), "cnn": (28, 1)}  # --model NAME: random weights, this size


def random_model(name: str, folder: Path) -> Path:
    from benchmark_infer import build  # beside this script: on sys.path as Python runs it

    from image_classifier.export.onnx import export_onnx

    out = folder / f"{name}.onnx"
    export_onnx(build(name, *RANDOM_MODELS[name]), folder / f"{name}.ckpt", out, 17)
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


def start_server(
    model: Path, engine: str, name: str, extra: list[str] = ()
) -> tuple[subprocess.Popen, int]:
    """The service for `engine` (fastapi | triton) on free ports, its model ready; (process,
    HTTP port)."""
    import httpx

    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [
        sys.executable,
        str(ROOT / "commands.py"),
        "command=serve",
        f"serve.engine={engine}",
        f"serve.model={model}",
        f"serve.port={port}",
        f"serve.grpc_port={grpc_port}",
        f"serve.metrics_port={metrics_port}",
        "serve.host=127.0.0.1",
        f"hydra.run.dir={tempfile.mkdtemp(prefix='serve-')}",
        "hydra.output_subdir=null",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the {engine} service exited: {proc.stderr.read()[-2000:]}")
        try:
            ready = f"http://127.0.0.1:{port}/v2/models/{name}/ready"
            if httpx.get(ready, timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"the {engine} service did not start within 180 s")


def v2_body(data: bytes, engine: str) -> tuple[bytes, dict]:
    """An Open Inference Protocol request with one encoded image as BYTES, in the binary tensor
    extension, as tritonclient builds it: [1] for our service, [1, 1] for Triton's model."""
    import tritonclient.http as http

    shape = [1, 1] if engine == "triton" else [1]
    x = http.InferInput("image_bytes", shape, "BYTES")
    x.set_data_from_numpy(np.array([data], dtype=object).reshape(shape))
    out = http.InferRequestedOutput("probabilities", binary_data=True)
    body, json_size = http.InferenceServerClient.generate_request_body([x], outputs=[out])
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def multipart_body(name: str, data: bytes) -> tuple[bytes, dict]:
    """One file field named "file", as a browser or `requests` sends it."""
    boundary = "load-test-boundary-7f3a"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def run_clients(
    target: dict, images: list[bytes], clients: int, requests: int, seconds: float, lib: str
):
    """(latencies, counts, wall seconds) of `clients` clients sending one image per request,
    each over its own keep-alive connection; the request bodies are built before the clock
    starts. `lib`: aiohttp (C-accelerated HTTP parsing) or httpx (pure Python)."""
    latencies: list[float] = []
    counts = {"2xx": 0, "4xx": 0, "5xx": 0, "connection errors": 0}
    issued = 0
    if target["v2"]:
        bodies = [v2_body(d, target["engine"]) for d in images]
    else:
        bodies = [multipart_body(f"{k}.img", d) for k, d in enumerate(images)]
    post, close, failure = await open_client(lib, clients)

    async def client(i):
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            k = issued
            issued += 1
            body, headers = bodies[k % len(bodies)]
            t0 = time.perf_counter()
            try:
                status = await post(i, target["url"], body, headers)
            except failure:
                counts["connection errors"] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            key = f"{status // 100}xx"
            counts[key] = counts.get(key, 0) + 1

    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        await close()
    return latencies, counts, time.perf_counter() - t0


async def open_client(lib: str, clients: int):
    """(post(client index, url, body, headers) -> status, async close(), the exception a failed
    connection raises), made before the clock starts."""
    if lib == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients),
            timeout=aiohttp.ClientTimeout(total=60),
        )

        async def post(i, url, body, headers):
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                return r.status

        return post, session.close, aiohttp.ClientError

    import httpx

    # One client and connection each (one shared pool queues at 64 clients: 138 req/s against
    # 381), and one TLS context between them: httpx builds a new one per client otherwise (25 ms
    # of CPU each, measured with py-spy), a quarter of the client's time at 64 clients.
    tls = ssl.create_default_context()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    conns = [httpx.AsyncClient(timeout=60, limits=limits, verify=tls) for _ in range(clients)]

    async def post(i, url, body, headers):
        return (await conns[i].post(url, content=body, headers=headers)).status_code

    async def close():
        await asyncio.gather(*(c.aclose() for c in conns))

    return post, close, httpx.HTTPError


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


TARGETS = {  # name: (engine, route)
    "predict": ("fastapi", "/predict"),
    "v2": ("fastapi", "/v2/models/{name}/infer"),
    "triton": ("triton", "/v2/models/{name}/infer"),
}


def stop(proc) -> bool:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        return False
    return proc.returncode == 0 and "Stopped cleanly" in err


def measure(model, name, images, args) -> tuple[list, bool]:
    """One row per (target, clients); False when anything failed."""
    rows, ok = [], True
    for target_name in args.targets:
        engine, route = TARGETS[target_name]
        proc, port = start_server(model, engine, name, args.serve)
        target = {
            "engine": engine,
            "v2": target_name != "predict",
            "url": f"http://127.0.0.1:{port}" + route.format(name=name),
        }
        try:
            for clients, lib in itertools.product(args.clients, args.client):
                # warm-up, a quarter of the requests: after 20, the first target measured was
                # still warming (resnet18 at 64 clients: 0.76-0.84x, p99 1.2-1.5 s; 0.99x after)
                warm = max(20, args.requests // 4)
                asyncio.run(run_clients(target, images, clients, warm, args.max_seconds, lib))
                lat, counts, seconds = asyncio.run(
                    run_clients(target, images, clients, args.requests, args.max_seconds, lib)
                )
                q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
                rows.append((target_name, lib, clients, len(lat) / seconds, q[49], q[98], counts))
                errors = counts["4xx"] + counts["5xx"] + counts["connection errors"]
                ok &= errors == 0
                print(
                    f"  {target_name:8s} {lib:7s} {clients:3d} clients: "
                    f"{len(lat) / seconds:8.1f} req/s, p50 {q[49] * 1000:7.1f} ms, "
                    f"p99 {q[98] * 1000:7.1f} ms, errors {errors}",
                    flush=True,
                )
        finally:
            clean = stop(proc)
        print(f"  {target_name}: shutdown on SIGTERM {'clean' if clean else 'NOT clean'}")
        ok &= clean
    return rows, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="default",
        help="default (the newest trained run's) | resnet18 | cnn (random weights) | PATH.onnx",
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument(
        "--client",
        nargs="+",
        choices=["aiohttp", "httpx"],
        default=["aiohttp"],
        help="the load generator's HTTP library (both: side by side)",
    )
    ap.add_argument("--requests", type=int, default=2000, help="per target and level")
    ap.add_argument("--max-seconds", type=float, default=60, help="per target and level")
    ap.add_argument(
        "--serve",
        nargs="*",
        default=[],
        help="serve overrides for every target (serve.max_batch=64)",
    )
    args = ap.parse_args()
    from image_classifier.inference.predictor import OnnxPredictor
    from image_classifier.lineage import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "default":
            model = default_model()
        elif args.model in RANDOM_MODELS:
            model = random_model(args.model, Path(tmp))
        else:
            model = Path(args.model)
        meta = OnnxPredictor(model, device="cpu").meta
        size = meta.preprocessing.size[0]
        images = sample_images(Path(tmp), size, 256)
        direct = direct_rate(model, images, args.requests, args.max_seconds)
        print(
            f"model {model.name} ({size}x{size}) on {os.cpu_count()} cores; in-process ONNX "
            f"Runtime {direct:.1f} img/s (decode + 1 image per call)",
            flush=True,
        )
        rows, ok = measure(model, meta.name, images, args)
    print("\n| target | client | clients | req/s | × in-process | p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for target, lib, clients, rate, p50, p99, counts in rows:
        errors = counts["4xx"] + counts["5xx"] + counts["connection errors"]
        print(
            f"| {target} | {lib} | {clients} | {rate:.1f} | {rate / direct:.2f} | "
            f"{p50 * 1000:.1f} | {p99 * 1000:.1f} | {errors} |"
        )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
