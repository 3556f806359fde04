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

import base64
import binascii
import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from image_classifier.data.images import ImageError, ImageTooLarge, decode_bytes
from image_classifier.data.sources import sha256_file
from image_classifier.errors import UserError
from image_classifier.inference.rows import prediction_row

PAGE = Path(__file__).with_name("page.html")


@dataclass
class Limits:
    max_body_mb: float = 20.0
    max_images: int = 64
    max_pixels: int = 40_000_000
    threshold: float | None = None  # multi-label models: overrides the per-label thresholds


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, before the app parses them."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send, int(declared))
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                return await self._too_large(send, total)
            chunks.append(body)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send, size: int):
        payload = json.dumps(
            {
                "error": f"Request body of {size:,} bytes exceeds the limit of "
                f"{self.limit:,} bytes (serve.max_body_mb); send fewer or smaller images per "
                "request.",
                "status": 413,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _b64(text, name: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(400, f"{name}: expected a base64 string, got {type(text).__name__}.")
    if text.startswith("data:") and "," in text:  # a data URL from a browser
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{name}: malformed base64 ({e}).") from None


def _json_images(payload) -> list[tuple[str, bytes]]:
    """{"image": b64} or {"images": [b64 | {"name": .., "data": b64}, ...]}."""
    if not isinstance(payload, dict) or not ({"image", "images"} & payload.keys()):
        raise RequestError(
            400,
            'JSON body must be an object with "image" (one base64 string) or "images" (a list of '
            'base64 strings or {"name", "data"} objects).',
        )
    items = payload.get("images", [payload.get("image")])
    if not isinstance(items, list):
        raise RequestError(400, '"images" must be a list.')
    out = []
    for i, item in enumerate(items):
        name = f"image[{i}]"
        if isinstance(item, dict):
            name = str(item.get("name") or name)
            item = item.get("data")
        out.append((name, _b64(item, name)))
    return out


def served_name(meta, registry: dict | None) -> tuple[str, str]:
    """(name, version) of the served model: the registry's, or <data>-<model> and 1 for a file."""
    if registry:
        return registry["name"], str(registry["version"])
    return meta.name, "1"


INLINE_DECODE_BYTES = 16 * 1024  # about a 128x128 JPEG: under a millisecond to decode


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
            "source": {
                k: v for k, v in self.meta.extra.items() if k not in ("classes", "preprocessing")
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
    from fastapi.responses import HTMLResponse

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
        return rows[0] if len(rows) == 1 else rows

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


async def read_images(request, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) from a multipart form, a JSON body with base64, or a raw body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _form_images(request, limits)
    body = await request.body()
    if not body:
        raise RequestError(
            400,
            "Empty request body: send an image (multipart field `file`, "
            "JSON with base64 `image`, or the raw image bytes).",
        )
    if ctype == "application/json":
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"Malformed JSON body ({e}).") from None
        return _json_images(payload)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [("image", body)]
    raise RequestError(
        415,
        f"Unsupported Content-Type {ctype or '(none)'!r}: use multipart/form-data (field "
        '`file`), application/json ({"image": base64}) or image/* with the raw bytes.',
    )


async def _form_images(request, limits: Limits) -> list[tuple[str, bytes]]:
    try:
        form = await request.form(max_files=limits.max_images, max_fields=100)
    except Exception as e:  # starlette raises MultiPartException / HTTPException
        raise RequestError(400, f"Malformed multipart body: {getattr(e, 'detail', e)}.") from None
    files = [v for _, v in form.multi_items() if hasattr(v, "read") and hasattr(v, "filename")]
    if not files:
        raise RequestError(
            400,
            "No file in the multipart form: attach an image, e.g. "
            "`curl -F file=@image.png http://HOST:PORT/predict`.",
        )
    return [(f.filename or f"image[{i}]", await f.read()) for i, f in enumerate(files)]


def run_serve(cfg) -> dict:
    import uvicorn

    from image_classifier.inference.predictor import load_predictor, model_location

    s = cfg.serve
    model, registry = model_location(cfg, s.get("model"), "serve.model")
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
