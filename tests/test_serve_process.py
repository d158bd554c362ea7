"""`python -m trainer.serve` as a process, started as Vertex AI starts a custom container: its routes,
its memory bound under many slow clients, and the timeouts that drop stalled ones.

One server for the module (TensorFlow's import is most of its start-up), with short timeouts and
small limits so that a test sees them act in seconds.
"""
from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest

from tests.serving_fixtures import make_image_bytes, test_export  # noqa: F401
from tests.test_serve import listening_addresses

pytestmark = pytest.mark.slow

HEALTH_ROUTE = "/v1/endpoints/123/deployedModels/456"
PREDICT_ROUTE = "/v1/endpoints/123/deployedModels/456:predict"
MAX_CONNECTIONS = 16
MAX_BODY_BYTES = 2**19  # --max_body_mb 0.5
TIMEOUT_S = 3  # header and body timeouts: drops are expected to take this long
KEEP_ALIVE_S = 2
ANSWERED_WITHIN_S = 60  # generous: a loaded 2-core machine must not fail what should succeed
IMAGES = [make_image_bytes((250, 10, 10), "JPEG"), make_image_bytes((10, 230, 10))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(test_export, tmp_path_factory):
    """The server started with Vertex AI's environment and no --model; yields (port, process, log path)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": HEALTH_ROUTE,
           "AIP_PREDICT_ROUTE": PREDICT_ROUTE, "AIP_STORAGE_URI": test_export}
    command = [sys.executable, "-m", "trainer.serve", "--max_connections", str(MAX_CONNECTIONS),
               "--max_body_mb", str(MAX_BODY_BYTES / 2**20), "--max_request_pixels", "200000",
               "--header_timeout_s", str(TIMEOUT_S), "--body_timeout_s", str(TIMEOUT_S),
               "--keep_alive_timeout_s", str(KEEP_ALIVE_S)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not answer within 120 s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}{HEALTH_ROUTE}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield port, proc, log
    finally:
        proc.terminate()
        proc.wait(30)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_vertex_ai_routes_and_bodies_on_all_interfaces(server, test_export):
    import tensorflow as tf

    port, _, log = server
    assert listening_addresses(port) == {"0.0.0.0"}, "inside Vertex AI's container the server must listen on 0.0.0.0"
    health = httpx.get(f"http://127.0.0.1:{port}{HEALTH_ROUTE}", timeout=30)
    assert health.status_code == 200
    body = {"instances": [{"b64": b64(IMAGES[0])}, {"image_bytes": {"b64": b64(IMAGES[1])}}], "parameters": {}}
    r = httpx.post(f"http://127.0.0.1:{port}{PREDICT_ROUTE}", json=body, timeout=ANSWERED_WITHIN_S)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    direct = tf.saved_model.load(test_export).signatures["serving_default"](image_bytes=tf.constant(IMAGES))
    assert [p["class_name"] for p in predictions] == [c.decode() for c in direct["class_name"].numpy()]
    np.testing.assert_allclose([p["probabilities"] for p in predictions], direct["probabilities"].numpy(),
                               rtol=1e-5, atol=1e-7)  # batch of 2 either way; the kernels may still differ
    # TF Serving's routes stay, and the Vertex predict route refuses what TF Serving's refuses.
    r = httpx.post(f"http://127.0.0.1:{port}/v1/models/model:predict", json=body, timeout=ANSWERED_WITHIN_S)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    r = httpx.post(f"http://127.0.0.1:{port}{PREDICT_ROUTE}", json={"instances": []}, timeout=ANSWERED_WITHIN_S)
    assert r.status_code == 400 and "non-empty" in r.json()["error"]
    assert f"serving {test_export} as 'model' on http://0.0.0.0:{port}" in log.read_text()


def memory_bound_bytes(log_text: str) -> float:
    found = re.search(r"memory bound: ([\d,.]+) MiB = ", log_text)
    assert found, f"the server did not state its memory bound:\n{log_text[-2000:]}"
    return float(found.group(1).replace(",", "")) * 2**20


def trickle(port: int, outcomes: list, stop: threading.Event) -> None:
    """Sends a request head and all of a maximal body but its last bytes at once, then one byte every
    0.1 s: the server holds the body so far. Appends the status the server answered, or "closed"."""
    body_size = MAX_BODY_BYTES
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWERED_WITHIN_S) as s:
            s.sendall(f"POST {PREDICT_ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {body_size}\r\n\r\n".encode() + b'{"instances": [{"b64": "'
                      + b"A" * (body_size - 200))
            s.setblocking(False)
            answer = b""
            while not stop.is_set():
                try:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                except BlockingIOError:
                    s.send(b"A")
                    time.sleep(0.1)
            outcomes.append(int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else "closed")
    except OSError:
        outcomes.append("closed")  # refused while sending: the server closed first


def test_many_trickling_clients_stay_within_the_memory_bound_and_a_good_client_is_answered(server):
    port, proc, log = server
    bound = memory_bound_bytes(log.read_text())
    process = psutil.Process(proc.pid)
    peak = [process.memory_info().rss]
    stop_sampling, stop_tricklers = threading.Event(), threading.Event()

    def sample():
        while not stop_sampling.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outcomes: list = []
    tricklers = [threading.Thread(target=trickle, args=(port, outcomes, stop_tricklers), daemon=True)
                 for _ in range(10 * MAX_CONNECTIONS)]  # 160 x 0.5 MiB: 80 MiB if the server held them all
    for t in tricklers:
        t.start()
    # A well-behaved client retries a 503 ("too many connections") until a slot frees.
    answered = None
    deadline = time.monotonic() + ANSWERED_WITHIN_S
    while answered is None and time.monotonic() < deadline:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}{PREDICT_ROUTE}", timeout=ANSWERED_WITHIN_S,
                           json={"instances": [{"b64": b64(IMAGES[0])}]})
            if r.status_code == 200:
                answered = r
            else:
                assert r.status_code == 503, r.text
                time.sleep(0.2)
        except httpx.TransportError:
            time.sleep(0.2)
    for t in tricklers:
        t.join(ANSWERED_WITHIN_S)
    stop_tricklers.set()
    stop_sampling.set()
    sampler.join()
    assert answered is not None, "the well-behaved client got no answer while slow clients trickled"
    assert answered.json()["predictions"][0]["class_name"] == "red"
    assert all(not t.is_alive() for t in tricklers), "a trickling client was never dropped"
    assert 408 in outcomes, f"no trickling client was dropped by the body timeout: {sorted(map(str, outcomes))[:20]}"
    assert 503 in outcomes or "closed" in outcomes, "no connection was refused past --max_connections"
    assert set(outcomes) <= {408, 503, "closed"}, outcomes
    assert peak[0] <= bound, f"the server reached {peak[0] / 2**20:.1f} MiB, over its stated bound {bound / 2**20:.1f} MiB"
    assert "dropped a client whose body did not arrive within 3 s (--body_timeout_s)" in log.read_text()


def read_until_closed(s: socket.socket) -> bytes:
    s.settimeout(ANSWERED_WITHIN_S)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    return answer


def test_stalled_clients_are_dropped_after_their_timeouts(server):
    """A client that stops mid-body (408), mid-head (408), after connecting (closed), or idles after an
    answer (keep-alive timeout), a head still unfinished past its size limit (431), and the rest of a
    body answered 413 that trickles (closed after the body timeout): each connection ends. A client
    that sends a whole oversized body reads its 413, and its connection goes on."""
    port, _, _ = server
    results = {}

    def stop_mid_body():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST {PREDICT_ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
                      + b'{"instances": [')
            results["mid-body"] = read_until_closed(s)

    def stop_mid_head():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST {PREDICT_ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Le".encode())
            results["mid-head"] = read_until_closed(s)

    def send_nothing():
        with socket.create_connection(("127.0.0.1", port)) as s:
            results["nothing"] = read_until_closed(s)

    def idle_after_an_answer():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"GET {HEALTH_ROUTE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            results["keep-alive"] = read_until_closed(s)

    def huge_head():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"GET {HEALTH_ROUTE} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20_000}".encode())  # and more to come
            results["huge head"] = read_until_closed(s)

    def oversized_body_sent_in_full():  # answered 413 from its Content-Length, and can read that answer
        with socket.create_connection(("127.0.0.1", port)) as s:
            size = MAX_BODY_BYTES + 1
            s.sendall(f"POST {PREDICT_ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + b"A" * size)
            s.sendall(f"GET {HEALTH_ROUTE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # the connection goes on
            results["oversized"] = read_until_closed(s)

    def oversized_body_trickled():  # answered 413 at once; the rest of its body may not take forever
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"POST {PREDICT_ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MAX_BODY_BYTES}\r\n\r\n".encode())
            s.settimeout(0.2)
            answer, closed = b"", False
            for _ in range(int(ANSWERED_WITHIN_S / 0.2)):
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    s.sendall(b"A")
                    continue
                if not chunk:
                    closed = True
                    break
                answer += chunk
            results["oversized, trickled"] = answer, closed

    clients = [threading.Thread(target=f) for f in (stop_mid_body, stop_mid_head, send_nothing, idle_after_an_answer,
                                                    huge_head, oversized_body_sent_in_full, oversized_body_trickled)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(2 * ANSWERED_WITHIN_S)
    assert results["mid-body"].startswith(b"HTTP/1.1 408 "), results["mid-body"][:200]
    assert b"the body did not arrive within 3 s (--body_timeout_s): 15 of 1000 bytes" in results["mid-body"]
    assert results["mid-head"].startswith(b"HTTP/1.1 408 "), results["mid-head"][:200]
    assert results["nothing"] in (b"", results["mid-head"])  # closed with or without a 408
    assert results["keep-alive"].startswith(b"HTTP/1.1 200 ") and results["keep-alive"].count(b"HTTP/1.1") == 1
    assert results["huge head"].startswith(b"HTTP/1.1 431 "), results["huge head"][:200]
    assert results["oversized"].startswith(b"HTTP/1.1 413 ") and results["oversized"].count(b"HTTP/1.1 200 ") == 1
    trickled, closed = results["oversized, trickled"]
    assert trickled.startswith(b"HTTP/1.1 413 ") and trickled.count(b"HTTP/1.1") == 1, trickled[:300]
    assert closed, "the rest of a body answered 413 trickled on for a minute"


def test_a_response_written_in_two_parts_leaves_in_one_send_and_close_sends_it_first():
    """uvicorn writes a response's head and body separately; the server's transport sends the writes of
    one event-loop step together (one writev instead of two sends and two wake-ups of the client)."""
    import asyncio

    from trainer.serving.resources import OneWritePerStep

    class Recording:
        def __init__(self):
            self.sends, self.closed = [], False

        def writelines(self, parts):
            self.sends.append(b"".join(parts))

        def is_closing(self):
            return self.closed

        def close(self):
            self.closed = True

        def get_extra_info(self, name):
            return ("127.0.0.1", 1) if name == "peername" else None

    async def scenario():
        raw = Recording()
        transport = OneWritePerStep(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert raw.sends == []  # nothing leaves before the step ends
        await asyncio.sleep(0)
        after_one_step = list(raw.sends)
        transport.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        transport.close()  # what is pending goes out before the close
        sent_before_close = list(raw.sends)
        transport.write(b"late")
        await asyncio.sleep(0)
        return after_one_step, sent_before_close, raw, transport

    after_one_step, sent_before_close, raw, transport = asyncio.run(scenario())
    assert after_one_step == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    assert sent_before_close[-1] == b"HTTP/1.1 408 Request Timeout\r\n\r\n" and raw.closed
    assert raw.sends == sent_before_close  # nothing is sent on a closed transport
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the wrapped transport's
