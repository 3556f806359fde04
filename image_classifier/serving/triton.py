"""`command=serve serve.engine=triton`: the model file hosted by a real Triton Inference Server,
through PyTriton (`nvidia-pytriton`, which ships the `tritonserver` binary and its Python backend).

One Triton model, named like the FastAPI service's (`<data>-<model>` for a file, the registry's
name for `models:/...`), speaks the Open Inference Protocol over HTTP (`serve.port`) and gRPC
(`serve.grpc_port`), with Triton's own Prometheus metrics on `serve.metrics_port`. Each request
carries one of two optional inputs: `images`, FP32 in the model's NCHW layout (pixels 0..255, the
same input as the ONNX graph), or `image_bytes`, BYTES of encoded image files, decoded here with
the model file's own preprocessing. Outputs: `probabilities` (FP32, one row per image, calibrated
as in every backend) and `predicted_class` (BYTES). Triton's dynamic batcher gathers requests
(`serve.max_batch` preferred, `serve.max_wait_ms` queue delay) and one predictor call (ONNX
Runtime on CPU or CUDA, `serve.device`) answers them all.

Triton's Python backend stub embeds the Python of this process. It needs a libpython of this exact
version that the dynamic loader finds (a `--enable-shared` build, or Debian's python3.11 with its
libpython3.11 package), and a numpy 1.x: the stub in nvidia-pytriton 0.7 is built against numpy 1
and sends empty tensors under numpy 2, which this project uses. So the stub gets a small side
environment of its own (numpy<2 and pyzmq, built once by uv under `paths.root/cache/`) and this
process keeps its numpy 2; the two exchange raw tensors over shared memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np

from image_classifier.errors import UserError
from image_classifier.serving.batcher import start_up_objects_frozen

ENGINES = ("fastapi", "triton")  # serve.engine
STUB_PACKAGES = ("numpy<2", "pyzmq")
log = logging.getLogger(__name__)


def libpython_dir() -> str | None:
    """The folder of the libpython the stub must load, when it is not the loader's default one:
    this interpreter's own shared library (a `--enable-shared` build), or None when the system's
    libpython of the same version serves (Debian's python3.11). UserError when neither exists."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with open("/proc/self/maps", encoding="utf-8") as f:
        mapped = {line.split()[-1] for line in f if f"libpython{version}" in line}
    if mapped:
        return str(pathlib.Path(sorted(mapped)[0]).parent)
    system = _system_libpython(version)
    if system == sys.version.split()[0]:
        return None
    found = f"the system's libpython{version} is {system}" if system else "none is installed"
    raise UserError(
        f"serve.engine=triton: Triton's Python backend needs a shared libpython{version} of this "
        f"Python's exact version ({sys.version.split()[0]}, {sys.executable}, built without "
        f"--enable-shared); {found}. Fix: make the environment from Debian's Python with its "
        f"library (`apt install python{version} libpython{version}`, then `uv venv --python "
        f"/usr/bin/python{version}` and `uv sync`), or from a Python built with --enable-shared; "
        "or serve with serve.engine=fastapi."
    )


def _system_libpython(version: str) -> str | None:
    """The version string of the libpython the dynamic loader finds by name, or None."""
    import ctypes

    try:
        lib = ctypes.CDLL(f"libpython{version}.so.1.0")
    except OSError:
        return None
    lib.Py_GetVersion.restype = ctypes.c_char_p
    return lib.Py_GetVersion().decode().split()[0]


def stub_environment(folder: pathlib.Path) -> pathlib.Path:
    """A virtual environment from this Python's base interpreter with STUB_PACKAGES, built once
    (into a temporary folder, renamed into place) with uv."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    folder = folder.resolve()
    env = folder / f"triton-stub-{version}"
    if (env / "ready").exists():
        return env
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        raise UserError(
            "serve.engine=triton builds a side environment for Triton's Python backend with uv, "
            "and no uv was found. Run through `uv run` (README's commands do) or put uv on PATH."
        )
    tmp = env.with_name(env.name + ".partial")
    folder.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    for cmd in (
        [uv, "venv", "--quiet", "--clear", "--no-config", "--python", base, str(tmp)],
        [uv, "pip", "install", "--quiet", "--no-config", "--python", str(tmp / "bin" / "python")]
        + list(STUB_PACKAGES),
    ):
        # --no-config and cwd: the project's own uv settings (its numpy>=2 override) stay out
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
        if done.returncode != 0:
            raise UserError(
                f"serve.engine=triton: could not build the Python backend's environment "
                f"({' '.join(cmd[1:3])}: {done.stderr.strip()[-300:]}). It needs "
                f"{', '.join(STUB_PACKAGES)} from the package index or uv's cache."
            )
    (tmp / "ready").write_text(" ".join(STUB_PACKAGES))
    shutil.rmtree(env, ignore_errors=True)
    tmp.rename(env)
    return env


def infer_function(predictor, max_pixels: int):
    """PyTriton's callable over a list of requests: every image of every request in one
    predictor call, the rows handed back request by request."""
    from image_classifier.data.images import ImageError, decode_bytes

    meta = predictor.meta
    classes = np.array([c.encode() for c in meta.classes], dtype=object)

    def images_of(request) -> np.ndarray:
        if "images" in request:
            return np.asarray(request["images"], dtype=np.float32)
        if "image_bytes" not in request:
            raise ValueError("each request needs the input `images` or `image_bytes`")
        out = []
        for k, data in enumerate(request["image_bytes"].reshape(-1)):
            try:
                image = decode_bytes(
                    bytes(data), meta.preprocessing, name=f"image_bytes[{k}]", max_pixels=max_pixels
                )
                out.append(image)
            except ImageError as e:
                raise ValueError(f"Cannot use {e}.") from None
        return np.stack(out).astype(np.float32)

    def infer(requests):
        batches = [images_of(r) for r in requests]
        probs = predictor.predict(np.concatenate(batches)).astype(np.float32)
        out, start = [], 0
        for b in batches:
            p = probs[start : start + len(b)]
            start += len(b)
            out.append({"probabilities": p, "predicted_class": classes[p.argmax(1)].reshape(-1, 1)})
        return out

    return infer


def self_check(predictor, name: str, s) -> None:
    """Before announcing the service: two images through the running server over HTTP must give
    the predictor's own probabilities (a stub that cannot pass tensors returns empty ones)."""
    import tritonclient.http as http

    pre = predictor.meta.preprocessing
    x = np.random.default_rng(0).integers(0, 256, (2, int(pre.channels), *pre.size))
    x = x.astype(np.float32)
    client = http.InferenceServerClient(f"{s.host}:{s.port}")
    try:
        request = http.InferInput("images", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        got = client.infer(name, [request]).as_numpy("probabilities")
    except Exception as e:
        raise UserError(_stub_failure(f"{type(e).__name__}: {str(e)[:200]}")) from None
    finally:
        client.close()
    if np.abs(got - predictor.predict(x)).max() > 1e-4:
        raise UserError(_stub_failure("its probabilities differ from the model's"))


def _stub_failure(what: str) -> str:
    return (
        f"serve.engine=triton: Triton's Python backend could not serve the model ({what}). Its "
        "stub embeds this Python's libpython and must import numpy<2: a Python whose own "
        f"installation carries numpy 2 ({sys.base_prefix}) or whose library is another build "
        "breaks it. Fix: make the environment from Debian's Python (`uv venv --python "
        "/usr/bin/python3.11`, then `uv sync`), as .ci/run does; or serve with "
        "serve.engine=fastapi."
    )


def run_triton(cfg, predictor, model, registry, name: str, version: str) -> dict:
    """Host the predictor in Triton until SIGINT or SIGTERM; exits cleanly, server stopped."""
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise UserError(
            "serve.engine=triton needs PyTriton (Linux x86-64): `uv sync --extra triton`, or the "
            "dev environment `uv sync`."
        ) from None
    s = cfg.serve
    logging.getLogger("pytriton").setLevel(logging.WARNING)  # its start-up notes; our line says it
    prepare_stub(pathlib.Path(cfg.paths.root) / "cache")
    config, log = triton_config(cfg, TritonConfig)
    got: dict = {}

    def on_signal(sig, _frame):  # SIGINT and SIGTERM both end serve() and stop the server
        got["signal"] = signal.Signals(sig).name
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    with contextlib.suppress(KeyboardInterrupt), Triton(config=config) as triton:
        shape = bind(triton, predictor, name, version, s)
        try:
            triton.run()
            self_check(predictor, name, s)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # the model did not load in Triton's Python backend
            why = f"{type(e).__name__}: {str(e)[:300]}" + (f" (Triton's log: {log})" if log else "")
            raise UserError(_stub_failure(why)) from None
        print(
            f"Serving {model} ({predictor.backend}, {len(predictor.meta.classes)} classes) in "
            f"Triton Inference Server as {name!r}: http://{s.host}:{s.port} and grpc "
            f"{s.host}:{s.grpc_port} (Open Inference Protocol: POST /v2/models/{name}/infer, "
            f"inputs `images` FP32 {list(shape)} or `image_bytes` BYTES), Triton's metrics on "
            f"http://{s.host}:{s.metrics_port}/metrics"
            + (f", its log in {log}" if log else "")
            + "; Ctrl+C stops",
            file=sys.stderr,
            flush=True,
        )
        with start_up_objects_frozen():  # the infer function runs in this process
            triton.serve()
    how = f" on {got['signal']}" if got else ""
    print(f"Stopped cleanly{how}: Triton server stopped.", file=sys.stderr, flush=True)
    return {"model": str(model), "engine": "triton", "name": name}


def triton_config(cfg, config_class) -> tuple:
    """(PyTriton's TritonConfig for serve.*, the file Triton logs to)."""
    from image_classifier.inference.predictor import has_nvidia_gpu

    s, log = cfg.serve, _log_file(cfg)
    config = config_class(
        http_address=str(s.host),
        http_port=int(s.port),
        grpc_address=str(s.host),
        grpc_port=int(s.grpc_port),
        metrics_port=int(s.metrics_port),
        allow_metrics=True,
        # GPU metrics start NVML, which prints "Error: Failed to initialize NVML" to the
        # console of a machine without an NVIDIA GPU
        allow_gpu_metrics=has_nvidia_gpu(),
        exit_on_error=True,
        # Triton's own log (its tables, CUDA notes on a machine without a GPU: about a hundred
        # lines before the first answer) in the run folder, not on the console
        log_file=log,
    )
    return config, log


def _log_file(cfg) -> pathlib.Path | None:
    """tritonserver.log in the command's run folder (None for a caller without one: the log
    stays on the console)."""
    out = cfg.paths.get("output_dir")
    return pathlib.Path(out) / "tritonserver.log" if out else None


def prepare_stub(cache: pathlib.Path) -> None:
    """Point PyTriton at the stub's side environment (numpy 1), and the loader at this
    interpreter's own libpython when it has one."""
    import pytriton.server.triton_server as triton_server

    libdir = libpython_dir()
    stub = stub_environment(cache)
    if libdir:  # the stub loads this interpreter's own libpython, not another build's
        os.environ["LD_LIBRARY_PATH"] = ":".join(
            p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p
        )
    # PyTriton 0.7 has no setting for it: the stub runs in the environment this returns
    triton_server.get_triton_python_backend_python_env = lambda: stub


def bind(triton, predictor, name: str, version: str, s) -> tuple:
    """The model in Triton: inputs `images` (NCHW FP32) or `image_bytes`, outputs
    `probabilities` and `predicted_class`, dynamic batching. Returns the image shape."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    pre = predictor.meta.preprocessing
    shape = (int(pre.channels), *(int(v) for v in pre.size))
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=int(float(s.max_wait_ms) * 1000),
        preferred_batch_size=[int(s.max_batch)],
    )
    triton.bind(
        model_name=name,
        model_version=int(version) if str(version).isdigit() else 1,
        infer_func=infer_function(predictor, int(s.max_pixels)),
        inputs=[
            Tensor(name="images", dtype=np.float32, shape=shape, optional=True),
            Tensor(name="image_bytes", dtype=np.bytes_, shape=(1,), optional=True),
        ],
        outputs=[
            Tensor(name="probabilities", dtype=np.float32, shape=(len(predictor.meta.classes),)),
            Tensor(name="predicted_class", dtype=np.bytes_, shape=(1,)),
        ],
        config=ModelConfig(max_batch_size=int(s.max_images), batcher=batcher),
        strict=True,
    )
    return shape
