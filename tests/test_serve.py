"""trainer.serve: TF Serving's REST contract, equal predictions, and refusal of hostile requests."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from tests.image_factory import jpeg_with_claimed_size
from tests.serving_fixtures import make_bomb_png_header, make_image_bytes, marker_path, test_export  # noqa: F401
from trainer.serving.app import make_app, parse_server_timing, server_timing
from trainer.serving.batching import BatchingOptions
from trainer.serving.request_checks import ServingLimits

SECRET = "SENTINEL-7f3c9b: must never leave the server"
LIMITS = dict(max_body_bytes=200_000, max_instances=8, max_request_pixels=1_000_000)

# Every path Python opens in this process (open(), os.open(), ...) while `_opened` is armed.
_opened: list[str] | None = None


def _record_opens(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; it costs one comparison per event


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """root/ with images and symlinks pointing out of it; sentinels next to root/, outside it."""
    base = tmp_path_factory.mktemp("files")
    root, outside = base / "root", base / "outside"
    (root / "cats").mkdir(parents=True)
    outside.mkdir()
    (root / "cats" / "red.png").write_bytes(make_image_bytes((250, 10, 10)))
    (root / "blue.jpg").write_bytes(make_image_bytes((10, 10, 240), "JPEG"))
    (base / "secret.txt").write_text(SECRET)
    (outside / "red.png").write_bytes(make_image_bytes((250, 10, 10)))  # a valid image: reading it would succeed
    (root / "link_to_secret.txt").symlink_to(base / "secret.txt")
    (root / "link_to_image.png").symlink_to(outside / "red.png")
    (root / "link_to_outside_dir").symlink_to(outside, target_is_directory=True)
    (root / "shot:1.png").write_bytes(make_image_bytes((10, 10, 240)))  # a colon is not a URL scheme
    os.mkfifo(root / "fifo")  # opening it for reading would wait for a writer forever
    sibling = base / "root2"  # shares the root's name as a prefix: "under the root" is not startswith
    sibling.mkdir()
    (sibling / "red.png").write_bytes(make_image_bytes((250, 10, 10)))
    return {"root": str(root), "secret": str(base / "secret.txt"), "outside_image": str(outside / "red.png"),
            "sibling_image": str(sibling / "red.png")}


@pytest.fixture(scope="module")
def client(test_export, files):
    app = make_app(test_export, "model", ServingLimits(allow_root=files["root"], **LIMITS))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def direct(test_export):
    """serving_default called on the SavedModel itself, without any of trainer's code."""
    import tensorflow as tf

    fn = tf.saved_model.load(test_export).signatures["serving_default"]

    def call(images: list[bytes]) -> list[dict]:
        out = {k: v.numpy() for k, v in fn(image_bytes=tf.constant(images)).items()}
        return [{k: out[k][i] for k in out} for i in range(len(images))]
    return call


def assert_predictions_equal(got: list[dict], expected: list[dict]):
    """A tolerance that holds across batch compositions: the server merges concurrent requests into
    one call, and oneDNN picks kernels by batch size (1.9e-6 relative seen between batches of 2 and 1)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g["class_name"] == e["class_name"].decode()
        assert g["class_index"] == int(e["class_index"])
        np.testing.assert_allclose(g["probability"], e["probability"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g["probabilities"], e["probabilities"], rtol=1e-5, atol=1e-7)


IMAGES = [make_image_bytes((250, 10, 10)), make_image_bytes((10, 230, 10), "JPEG"), make_image_bytes((120, 120, 130)),
          make_image_bytes((10, 10, 240), "WEBP")]


# --- the contract -----------------------------------------------------------------------------

def test_status_and_metadata_follow_tf_serving(client):
    for path in ("/v1/models/model", "/v1/models/model/versions/1"):
        r = client.get(path)
        assert r.status_code == 200, r.text
        assert r.json()["model_version_status"][0] == {"version": "1", "state": "AVAILABLE",
                                                       "status": {"error_code": "OK", "error_message": ""}}
    sig = client.get("/v1/models/model/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert list(sig) == ["serving_default"]  # predict_filenames is never offered
    assert sig["serving_default"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    outputs = sig["serving_default"]["outputs"]
    assert outputs["probability"]["dtype"] == "DT_FLOAT" and outputs["class_index"]["dtype"] == "DT_INT64"
    assert outputs["class_name"]["dtype"] == "DT_STRING"
    for path in ("/v1/models/other", "/v1/models/other/metadata", "/v1/models/model/versions/2"):
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path
    r = client.post("/v1/models/other:predict", json={"instances": [{"b64": b64(IMAGES[0])}]})
    assert r.status_code == 404 and "other" in r.json()["error"]
    # Paths and methods the contract does not have: TF Serving's {"error"} shape, with the framework's status.
    r = client.get("/v2/models/model")
    assert r.status_code == 404 and r.json() == {"error": "Not Found: GET /v2/models/model"}
    r = client.post("/v1/models/model", json={})
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed: POST /v1/models/model"}
    # The predict routes come first; a GET of one still falls through to the status route, which finds
    # no servable named "model:predict".
    r = client.get("/v1/models/model:predict")
    assert r.status_code == 404 and "Latest(model:predict)" in r.json()["error"]


@pytest.mark.parametrize("form", ["image_bytes", "bare_b64"])
def test_predict_equals_the_saved_model_called_directly(client, direct, form):
    wrap = (lambda d: {"image_bytes": {"b64": b64(d)}}) if form == "image_bytes" else (lambda d: {"b64": b64(d)})
    r = client.post("/v1/models/model:predict", json={"instances": [wrap(d) for d in IMAGES]})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert_predictions_equal(predictions, direct(IMAGES))
    if "SERVING_TEST_EXPORT" not in os.environ:  # the colour model's known answers
        assert [p["class_name"] for p in predictions[:2]] == ["red", "green"]
    r = client.post("/v1/models/model/versions/1:predict", json={"instances": [wrap(IMAGES[0])]})
    assert_predictions_equal(r.json()["predictions"], direct(IMAGES[:1]))
    # The metadata's "signature_name": "" echoed back means the default signature, as in TF Serving.
    r = client.post("/v1/models/model:predict", json={"signature_name": "", "instances": [wrap(IMAGES[0])]})
    assert r.status_code == 200, r.text
    assert_predictions_equal(r.json()["predictions"], direct(IMAGES[:1]))


def test_predictions_say_where_their_time_went_in_server_timing(client):
    r = client.post("/v1/models/model:predict", json={"instances": [{"b64": b64(d)} for d in IMAGES]})
    assert r.status_code == 200, r.text
    phases = parse_server_timing(r.headers["server-timing"])
    assert list(phases) == ["read", "parse", "queue", "model", "total"]
    assert all(value >= 0 for value in phases.values()) and phases["model"] > 0
    assert phases["total"] >= phases["read"] + phases["parse"] + phases["queue"] + phases["model"]
    refused = client.post("/v1/models/model:predict", json={"instances": []})
    assert refused.status_code == 400 and "server-timing" not in refused.headers  # only answered predictions


def test_server_timing_is_written_and_read_by_one_pair_of_functions():
    header = server_timing({"parse": 0.00065, "model": 0.0101})
    assert header == "parse;dur=0.650, model;dur=10.100"
    assert parse_server_timing(header) == {"parse": 0.65, "model": 10.1}
    # Other servers' forms: descriptions, quoted durations, entries with no duration.
    assert parse_server_timing('db;desc="Data base";dur="53", cache, app;dur=47.2') == {"db": 53.0, "app": 47.2}
    with pytest.raises(ValueError, match="'db;dur=fast'"):
        parse_server_timing("db;dur=fast")


def test_an_unexpected_failure_is_a_500_that_names_only_its_type_and_the_server_goes_on(test_export, monkeypatch):
    from trainer.serving.exported_model import ExportedModel

    app = make_app(test_export, "model", ServingLimits(**LIMITS))
    answer = ExportedModel.predict
    with TestClient(app, raise_server_exceptions=False) as broken:
        monkeypatch.setattr(ExportedModel, "predict", lambda self, images: 1 / 0)
        r = broken.post("/v1/models/model:predict", json={"instances": [{"b64": b64(IMAGES[0])}]})
        assert r.status_code == 500 and r.json() == {"error": "internal error: ZeroDivisionError"}
        monkeypatch.setattr(ExportedModel, "predict", answer)
        assert broken.post("/v1/models/model:predict", json={"instances": [{"b64": b64(IMAGES[0])}]}).status_code == 200


def test_the_model_is_warmed_up_with_one_jpeg_when_the_server_starts(test_export, monkeypatch):
    from trainer.serving.exported_model import ExportedModel, ExportError

    calls = []
    answer = ExportedModel.predict
    monkeypatch.setattr(ExportedModel, "predict", lambda self, images: calls.append(list(images)) or answer(self, images))
    app = make_app(test_export, "model", ServingLimits(**LIMITS))
    assert not calls  # the app is built; the server has not started
    with TestClient(app) as c:  # starts it, as uvicorn does
        assert len(calls) == 1 and len(calls[0]) == 1 and calls[0][0][:3] == b"\xff\xd8\xff"
        assert c.get("/v1/models/model").status_code == 200
    monkeypatch.setattr(ExportedModel, "predict", lambda self, images: 1 / 0)  # a model that fails every call
    with pytest.raises(ExportError, match="failed its warm-up prediction on a 32x32 JPEG: ZeroDivisionError"):
        with TestClient(make_app(test_export, "model", ServingLimits(**LIMITS))):
            pass


def test_web_safe_base64_and_a_non_tf_format_are_accepted(client, direct):
    webp = make_image_bytes((250, 10, 10), "WEBP")
    r = client.post("/v1/models/model:predict", json={"instances": [
        {"b64": base64.urlsafe_b64encode(IMAGES[1]).decode()}, {"b64": b64(webp)}]})
    assert r.status_code == 200, r.text
    assert_predictions_equal(r.json()["predictions"], direct([IMAGES[1], webp]))  # the graph decodes WebP itself
    if "SERVING_TEST_EXPORT" not in os.environ:
        assert [p["class_name"] for p in r.json()["predictions"]] == ["green", "red"]


def test_filenames_under_the_root_are_read_by_the_server(client, direct, files, test_export):
    instances = [{"filenames": "cats/red.png"}, {"filenames": os.path.join(files["root"], "blue.jpg")},
                 {"filenames": "cats/../blue.jpg"}, {"filenames": "shot:1.png"}]
    r = client.post("/v1/models/model:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    names = ["cats/red.png", "blue.jpg", "blue.jpg", "shot:1.png"]
    expected = direct([open(os.path.join(files["root"], name), "rb").read() for name in names])
    assert_predictions_equal(r.json()["predictions"], expected)
    assert not os.path.exists(marker_path(test_export)), "the server called predict_filenames"


def test_filenames_are_refused_without_allow_root(test_export, files):
    with TestClient(make_app(test_export, "model", ServingLimits(**LIMITS))) as c:
        r = c.post("/v1/models/model:predict", json={"instances": [{"filenames": "cats/red.png"}]})
    assert r.status_code == 403 and "--allow_root" in r.json()["error"]


# --- hostile requests -------------------------------------------------------------------------

HOSTILE_PATHS = [
    ("../../etc/passwd", 403), ("../secret.txt", 403), ("cats/../../secret.txt", 403),
    ("{secret}", 403),  # absolute, outside
    ("{outside_image}", 403),  # absolute, outside, and a valid image
    ("link_to_secret.txt", 403), ("link_to_image.png", 403), ("link_to_outside_dir/red.png", 403),
    ("gs://bucket/cats/red.png", 403), ("file://{secret}", 403), ("file:{secret}", 403), ("http://127.0.0.1:1/x.png", 403),
    ("{sibling_image}", 403), ("../root2/red.png", 403),  # a folder whose name starts with the root's
    ("/dev/zero", 403), ("cats", 400), ("fifo", 400),  # under the root but not regular files
    ("missing.png", 400),
]


@pytest.mark.parametrize("path,status", HOSTILE_PATHS)
def test_paths_outside_the_root_are_refused_and_never_opened(client, files, test_export, path, status):
    global _opened
    path = path.format(**files)
    _opened = []
    try:
        r = client.post("/v1/models/model:predict",
                        json={"instances": [{"filenames": "cats/red.png"}, {"filenames": path}]})
        opened = [os.path.realpath(p) for p in _opened]
    finally:
        _opened = None
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"].startswith("instance 1:")
    assert SECRET not in r.text
    assert os.path.realpath(os.path.join(files["root"], "cats/red.png")) in opened  # the hook does see reads
    for sentinel in (files["secret"], files["outside_image"], files["sibling_image"], "/etc/passwd", "/dev/zero"):
        assert os.path.realpath(sentinel) not in opened, f"the server opened {sentinel}"
    assert not os.path.exists(marker_path(test_export)), "the server called predict_filenames"


def _hostile_bodies() -> dict[str, tuple[dict, int, str]]:
    good = {"b64": b64(IMAGES[0])}
    truncated = make_image_bytes((10, 200, 10), "JPEG", size=(200, 150))[:-300]
    return {
        "invalid base64": ({"instances": [good, {"b64": "not*base64!"}]}, 400, "instance 1: invalid base64"),
        "base64 with a bad length": ({"instances": [{"b64": "abcde"}]}, 400, "instance 0: invalid base64"),
        "not an image": ({"instances": [good, {"b64": b64(b"%PDF-1.4 hello")}]}, 400,
                         "instance 1: not a readable image: no image format starts with the bytes 25 50 44 46 2d 31 2e 34 "
                         "(the formats read: JPEG, PNG, BMP, GIF, WEBP, TIFF)"),
        "truncated jpeg": ({"instances": [good, good, {"b64": b64(truncated)}]}, 400,
                           "instance 2: the image does not decode (corrupt or truncated: jpeg::Uncompress failed. Invalid JPEG data"),
        "decompression bomb header": ({"instances": [{"b64": b64(make_bomb_png_header())}]}, 413, "instance 0: 30000x30000"),
        "jpeg bomb header": ({"instances": [good, {"b64": b64(jpeg_with_claimed_size(40000, 30000))}]}, 413,
                             "instance 1: 40000x30000"),
        "too many pixels in all": ({"instances": [{"b64": b64(make_bomb_png_header(800, 800))}] * 2}, 413, "per-request"),
        "too many instances": ({"instances": [good] * 9}, 413, "9 instances is over the limit of 8"),
        "predict_filenames signature": ({"signature_name": "predict_filenames", "instances": [good]}, 400, "is not served"),
        "signature_name not a string": ({"signature_name": 0, "instances": [good]}, 400, "signature_name '0' is not served"),
        "columnar inputs": ({"inputs": {"image_bytes": [good]}}, 400, '"instances"'),
        "empty instances": ({"instances": []}, 400, '"instances" must be a non-empty array, got an empty array'),
        "instances an object": ({"instances": {"b64": "aGVsbG8="}}, 400, '"instances" must be a non-empty array, got an object'),
        "raw string instance": ({"instances": ["aGVsbG8="]}, 400,
                                'instance 0: expected {"image_bytes": {"b64": ...}}, {"b64": ...} or {"filenames": ...}, got a string'),
        "instance with other keys": ({"instances": [{"bytes": "aGVsbG8="}]}, 400, "got an object with keys ['bytes']"),
        "image_bytes without b64": ({"instances": [{"image_bytes": "aGVsbG8="}]}, 400,
                                    'instance 0: "image_bytes" must be {"b64": "<base64>"} (binary data cannot travel '
                                    'as a JSON string), got a string'),
        "b64 a number": ({"instances": [good, {"b64": 12}]}, 400, 'instance 1: "b64" must be a string, got a number'),
        "filenames a list": ({"instances": [{"filenames": ["cats/red.png"]}]}, 400,
                             'instance 0: "filenames" must be one non-empty path string, got an array'),
        "body an array": ([good], 400, 'the body must be a JSON object {"instances": [...]}, got an array'),
    }


@pytest.mark.parametrize("name", list(_hostile_bodies()))
def test_malformed_or_oversized_requests_get_their_4xx_at_once(client, name):
    body, status, message = _hostile_bodies()[name]
    start = time.perf_counter()
    r = client.post("/v1/models/model:predict", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert time.perf_counter() - start < 2.0  # the 900 MP bomb would take far longer (and 2.7 GB) to decode


def test_oversized_and_non_json_bodies_are_refused(client):
    big = json.dumps({"instances": [{"b64": "A" * 250_000}]})
    r = client.post("/v1/models/model:predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "200,000" in r.json()["error"]

    def chunked():  # no Content-Length: the limit is enforced while streaming
        for _ in range(100):
            yield b"x" * 10_000
    r = client.post("/v1/models/model:predict", content=chunked())
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    r = client.post("/v1/models/model:predict", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/v1/models/model:predict", content=b'{"instances": [{"b64": "\xff\xfe"}]}')  # not UTF-8
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/v1/models/model:predict", content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400
    assert client.post("/v1/models/model:predict", json={"instances": [{"b64": b64(IMAGES[0])}]}).status_code == 200


# --- the real server under concurrent load ----------------------------------------------------

@pytest.fixture(scope="module")
def live_server(test_export, files):
    """uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    app = make_app(test_export, "model", ServingLimits(allow_root=files["root"], **LIMITS))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # A minute of keep-alive: with the client in this process, a round of 215 requests took ~9 s at a
    # load of 9, and uvicorn's 5 s default closed pooled connections as httpx reused them for a POST
    # (ReadError in 2 of 25 rounds; none of 25 so). That race is the client's to retry, not under test.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=60))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_200_concurrent_requests_complete_while_hostile_ones_are_refused(live_server, direct):
    expected = direct(IMAGES)
    valid = {"instances": [{"b64": b64(d)} for d in IMAGES]}
    hostile = [({"instances": [{"b64": b64(make_bomb_png_header())}]}, 413),
               ({"instances": [{"filenames": "../secret.txt"}]}, 403),
               ({"instances": [{"b64": "A" * 300_000}]}, 413)]

    async def run_all():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=live_server, limits=limits, timeout=60) as c:
            valid_calls = [c.post("/v1/models/model:predict", json=valid) for _ in range(200)]
            hostile_calls = [c.post("/v1/models/model:predict", json=body) for body, _ in hostile * 5]
            return await asyncio.gather(*valid_calls, *hostile_calls, return_exceptions=True)

    responses = asyncio.run(run_all())
    errors = [r for r in responses[:200] if isinstance(r, Exception) or r.status_code != 200]
    assert not errors, f"{len(errors)} of 200 valid requests failed, e.g. {errors[0]!r}"
    for r in responses[:200]:
        assert_predictions_equal(r.json()["predictions"], expected)
    for r, (_, status) in zip(responses[200:], hostile * 5):
        assert not isinstance(r, Exception), f"a hostile request broke the connection: {r!r}"
        assert r.status_code == status, r.text


def test_an_animated_gif_reaches_the_model_as_its_first_frame_only(client, direct):
    """TF's decode_image decodes every GIF frame even for one output, and the header gives one
    frame's size: so the server hands the model a PNG of the first frame instead."""
    import io

    from PIL import Image

    from shared import image_check
    from trainer.serving.exported_model import prepare_image_bytes

    frames = [Image.new("RGB", (64, 48), c) for c in [(250, 10, 10)] + [(10, 10, 240)] * 30]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    gif = out.getvalue()
    prepared = prepare_image_bytes(gif, image_check.read_header(gif))
    assert prepared.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(prepared)) as first:
        assert first.size == (64, 48) and getattr(first, "n_frames", 1) == 1
    r = client.post("/v1/models/model:predict", json={"instances": [{"b64": b64(gif)}]})
    assert r.status_code == 200, r.text
    assert_predictions_equal(r.json()["predictions"], direct([prepared]))


@pytest.mark.parametrize("batching", ["off", "on"])
def test_formats_tf_cannot_read_are_decoded_only_inside_the_model_slots(test_export, monkeypatch, batching):
    """Converting a TIFF decodes all of it (a 40 MP one holds 120 MB): six such requests at once
    must convert at most MODEL_CALLS_IN_FLIGHT at a time, not one per request thread (WORKER_THREADS: 40)."""
    from shared import image_check
    from trainer.serving import app as serving_app

    lock, active, peak = threading.Lock(), [0], [0]
    convert = image_check.to_rgb_image_bytes

    def slow_convert(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)
            return convert(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(image_check, "to_rgb_image_bytes", slow_convert)
    monkeypatch.setattr(serving_app, "MODEL_CALLS_IN_FLIGHT", 2)
    app = make_app(test_export, "model", ServingLimits(**LIMITS), batching=None if batching == "off" else BatchingOptions())
    body = {"instances": [{"b64": b64(make_image_bytes((250, 10, 10), "TIFF"))}]}

    async def six_at_once():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await asyncio.gather(*[c.post("/v1/models/model:predict", json=body) for _ in range(6)])

    responses = asyncio.run(six_at_once())
    assert [r.status_code for r in responses] == [200] * 6, responses[0].text
    assert {r.json()["predictions"][0]["class_name"] for r in responses} == {"red"}
    if batching == "off":  # each request has a model slot of its own: both slots convert at once
        assert peak[0] == 2, f"{peak[0]} conversions ran at once with 2 model slots"
    else:  # the first request runs alone and the other five wait for it in one batch
        assert peak[0] == 1, f"{peak[0]} conversions ran at once: the batches did not gather"


def test_thread_spinning_is_switched_off_in_tensorflows_own_config_before_it_starts():
    """The switch goes through a private attribute of TF's eager context (TF2 has no public one): this
    fails when a TensorFlow release stops reading it, or starts before the switch can act."""
    script = """
import tensorflow as tf
from tensorflow.python.eager import context
from trainer.serving.exported_model import disable_thread_spinning
disable_thread_spinning()
tf.constant(1.0) + 1.0  # starts the runtime, which takes its ConfigProto from the context now
assert context.context()._initialized
print("spinning disabled:", context.context().config.experimental.disable_thread_spinning)
try:
    disable_thread_spinning()
except RuntimeError as e:
    print("too late:", e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "spinning disabled: True" in out.stdout
    assert "too late: TensorFlow's runtime has already started" in out.stdout


def test_the_serve_command_answers_predictions_with_its_defaults(test_export, direct, tmp_path):
    """`python -m trainer.serve` as a user runs it (thread spinning off), not the app in this process;
    started and awaited as the serving benchmark starts it."""
    from trainer.serving.bench_client import free_port, start_server

    port, log = free_port(), tmp_path / "serve.log"
    server = start_server(test_export, port, str(log), thread_spinning=False)
    try:
        assert listening_addresses(port) == {"127.0.0.1"}, "the server must bind only loopback by default"
        with socket.create_connection(("127.0.0.1", port)) as aborted:  # an upload that stops halfway
            aborted.sendall(b"POST /v1/models/model:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n" + b'{"instances": [')
            aborted.shutdown(socket.SHUT_WR)
            aborted.settimeout(30)
            while aborted.recv(65536):  # until the server closes its side
                pass
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/model:predict", timeout=30,
                       json={"instances": [{"b64": b64(d)} for d in IMAGES]})
        assert r.status_code == 200, r.text
        assert_predictions_equal(r.json()["predictions"], direct(IMAGES))
        assert "server-timing" in r.headers
    finally:
        server.terminate()
        server.wait(30)
    text = log.read_text()
    assert "TensorFlow's thread pools sleep between model calls" in text
    assert "client closed the connection after 15 of 100 body bytes" in text
    for failure in ("Traceback", "ERROR trainer.serve", "Exception in ASGI application"):  # ours, uvicorn's
        assert failure not in text, text


def listening_addresses(port: int) -> set[str]:
    """The local addresses of TCP sockets listening on `port`, from Linux's /proc/net/tcp and tcp6."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # the kernel prints each 32-bit word in host (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add(str(ipaddress.ip_address(raw)))
    if not found:
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    return found


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_body_limit_that_is_not_a_number_is_a_usage_error(test_export, value, capsys):
    from trainer.serving import serve

    with pytest.raises(SystemExit) as e:
        serve.run(["--model", test_export, "--max_body_mb", value])
    assert e.value.code == 2
    assert f"--max_body_mb {value} is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", str((os.cpu_count() or 1) + 1)])
def test_batch_threads_beyond_the_cores_are_a_usage_error(test_export, value, capsys):
    # Each batched call may hold a request's pixels decoded; the memory bound counts one per core.
    from trainer.serving import serve

    with pytest.raises(SystemExit) as e:
        serve.run(["--model", test_export, "--num_batch_threads", value])
    assert e.value.code == 2
    assert f"--num_batch_threads {value} must be 1 to {os.cpu_count() or 1}" in capsys.readouterr().err
