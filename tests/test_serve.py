"""command=serve over real HTTP on 127.0.0.1, the page in headless Chromium, the MLflow model,
and the Triton repository; every bad request gets a 4xx JSON and the next good one still works."""

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, compose_cfg, run_cli
from PIL import Image

from image_classifier.inference.predictor import load_predictor
from image_classifier.inference.rows import predict_paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def busy_port():
    """A port on 127.0.0.1 that something listens on while the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def start_server(model: Path, *overrides: str, port: int | None = None):
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "commands.py"),
            "command=serve",
            f"serve.model={model}",
            f"serve.port={port}",
            f"hydra.run.dir={tempfile.mkdtemp(prefix='serve-')}",
            "hydra.output_subdir=null",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.communicate()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("serve did not answer /health within 90 s")


def stop(proc, sig=signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


@pytest.fixture(scope="module")
def server(exported):
    model, _ = exported
    proc, url = start_server(model, "serve.max_body_mb=1", "serve.max_images=8")
    yield url, model
    if proc.poll() is None:
        stop(proc)


def bomb_png(width=30000, height=30000) -> bytes:
    """A valid PNG header claiming 900 megapixels, with a tiny body: refused before decoding."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )


def expected_rows(model: Path, paths: list[Path]) -> list[dict]:
    return predict_paths(load_predictor(model), paths)


@pytest.mark.slow
def test_predict_multipart_json_and_raw_match_infer(server, trained):
    url, model = server
    images = sorted((trained[2] / "fox").glob("*.png"))[:3]
    want = expected_rows(model, images)

    r = httpx.post(
        f"{url}/predict", files={"file": (images[0].name, images[0].read_bytes(), "image/png")}
    )
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == {"path", "predicted_class", "confidence", "all_predictions"}
    assert got["path"] == images[0].name
    assert got["predicted_class"] == want[0]["predicted_class"]
    assert got["all_predictions"] == pytest.approx(want[0]["all_predictions"], abs=1e-5)

    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images]
    r = httpx.post(f"{url}/predict", files=files, params={"top_k": 2})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 3
    for g, w in zip(r.json(), want, strict=True):
        assert g["predicted_class"] == w["predicted_class"] and len(g["all_predictions"]) == 2

    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
    r = httpx.post(
        f"{url}/predict",
        json={
            "images": [b64[0], {"name": "x.png", "data": b64[1]}, "data:image/png;base64," + b64[2]]
        },
    )
    assert r.status_code == 200, r.text
    assert [g["path"] for g in r.json()] == ["image[0]", "x.png", "image[2]"]
    assert [g["predicted_class"] for g in r.json()] == [w["predicted_class"] for w in want]

    r = httpx.post(
        f"{url}/predict", content=images[1].read_bytes(), headers={"content-type": "image/png"}
    )
    assert r.status_code == 200 and r.json()["confidence"] == pytest.approx(
        want[1]["confidence"], abs=1e-5
    )


@pytest.mark.slow
def test_health_and_metadata_describe_the_model(server):
    import hashlib

    url, model = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["classes"] == ["cat", "dog", "fox"]
    assert meta["preprocessing"]["size"] == [16, 16] and meta["preprocessing"]["channels"] == 1
    assert meta["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert meta["model"]["source"]["source_checkpoint"].endswith("best.ckpt")
    assert "data_config" not in meta["model"]["source"]  # where the training images lie
    assert meta["limits"]["max_images"] == 8


def _bad_requests(good: bytes):
    truncated = good[: len(good) // 2]
    big = np.random.default_rng(0).integers(0, 255, 1_200_000, dtype=np.uint8).tobytes()
    return {
        "empty file": dict(files={"file": ("empty.png", b"", "image/png")}),
        "multipart without files": dict(files={"note": (None, "hello")}),
        "empty body": dict(content=b"", headers={"content-type": "image/png"}),
        "non-image": dict(files={"file": ("notes.txt", b"just some text", "text/plain")}),
        "truncated image": dict(files={"file": ("half.png", truncated, "image/png")}),
        "decompression bomb": dict(files={"file": ("bomb.png", bomb_png(), "image/png")}),
        "wrong content type": dict(content=b"hello", headers={"content-type": "text/plain"}),
        "no content type": dict(content=b"hello"),
        "oversize body": dict(files={"file": ("big.png", big, "image/png")}),
        "malformed base64": dict(json={"image": "not*base64!"}),
        "base64 of junk": dict(json={"image": base64.b64encode(b"junk").decode()}),
        "malformed json": dict(content=b'{"image": ', headers={"content-type": "application/json"}),
        "json without image": dict(json={"picture": "x"}),
        "too many images": dict(json={"images": [base64.b64encode(good).decode()] * 9}),
        "too many files": dict(files=[("file", (f"{i}.png", good, "image/png")) for i in range(9)]),
        "multipart without boundary": dict(
            content=b"--x\r\n", headers={"content-type": "multipart/form-data"}
        ),
        "malformed multipart": dict(
            content=b"not a multipart body",
            headers={"content-type": "multipart/form-data; boundary=abc"},
        ),
        "unterminated multipart": dict(
            content=b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.png"'
            b"\r\n\r\n" + good,
            headers={"content-type": "multipart/form-data; boundary=abc"},
        ),
        "bad top_k": dict(files={"file": ("a.png", good, "image/png")}, params={"top_k": 0}),
        "non-numeric top_k": dict(
            files={"file": ("a.png", good, "image/png")}, params={"top_k": "x"}
        ),
    }


def test_multipart_parts_are_cut_exactly_at_their_delimiters():
    """/predict's own multipart split (serving/requests.py): a preamble, a text field, transport
    padding after a delimiter, a file whose bytes hold a blank line, `--abc` (not after a CRLF,
    which RFC 2046 reserves for the delimiter) and `CRLF--ab`, and an epilogue; only the files
    come back, byte for byte, named as sent."""
    import asyncio

    from image_classifier.serving.requests import _form_images

    one, two = b"\x89PNG\r\n\r\nx--abc\r\n--ab\r\n", b"\xff\xd8second"
    body = (
        b"preamble\r\n--abc\r\n"
        b'Content-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b'--abc  \r\ncontent-disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + one + b"\r\n--abc\r\n"
        b'Content-Disposition: form-data; name="file"; filename=""\r\n\r\n' + two + b"\r\n"
        b"--abc--\r\nepilogue"
    )

    class Request:
        headers = {"content-type": 'multipart/form-data; boundary="abc"'}

        async def body(self):
            return body

    assert asyncio.run(_form_images(Request())) == [("a.png", one), ("image[1]", two)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_bad_requests(b"x" * 100)))
def test_bad_request_gets_4xx_json_and_service_survives(server, trained, case):
    url, _ = server
    good_path = sorted((trained[2] / "cat").glob("*.png"))[0]
    good = good_path.read_bytes()
    kwargs = _bad_requests(good)[case]
    r = httpx.post(f"{url}/predict", timeout=30, **kwargs)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    body = r.json()
    assert body["status"] == r.status_code and len(body["error"]) > 10, body
    expected_status = {
        "oversize body": 413,
        "decompression bomb": 413,
        "too many images": 413,
        "too many files": 413,
        "multipart without boundary": 400,
        "malformed multipart": 400,
        "unterminated multipart": 400,
        "wrong content type": 415,
        "no content type": 415,
    }
    if case in expected_status:
        assert r.status_code == expected_status[case], body
    ok = httpx.post(f"{url}/predict", files={"file": ("a.png", good, "image/png")})
    assert ok.status_code == 200 and ok.json()["predicted_class"] in ("cat", "dog", "fox")


@pytest.mark.slow
def test_error_messages_name_the_problem(server, trained):
    url, _ = server
    good = sorted((trained[2] / "cat").glob("*.png"))[0].read_bytes()
    cases = _bad_requests(good)
    checks = {
        "multipart without files": "No file",
        "empty file": "empty.png: empty",
        "non-image": "notes.txt: not an image",
        "truncated image": "truncated",
        "decompression bomb": "decompression bomb",
        "oversize body": "serve.max_body_mb",
        "malformed base64": "malformed base64",
        "wrong content type": "Unsupported Content-Type 'text/plain'",
        "too many images": "serve.max_images",
        "too many files": "serve.max_images",
        "multipart without boundary": "Malformed multipart body: no boundary",
        "malformed multipart": "Malformed multipart body: no part opens with --abc",
        "unterminated multipart": "Malformed multipart body: it does not end with --abc--",
    }
    for case, phrase in checks.items():
        r = httpx.post(f"{url}/predict", timeout=30, **cases[case])
        assert phrase in r.json()["error"], (case, r.json())


@pytest.mark.slow
def test_concurrent_clients_all_succeed(server, trained):
    url, _ = server
    images = sorted(trained[2].rglob("*.png"))
    payloads = [p.read_bytes() for p in images]

    def client(i):
        with httpx.Client(timeout=60) as c:
            return [
                c.post(
                    f"{url}/predict",
                    files={"file": ("a.png", payloads[(i + j) % len(payloads)], "image/png")},
                ).status_code
                for j in range(6)
            ]

    with ThreadPoolExecutor(16) as pool:
        codes = [c for cs in pool.map(client, range(16)) for c in cs]
    assert codes == [200] * 96
    health = httpx.get(f"{url}/health").json()
    assert health["batches"] <= health["images"]


@pytest.mark.slow
def test_page_in_headless_chromium(server, trained, tmp_path):
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model = server
    image = sorted((trained[2] / "dog").glob("*.png"))[0]
    want = expected_rows(model, [image])[0]
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(
            lambda b: "3 classes" in b.find_element(By.ID, "classes").text
        )
        browser.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(browser, 30).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, "li.prediction")
        )
        items = browser.find_elements(By.CSS_SELECTOR, "li.prediction")
        assert len(items) == 3
        first = items[0].find_element(By.CLASS_NAME, "name").text
        assert first == want["predicted_class"]
        shown = float(items[0].find_element(By.CLASS_NAME, "p").text.rstrip(" %"))
        assert shown == pytest.approx(want["confidence"] * 100, abs=0.06)

        junk = tmp_path / f"{image.name}.txt"  # not in the session's shared image folder
        junk.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(junk))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
        assert "not an image" in browser.find_element(By.ID, "error").text
    finally:
        browser.quit()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_clean_shutdown_on_signal(exported, trained, sig):
    model, _ = exported
    proc, url = start_server(model)
    image = sorted((trained[2] / "cat").glob("*.png"))[0]
    assert (
        httpx.post(f"{url}/predict", files={"file": ("a.png", image.read_bytes())}).status_code
        == 200
    )
    code, err = stop(proc, sig)
    assert code == 0, err
    assert f"Stopped cleanly on {sig.name}" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_port_in_use_and_missing_model_exit_2(exported, tmp_path):
    model, _ = exported
    with busy_port() as port:
        r = run_cli(
            "command=serve",
            f"serve.model={model}",
            f"serve.port={port}",
            "hydra.run.dir=" + str(tmp_path),
            timeout=120,
        )
    assert r.returncode == 2 and f"serve.port={port}" in r.stderr and "free port" in r.stderr
    r = run_cli(
        "command=serve", f"serve.model={tmp_path}/none.onnx", "hydra.run.dir=" + str(tmp_path)
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    # no serve.model and nothing exported in this project: the message names serve's own option
    r = run_cli("command=serve", f"paths.root={tmp_path}", "hydra.run.dir=" + str(tmp_path))
    assert r.returncode == 2 and "name one with serve.model=PATH" in r.stderr, r.stderr


@pytest.mark.slow
def test_mlflow_model_takes_image_bytes_and_serves_with_curl(trained, exported, tmp_path):
    """export-onnx logged a pyfunc model into the training run; `mlflow models serve` serves it."""
    import mlflow
    import pandas as pd

    root, _, images = trained
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    run_id = exported[1]["mlflow_run_id"]
    logged = mlflow.search_logged_models(
        experiment_ids=[mlflow.get_run(run_id).info.experiment_id], output_format="list"
    )
    # this export's own model: other tests export the same checkpoint again (TTA graphs), and
    # which of the run's logged models came first is not this test's to assume
    model_uri = exported[1]["mlflow_model"]
    assert model_uri in [m.model_uri for m in logged if m.source_run_id == run_id]
    model = mlflow.pyfunc.load_model(model_uri)
    paths = sorted((images / "fox").glob("*.png"))[:2]
    want = expected_rows(exported[0], paths)
    rows = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths] + [b"junk"]}))
    assert [r["predicted_class"] for r in rows[:2]] == [w["predicted_class"] for w in want]
    assert rows[0]["all_predictions"] == pytest.approx(want[0]["all_predictions"], abs=1e-5)
    assert rows[2]["predicted_class"] is None and "not an image" in rows[2]["error"]
    assert model.predict(pd.DataFrame({"image": [str(paths[0])]}))[0]["path"] == str(paths[0])

    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow_cli),
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        # exactly what README's curl sends
        b64 = base64.b64encode(paths[0].read_bytes()).decode()
        curl = shutil.which("curl")
        body = json.dumps({"inputs": {"image": [b64]}})
        if curl:
            out = subprocess.run(
                [
                    curl,
                    "-s",
                    f"http://127.0.0.1:{port}/invocations",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    body,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        else:
            out = httpx.post(
                f"http://127.0.0.1:{port}/invocations",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=60,
            ).text
        got = json.loads(out)["predictions"][0]
        assert got["predicted_class"] == want[0]["predicted_class"]
        assert got["confidence"] == pytest.approx(want[0]["confidence"], abs=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_triton_repository_matches_the_onnx_model(exported, tmp_path):
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from image_classifier.export.triton import run_export_triton

    model, _ = exported
    out = tmp_path / "repo"
    r = run_export_triton(
        compose_cfg(
            tmp_path,
            f"export.triton.onnx={model}",
            f"export.triton.output={out}",
            "export.triton.max_batch_size=16",
        )
    )
    folder = Path(r["model"])
    assert folder == out / "image_classifier"
    config = text_format.Parse(
        (folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    onnx_type = {1: model_config_pb2.TYPE_FP32}
    for spec, tensors in ((config.input, graph.input), (config.output, graph.output)):
        assert [s.name for s in spec] == [t.name for t in tensors]
        for s, t in zip(spec, tensors, strict=True):
            dims = [
                d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim
            ]
            assert dims[0] == -1 and list(s.dims) == dims[1:]
            assert s.data_type == onnx_type[t.type.tensor_type.elem_type]
    labels = (folder / config.output[0].label_filename).read_text().split()
    assert labels == ["cat", "dog", "fox"]
    assert json.loads((folder / "preprocessing.json").read_text())["preprocessing"]["size"] == [
        16,
        16,
    ]
    # re-export replaces the model atomically and leaves no staging folders
    run_export_triton(
        compose_cfg(tmp_path, f"export.triton.onnx={model}", f"export.triton.output={out}")
    )
    assert sorted(p.name for p in out.iterdir()) == ["image_classifier"]


def test_triton_bad_settings(exported, tmp_path):
    from image_classifier.errors import UserError
    from image_classifier.export.triton import run_export_triton

    model, _ = exported
    with pytest.raises(UserError, match="KIND_CPU"):
        run_export_triton(
            compose_cfg(tmp_path, f"export.triton.onnx={model}", "export.triton.kind=CPU")
        )
    with pytest.raises(UserError, match="not an .onnx file"):
        run_export_triton(compose_cfg(tmp_path, f"export.triton.onnx={tmp_path}/x.onnx"))
    assert not (tmp_path / "triton_models" / "image_classifier").exists()


def test_decode_bytes_matches_file_decoding(trained):
    from image_classifier.data.images import Preprocessing, decode_bytes, load_array

    pre = Preprocessing(size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    p = sorted((trained[2] / "cat").glob("*.png"))[0]
    rgb = io.BytesIO()
    Image.open(p).convert("RGB").save(rgb, format="JPEG", quality=95)
    assert np.array_equal(decode_bytes(p.read_bytes(), pre), load_array(p, pre))
    assert decode_bytes(rgb.getvalue(), pre).shape == (1, 16, 16)


@pytest.mark.slow
def test_open_inference_protocol_with_the_official_client(server, trained):
    """tritonclient's HTTP client as a user calls it: binary tensors by default, JSON on request;
    the probabilities match in-process ONNX Runtime on the same pixels."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    from image_classifier.data.images import load_array

    url, model = server
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    predictor = load_predictor(model)
    name = predictor.meta.name
    assert name == "images-cnn"
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {
        "images": [-1, 1, 16, 16],
        "image_bytes": [-1],
    }

    paths = sorted(trained[2].rglob("*.png"))[:5]
    x = np.stack([load_array(p, predictor.meta.preprocessing) for p in paths]).astype(np.float32)
    want = predictor.predict(x)

    images = triton.InferInput("images", list(x.shape), "FP32")
    images.set_data_from_numpy(x)  # the binary tensor extension, tritonclient's default
    outputs = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("classes")]
    result = client.infer(name, [images], outputs=outputs, request_id="r1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)
    assert [c.decode() for c in result.as_numpy("classes")] == predictor.meta.classes
    assert result.get_response()["id"] == "r1"

    files = triton.InferInput("image_bytes", [len(paths)], "BYTES")
    files.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=np.object_))
    result = client.infer(name, [files], model_version="1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)

    as_json = triton.InferInput("images", list(x.shape), "FP32")
    as_json.set_data_from_numpy(x, binary_data=False)
    out = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer(name, [as_json], outputs=out)
    assert "data" in result.get_response()["outputs"][0]
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)

    with pytest.raises(InferenceServerException, match="No model 'nope' here; this server serves"):
        client.infer("nope", [images])
    wrong = triton.InferInput("images", [1, 3, 16, 16], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InferenceServerException, match=r"the model takes \[N, 1, 16, 16\]"):
        client.infer(name, [wrong])
    broken = triton.InferInput("image_bytes", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="Cannot use image_bytes\\[0\\]"):
        client.infer(name, [broken])
    # the protocol's error body, and the service is still up
    r = httpx.post(f"{url}/v2/models/{name}/infer", content=b"{not json")
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert client.infer(name, [images]).as_numpy("probabilities").shape == (5, 3)


@pytest.mark.slow
def test_metrics_are_scraped_after_traffic(server, trained):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server
    image = sorted((trained[2] / "cat").glob("*.png"))[0].read_bytes()
    png = {"content-type": "image/png"}
    for _ in range(3):
        assert httpx.post(f"{url}/predict", content=image, headers=png).status_code == 200
    assert httpx.post(f"{url}/predict", content=b"junk", headers=png).status_code == 422
    assert httpx.get(f"{url}/v2/models/nope").status_code == 404
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = [s for f in text_string_to_metric_families(r.text) for s in f.samples]

    def value(name: str, **labels) -> float:
        found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
        assert found, (name, labels)
        return sum(found)

    model = {"model": "images-cnn", "version": "1"}
    assert value("image_classifier_requests_total", route="/predict", status="200", **model) >= 3
    assert value("image_classifier_requests_total", route="/predict", status="422") >= 1
    assert value("image_classifier_requests_total", route="/v2/models/{model}", status="404") >= 1
    assert value("image_classifier_request_seconds_count", route="/predict", **model) >= 4
    assert value("image_classifier_batch_size_count", **model) >= 3
    assert value("image_classifier_batch_size_sum", **model) >= 3
    assert value("image_classifier_queue_depth", **model) == 0
    assert value("image_classifier_model_info", **model) == 1


def test_open_inference_protocol_refuses_each_bad_request_with_its_reason(exported):
    """In process (the same app `serve` runs): each malformed v2 request gets the protocol's
    error body naming what is wrong, and the next good request still works."""
    from fastapi.testclient import TestClient

    from image_classifier.serving.app import create_app
    from image_classifier.serving.requests import Limits

    model, _ = exported
    client = TestClient(create_app(load_predictor(model), Limits(max_images=2)))
    url = "/v2/models/images-cnn/infer"
    image = {"name": "images", "datatype": "FP32", "shape": [1, 1, 16, 16], "data": [0.0] * 256}
    cases = [
        ({"outputs": []}, 400, 'needs "inputs"'),
        ({"inputs": [{**image, "name": "pixels"}]}, 400, "Send exactly one input, 'images'"),
        ({"inputs": [{**image, "datatype": "INT8"}]}, 400, "Input 'images' is FP32, not 'INT8'"),
        ({"inputs": [{**image, "data": [0.0] * 10}]}, 400, "10 values for shape [1, 1, 16, 16]"),
        ({"inputs": [{**image, "shape": [3, 1, 16, 16], "data": [0.0] * 768}]}, 413, "limit is 2"),
        ({"inputs": [image], "outputs": [{"name": "logits"}]}, 400, "No output 'logits'"),
        (
            {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": 5}]},
            400,
            'A BYTES input needs "data": a list of strings',
        ),
    ]
    for body, status, message in cases:
        r = client.post(url, json=body)
        assert (r.status_code, set(r.json())) == (status, {"error"}), body
        assert message in r.json()["error"]
    r = client.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 400 and "beyond the body's end" in r.json()["error"]
    r = client.get("/v2/models/images-cnn/versions/7")
    assert r.status_code == 404 and "has version 1, not 7" in r.json()["error"]
    good = client.post(url, json={"inputs": [image]})
    assert good.status_code == 200 and good.json()["outputs"][0]["shape"] == [1, 3]


def test_compose_config_checks_values_like_the_command_line():
    from image_classifier.config import compose_config
    from image_classifier.errors import UserError

    assert compose_config("train.lr=0.01").train.lr == 0.01
    with pytest.raises(UserError, match="train.lr=-1 must be a number > 0"):
        compose_config("train.lr=-1")
    with pytest.raises(UserError, match="Could not override 'train.lrr'"):
        compose_config("train.lrr=1")


def test_start_up_objects_are_frozen_out_of_the_collectors_reach(exported):
    """The service's start-up (the model and every module loaded) ends with gc.freeze, so the
    full collections under load walk only what requests allocate (the p99 at 64 clients); its
    stop unfreezes them (frozen, they printed "nanobind: leaked" lines at the interpreter's
    exit)."""
    import gc

    from fastapi.testclient import TestClient

    from image_classifier.serving.app import create_app

    model, _ = exported
    app = create_app(load_predictor(model))
    gc.unfreeze()
    try:
        with TestClient(app) as client:  # runs the lifespan: start-up, then requests
            assert gc.get_freeze_count() > 10_000
            assert client.get("/health").status_code == 200
        assert gc.get_freeze_count() == 0  # back in reach when the service stops
    finally:
        gc.unfreeze()
