"""A Cloud Storage emulator for tests: gcp-storage-emulator on a free localhost port, in memory.

With STORAGE_EMULATOR_HOST set, the google-cloud-storage client under Beam's gcsio sends every
gs:// call to the emulator. Beam asks google.auth.default() for credentials first and retries it
with backoff before going anonymous (15-27 s per process); the credentials file written here holds
an access token valid until 2099, so default() succeeds at once and nothing is ever refreshed.

    python -m tests.gcs_emulator PORT    # serves bucket `BUCKET` until killed (what the fixture runs)
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

BUCKET = "bkt"
START_SECONDS = 60  # it starts in ~1 s; a loaded CI machine gets more
# The emulator serves one connection at a time: a client stopped mid-request (SIGSTOP in a test)
# would hold it, and every other client, until this many seconds pass.
CONNECTION_TIMEOUT_SECONDS = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(port: int) -> None:
    from gcp_storage_emulator import server

    server.RequestHandler.timeout = CONNECTION_TIMEOUT_SECONDS  # socketserver's per-connection timeout
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET).run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bucket_answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", f"/storage/v1/b/{BUCKET}")
        return connection.getresponse().status == 200
    except OSError:  # not listening yet
        return False
    finally:
        connection.close()


def _wait_until_serving(proc: subprocess.Popen, port: int) -> bool:
    """True once the emulator answers for its bucket; False if it exited (the port was taken)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _bucket_answers(port):
            return True
        time.sleep(0.05)
    raise TimeoutError(f"the Cloud Storage emulator did not answer on port {port} within {START_SECONDS} s")


def write_credentials(path: str) -> str:
    """Authorized-user credentials whose access token does not expire before 2099 (google-auth
    replaces a token_uri in this file type with Google's, so a refresh would need the network)."""
    with open(path, "w") as f:
        json.dump({"type": "authorized_user", "client_id": "test", "client_secret": "test",
                   "refresh_token": "test", "token": "test", "expiry": "2099-01-01T00:00:00Z"}, f)
    return path


@contextlib.contextmanager
def running_emulator(work_dir: str) -> Iterator[dict[str, str]]:
    """Starts the emulator; yields the environment variables that point a process's Cloud Storage
    client at it (this one's and subprocesses'). Kills it on exit."""
    for _ in range(3):  # another process may bind the free port before the emulator does
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if _wait_until_serving(proc, port):
                break
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    else:
        raise RuntimeError("the Cloud Storage emulator exited at start three times (port taken?)")
    try:
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "test",
               "GOOGLE_APPLICATION_CREDENTIALS": write_credentials(os.path.join(work_dir, "credentials.json"))}
    finally:
        proc.kill()
        proc.wait()


def upload(uri: str, data: bytes) -> str:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(uri, compression_type="uncompressed") as f:
        f.write(data)
    return uri


def download(uri: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(uri, compression_type="uncompressed") as f:
        return f.read()


def list_objects(prefix: str) -> dict[str, int]:
    """{name relative to prefix: size} of every object under `prefix/`."""
    from apache_beam.io.filesystems import FileSystems

    prefix = prefix.rstrip("/") + "/"
    return {m.path[len(prefix):]: m.size_in_bytes for m in FileSystems.match([prefix + "**"])[0].metadata_list}


if __name__ == "__main__":
    serve(int(sys.argv[1]))
