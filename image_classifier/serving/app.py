"""`command=serve`: an HTTP prediction service (FastAPI on uvicorn) over an exported model.

  POST /predict   multipart upload(s), JSON with base64 image(s), or a raw image body
                  -> the infer JSON (docs/commands.md; one object for one image, a list for many)
  GET  /health    liveness and a few counters
  GET  /metadata  classes, preprocessing, model file hash and source
  GET  /          a page where a person drops an image and sees the top classes

Concurrency: handlers are async; uploads over 16 KB are decoded in the thread pool, smaller ones in
the event loop; inference runs in batches (image_classifier/serving/batcher.py). Every bad request
is answered with a 4xx and a JSON `{"error": ..., "status": ...}`; nothing a client sends can stop
the service.
"""

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from image_classifier.data.images import ImageError, ImageTooLarge, decode_bytes
from image_classifier.data.sources import sha256_file
from image_classifier.errors import UserError
from image_classifier.inference.rows import prediction_row
from image_classifier.serving.batcher import start_up_objects_frozen
from image_classifier.serving.requests import BodyLimit, Limits, RequestError, read_images

PAGE = Path(__file__).with_name("page.html")


def served_name(meta, registry: dict | None) -> tuple[str, str]:
    """(name, version) of the served model: the registry's, or <data>-<model> and 1 for a file."""
    if registry:
        return registry["name"], str(registry["version"])
    return meta.name, "1"


INLINE_DECODE_BYTES = 16 * 1024  # a noisy 160x160 JPEG: decoded in 0.6 ms on CPU C (2026-12-02)


HIDDEN_FROM_CLIENTS = ("classes", "preprocessing", "data_config")  # /metadata "source"


class Service:
    """What the routes share: the predictor, its micro-batcher, the limits and the counters."""

    def __init__(
        self, predictor, limits: Limits, max_batch: int, max_wait_ms: float, model_path, registry
    ):
        from image_classifier.serving.batcher import MicroBatcher
        from image_classifier.serving.metrics import Metrics

        self.predictor, self.limits = predictor, limits
        self.meta = predictor.meta
        # what the Open Inference Protocol and the metrics call the model
        self.name, self.version = served_name(self.meta, registry)
        self.metrics = Metrics(self.name, self.version, lambda: self.batcher.pending())

        def predict(batch):
            self.metrics.observe_batch(len(batch))
            return predictor.predict(batch)

        self.batcher = MicroBatcher(predict, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.model_info = {
            "path": str(model_path) if model_path else None,
            "sha256": sha256_file(model_path) if model_path else None,
            "backend": predictor.backend,
            "providers": getattr(predictor, "providers", None),
            "registry": registry,  # name, version, aliases when loaded from models:/...
            "source": {  # not data_config: where the training images lie is not the clients'
                k: v for k, v in self.meta.extra.items() if k not in HIDDEN_FROM_CLIENTS
            },
        }
        self.started, self.requests, self.errors_4xx = time.time(), 0, 0

    def count_error(self, status: int) -> None:
        if 400 <= status < 500:
            self.errors_4xx += 1

    def error(self, status: int, message: str):
        from fastapi.responses import JSONResponse

        self.count_error(status)
        return JSONResponse({"error": message, "status": status}, status_code=status)

    async def decode(self, items: list[tuple[str, bytes]]) -> np.ndarray:
        """decode_all in the event loop for small files (a thread hand-off costs more than
        decoding a few KB), in the thread pool for bigger ones, which would hold the loop up."""
        if sum(len(data) for _, data in items) <= INLINE_DECODE_BYTES:
            return self.decode_all(items)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self.decode_all, items)

    def decode_all(self, items: list[tuple[str, bytes]]) -> np.ndarray:
        arrays = []
        for name, data in items:
            try:
                arrays.append(
                    decode_bytes(
                        data, self.meta.preprocessing, name=name, max_pixels=self.limits.max_pixels
                    )
                )
            except ImageError as e:
                status = 413 if isinstance(e, ImageTooLarge) else 422
                raise RequestError(status, f"Cannot use {e}.") from None
        return np.stack(arrays)

    def health(self) -> dict:
        return {
            "status": "ok",
            "backend": self.predictor.backend,
            "model": self.model_info["path"],
            "uptime_s": round(time.time() - self.started, 1),
            "queued": self.batcher.pending(),
            "requests": self.requests,
            "images": self.batcher.images,
            "batches": self.batcher.batches,
            "errors_4xx": self.errors_4xx,
        }

    def metadata(self) -> dict:
        limits = self.limits
        return {
            "classes": self.meta.classes,
            "multi_label": self.meta.multi_label,
            "thresholds": self.meta.thresholds(limits.threshold),
            "preprocessing": self.meta.preprocessing.to_dict(),
            "model": self.model_info,
            "limits": {
                "max_body_mb": limits.max_body_mb,
                "max_images": limits.max_images,
                "max_pixels": limits.max_pixels,
            },
        }


def create_app(
    predictor,
    limits: Limits | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
    model_path: Path | None = None,
    registry: dict | None = None,
):
    from fastapi import FastAPI

    limits = limits or Limits()
    service = Service(predictor, limits, max_batch, max_wait_ms, model_path, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        with start_up_objects_frozen():
            yield
            await service.batcher.close()

    from image_classifier.serving import v2
    from image_classifier.serving.metrics import MetricsMiddleware

    app = FastAPI(title="image_classifier", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    _add_error_handlers(app, service)
    _add_routes(app, service)
    v2.add_routes(app, service)
    limited = BodyLimit(app, int(limits.max_body_mb * 1024 * 1024))
    return MetricsMiddleware(limited, service.metrics, lambda: app.routes)  # 413s counted too


def _add_error_handlers(app, service: Service) -> None:
    """Every failure is a JSON {"error", "status"}; nothing a client sends stops the service."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return service.error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return service.error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return service.error(
            422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        )

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # logged, answered, and the service goes on
        print(f"serve: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return service.error(
            500, f"internal error ({type(exc).__name__}); the service is still up."
        )


def _add_routes(app, service: Service) -> None:

    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse

    limits, classes = service.limits, service.meta.classes

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None, threshold: float | None = None):
        service.requests += 1
        items = await read_images(request, limits)
        if len(items) > limits.max_images:
            raise RequestError(
                413,
                f"{len(items)} images in one request; the limit is "
                f"{limits.max_images} (serve.max_images).",
            )
        if top_k is not None and top_k < 1:
            raise RequestError(422, f"top_k={top_k} must be at least 1.")
        if threshold is not None and not 0 < threshold < 1:
            raise RequestError(422, f"threshold={threshold} must be between 0 and 1 (exclusive).")
        thresholds = service.meta.thresholds(
            threshold if threshold is not None else limits.threshold
        )
        batch = await service.decode(items)
        probs = await service.batcher.submit(batch)
        rows = [
            prediction_row(name, p, classes, top_k, thresholds)
            for (name, _), p in zip(items, probs, strict=True)
        ]
        # a Response as it is: FastAPI's jsonable_encoder would walk the plain rows again
        return JSONResponse(rows[0] if len(rows) == 1 else rows)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metadata")
    async def metadata():
        return service.metadata()

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import Response

        body, content_type = service.metrics.text()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")


def run_serve(cfg, model: Path | None = None, registry: dict | None = None) -> dict:
    """`model`, `registry`: as commands.py resolves serve.model (see `run_infer`)."""
    import uvicorn

    from image_classifier.inference.predictor import given_model, load_predictor

    s = cfg.serve
    model = given_model(model, s.get("model"), "serve.model")
    if not 0 <= int(s.port) <= 65535:
        raise UserError(f"serve.port={s.port} is not a TCP port (0..65535).")
    predictor = load_predictor(model, device=s.device)
    if s.engine == "triton":
        from image_classifier.serving.triton import run_triton

        for key in ("port", "grpc_port", "metrics_port"):
            _check_port(str(s.host), int(s[key]), key)
        return run_triton(cfg, predictor, model, registry, *served_name(predictor.meta, registry))
    threshold = None if s.get("threshold") is None else float(s.threshold)
    limits = Limits(float(s.max_body_mb), int(s.max_images), int(s.max_pixels), threshold)
    app = create_app(
        predictor, limits, int(s.max_batch), float(s.max_wait_ms), model, registry=registry
    )
    config = uvicorn.Config(
        app,
        host=str(s.host),
        port=int(s.port),
        log_level=str(s.log_level),
        timeout_graceful_shutdown=float(s.shutdown_timeout_s),
    )
    _check_port(str(s.host), int(s.port), "port")
    server = _server_class()(config)
    shown = f"{s.model} (version {registry['version']})" if registry else model
    name = served_name(predictor.meta, registry)[0]
    print(
        f"Serving {shown} ({predictor.backend}, {len(predictor.meta.classes)} classes) on "
        f"http://{s.host}:{s.port}  (page: /, API: POST /predict, GET /health, GET /metadata, "
        f"GET /metrics; Open Inference Protocol: POST /v2/models/{name}/infer; Ctrl+C stops)",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    how = f"on {signal.Signals(server.stop_signal).name}" if server.stop_signal else ""
    print(
        f"Stopped cleanly {how}: in-flight requests finished.".replace("  ", " "),
        file=sys.stderr,
        flush=True,
    )
    return {"model": str(model), "stop_signal": server.stop_signal}


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's Server, but SIGINT/SIGTERM end with a clean exit 0 instead of re-raising."""

        stop_signal: int | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self._on_signal) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def _on_signal(self, sig, frame):
            self.stop_signal = self.stop_signal or sig
            self.handle_exit(sig, frame)

    return Server


def _check_port(host: str, port: int, key: str) -> None:
    """A port in use or a host that is not ours: one clear message before anything starts."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as e:
        raise UserError(
            f"Cannot listen on serve.host={host} serve.{key}={port} ({e.strerror or e}). "
            f"Pick a free port (serve.{key}={port + 10}) or stop the process that holds it."
        ) from None
