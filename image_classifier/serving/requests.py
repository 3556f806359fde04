"""What a request to `serve` may carry and how it is read: the limits, the 4xx error, the body-size
guard, and the images of a multipart upload, a JSON body with base64 or a raw image body."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass


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


async def read_images(request, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) from a multipart form, a JSON body with base64, or a raw body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _form_images(request)
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


async def _form_images(request) -> list[tuple[str, bytes]]:
    """The file parts of a multipart body (already held whole by BodyLimit's cap), parsed by
    python-multipart straight from the bytes: Starlette's `request.form()` spools each part
    through a temporary file object, a twelfth of `serve`'s time under load (py-spy, CPU B,
    2026-12-02). Too many files are refused by /predict's own serve.max_images check."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(request.headers.get("content-type"))
    body = await request.body()
    parts: list[tuple[dict, list]] = []
    field: list[bytes] = []

    def header_value(data, start, end):
        headers = parts[-1][0]
        key = b"".join(field).lower()
        headers[key] = headers.get(key, b"") + data[start:end]

    callbacks = {
        "on_part_begin": lambda: parts.append(({}, [])),
        "on_header_field": lambda data, start, end: field.append(data[start:end]),
        "on_header_value": header_value,
        "on_header_end": field.clear,
        "on_part_data": lambda data, start, end: parts[-1][1].append(data[start:end]),
    }
    try:
        if not params.get(b"boundary"):
            raise ValueError("no boundary in its Content-Type")
        parser = MultipartParser(params[b"boundary"], callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart's MultipartParseError, a bad boundary
        raise RequestError(400, f"Malformed multipart body: {e}.") from None
    files = []
    for headers, chunks in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition"))
        if b"filename" in disposition:
            name = disposition[b"filename"].decode("utf-8", "replace")
            files.append((name or f"image[{len(files)}]", b"".join(chunks)))
    if not files:
        raise RequestError(
            400,
            "No file in the multipart form: attach an image, e.g. "
            "`curl -F file=@image.png http://HOST:PORT/predict`.",
        )
    return files
