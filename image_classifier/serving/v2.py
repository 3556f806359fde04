"""The Open Inference Protocol (KServe v2), beside the service's own routes: the protocol that
KServe, Triton, Seldon MLServer and BentoML clients speak, so `tritonclient`, gateways and load
testers work against `serve` unchanged.

Routes: `GET /v2` (server), `/v2/health/live`, `/v2/health/ready`,
`GET /v2/models/{name}[/versions/{v}]` (inputs, outputs, platform, versions), `.../ready`, and
`POST .../infer`. The infer route takes
one of two inputs:
- `images`: FP32, shape [N, C, H, W], the model's own input (pixels 0..255, the model's size and
  channels; mean/std are applied inside the model);
- `image_bytes`: BYTES, shape [N], encoded image files, decoded and preprocessed as `/predict` does.
It returns `probabilities` (FP32 [N, K]) and `classes` (BYTES [K]). JSON tensors and the binary
tensor data extension (`Inference-Header-Content-Length`, what tritonclient sends by default) are
both read and written. Errors are the protocol's `{"error": "..."}` body.
"""

import json
import struct

import numpy as np

IMAGES, IMAGE_BYTES = "images", "image_bytes"
PROBABILITIES, CLASSES = "probabilities", "classes"
HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
    "tensorrt": "tensorrt_plan",
}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def model_metadata(service, name: str, version: str) -> dict:
    pre = service.meta.preprocessing
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORMS.get(service.predictor.backend, service.predictor.backend),
        "inputs": [
            {"name": IMAGES, "datatype": "FP32", "shape": [-1, pre.channels, *pre.size]},
            {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(service.meta.classes)]},
            {"name": CLASSES, "datatype": "BYTES", "shape": [len(service.meta.classes)]},
        ],
    }


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, dict[str, bytes]]:
    """(the JSON request, each input's binary data by name) from a v2 infer body."""
    split = int(header_length) if header_length else len(body)
    if not 0 <= split <= len(body):
        raise ProtocolError(400, f"{HEADER_LENGTH}={header_length} is beyond the body's end.")
    try:
        request = json.loads(body[:split] or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"The request is not JSON: {e}.") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ProtocolError(400, 'The request needs "inputs": a list of tensors.')
    binary, offset = {}, split
    for t in request["inputs"]:
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            binary[t.get("name")] = body[offset : offset + int(size)]
            offset += int(size)
    if offset > len(body):
        raise ProtocolError(400, "The binary data is shorter than its binary_data_size says.")
    return request, binary


def input_tensor(request: dict, binary: dict[str, bytes], service) -> tuple[str, object]:
    """(input name, float32 images [N, C, H, W] or a list of encoded files)."""
    names = [t.get("name") for t in request["inputs"]]
    if len(names) != 1 or names[0] not in (IMAGES, IMAGE_BYTES):
        raise ProtocolError(
            400,
            f"Send exactly one input, {IMAGES!r} (FP32) or {IMAGE_BYTES!r} (BYTES); got {names}.",
        )
    t, name = request["inputs"][0], names[0]
    want = "FP32" if name == IMAGES else "BYTES"
    if t.get("datatype") != want:
        raise ProtocolError(400, f"Input {name!r} is {want}, not {t.get('datatype')!r}.")
    shape = [int(s) for s in t.get("shape") or []]
    if name == IMAGE_BYTES:
        files = _bytes_elements(binary[name]) if name in binary else _json_bytes(t.get("data"))
        if len(files) != int(np.prod(shape)):
            raise ProtocolError(400, f"{len(files)} elements for shape {shape}.")
        return name, files
    pre = service.meta.preprocessing
    expected = [pre.channels, *pre.size]
    if len(shape) != 4 or shape[1:] != expected:
        dims = ", ".join(map(str, expected))
        raise ProtocolError(
            400, f"Input {IMAGES!r} has shape {shape}; the model takes [N, {dims}]."
        )
    if name in binary:
        data = np.frombuffer(binary[name], dtype="<f4")
    else:
        data = np.asarray(t.get("data"), dtype=np.float32).ravel()
    if data.size != int(np.prod(shape)):
        raise ProtocolError(400, f"{data.size} values for shape {shape}.")
    return name, data.reshape(shape).astype(np.float32)


def _json_bytes(data) -> list[bytes]:
    if not isinstance(data, list):
        raise ProtocolError(400, 'A BYTES input needs "data": a list of strings.')
    return [d.encode("latin-1") if isinstance(d, str) else bytes(d) for d in data]


def _bytes_elements(raw: bytes) -> list[bytes]:
    """The binary form of a BYTES tensor: each element a 4-byte little-endian length, then it."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ProtocolError(400, "A BYTES element's length is cut off.")
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def response(request: dict, name: str, version: str, probs: np.ndarray, classes: list[str]):
    """(body, headers): JSON, with the binary extension for the outputs that asked for it."""
    asked = {o.get("name"): o for o in request.get("outputs") or []}
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
    names = b"".join(struct.pack("<I", len(c.encode())) + c.encode() for c in classes)
    tensors = {
        PROBABILITIES: ("FP32", list(probs.shape), probs.astype("<f4").tobytes(), probs),
        CLASSES: ("BYTES", [len(classes)], names, classes),
    }
    outputs, blobs = [], []
    for out_name in asked or tensors:
        if out_name not in tensors:
            raise ProtocolError(400, f"No output {out_name!r}; outputs: {', '.join(tensors)}.")
        datatype, shape, raw, value = tensors[out_name]
        entry = {"name": out_name, "datatype": datatype, "shape": shape}
        params = asked.get(out_name, {}).get("parameters") or {}
        if params.get("binary_data", default_binary):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = value.ravel().tolist() if datatype == "FP32" else list(value)
        outputs.append(entry)
    head = {"model_name": name, "model_version": version, "outputs": outputs}
    if "id" in request:
        head["id"] = request["id"]
    body = json.dumps(head).encode()
    headers = {"Content-Type": "application/json"}
    if blobs:
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(body))}
    return body + b"".join(blobs), headers


def add_routes(app, service) -> None:
    from fastapi.responses import JSONResponse

    name, version = service.name, service.version

    def check(model: str, model_version: str | None):
        if model != name:
            raise ProtocolError(404, f"No model {model!r} here; this server serves {name!r}.")
        if model_version not in (None, version):
            raise ProtocolError(404, f"Model {name!r} has version {version}, not {model_version}.")

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request, exc: ProtocolError):
        service.count_error(exc.status)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    _state_routes(app, service, check, name, version)
    _infer_route(app, service, check, name, version)


def _state_routes(app, service, check, name: str, version: str) -> None:
    @app.get("/v2")
    async def server():
        from image_classifier import __version__

        return {
            "name": "image_classifier",
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        }

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{model_version}")
    async def metadata(model: str, model_version: str | None = None):
        check(model, model_version)
        return model_metadata(service, name, version)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{model_version}/ready")
    async def model_ready(model: str, model_version: str | None = None):
        check(model, model_version)
        return {"name": name, "ready": True}


def _infer_route(app, service, check, name: str, version: str) -> None:

    from fastapi import Request
    from fastapi.responses import Response

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{model_version}/infer")
    async def infer(request: Request, model: str, model_version: str | None = None):
        body = await request.body()  # read first: a refused request's connection stays usable
        check(model, model_version)
        service.requests += 1
        parsed, binary = parse_request(body, request.headers.get(HEADER_LENGTH))
        kind, value = input_tensor(parsed, binary, service)
        if len(value) > service.limits.max_images:
            limit = service.limits.max_images
            raise ProtocolError(
                413, f"{len(value)} images; the limit is {limit} (serve.max_images)."
            )
        if kind == IMAGE_BYTES:
            value = await service.decode([(f"image_bytes[{i}]", b) for i, b in enumerate(value)])
        probs = await service.batcher.submit(value)
        content, headers = response(parsed, name, version, np.asarray(probs), service.meta.classes)
        return Response(content, headers=headers)
