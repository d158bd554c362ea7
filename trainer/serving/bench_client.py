"""The serving benchmark's load generator (a raw-socket HTTP client) and the server it loads."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from typing import Sequence

from trainer.serving.app import parse_server_timing


class ServerClient:
    """POSTs one request of `images` over its own keep-alive connection; keeps each call's round trip
    and the server's Server-Timing phases (milliseconds) in `samples`.

    The load generator shares the 2 cores with the server, so whatever it spends is taken from the
    server (wrk and h2load are written in C for that reason). It is therefore a raw socket sending
    one pre-encoded request and reading a Content-Length response: 0.3 ms of CPU per 32-image
    request, where the standard library's http.client took 0.5 (its header parsing goes through
    email.parser) and httpx 1.3. It understands only what `trainer.serve` answers (HTTP/1.1,
    Content-Length, keep-alive) and raises on anything else.
    """

    def __init__(self, port: int, body: bytes):
        self.request = (f"POST /v1/models/model:predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.samples: list[dict[str, float]] = []

    def __call__(self) -> bytes:
        start = time.perf_counter()
        self.connection.sendall(self.request)
        status, headers, answer = read_response(self.connection)
        round_trip = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"the server answered {status}: {answer[:300]!r}")
        phases = parse_server_timing(headers.get("server-timing", ""))
        self.samples.append({"round_trip": round_trip * 1e3, **phases})
        return answer


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body from `connection` -> (status, headers with
    lower-case names, body). Raises ConnectionError if the server closes first, ValueError on a
    response without Content-Length (chunked), which `trainer.serve` never sends."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {len(data)} bytes of a response")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise ValueError(f"the response has no Content-Length: {status_line!r}, headers {sorted(headers)}")
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = connection.recv(max(65536, length - len(body)))
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {len(body)} of {length} body bytes")
        body += chunk
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/") or not rest[:3].isdigit():
        raise ValueError(f"not an HTTP status line: {status_line[:100]!r}")
    return int(rest[:3]), headers, body


def make_server_post(port: int, images: list[bytes]):
    """A factory of ServerClients that each send one request of `images`."""
    body = json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in images]}).encode()
    return lambda: ServerClient(port, body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, port: int, log_path: str, thread_spinning: bool,
                 flags: Sequence[str] = ()) -> subprocess.Popen:
    """`python -m trainer.serve` on 127.0.0.1:`port` with `flags`, once it answers (SystemExit if it does not)."""
    return wait_until_answering(launch_server(model_path, port, log_path, thread_spinning, flags), port, log_path)


def launch_server(model_path: str, port: int, log_path: str, thread_spinning: bool,
                  flags: Sequence[str] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "trainer.serve", "--model", model_path, "--port", str(port), *flags]
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command + (["--thread_spinning"] if thread_spinning else []),
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def wait_until_answering(proc: subprocess.Popen, port: int, log_path: str, seconds: float = 120) -> subprocess.Popen:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models/model", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"error: the server did not answer within {seconds:g} s; see {log_path}")
