"""Throughput of `trainer.serve` against the export's own, in one run (a benchmark, not a test):

    python -m trainer.bench_serve --model runs/r1/export [--images DIR] [--seconds 5]

Prints requests/s and images/s for requests of 1 and 32 images against a local server (started
here as `python -m trainer.serve` on a free 127.0.0.1 port), and the export's batched images/s
called in-process, then the two goals of issue 4:
  a 32-image request gives >= 5x the images/s of single-image requests;
  the server reaches >= 80% of the in-process images/s for batches of 32.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

BATCH_SIZES = (1, 32)
SYNTHETIC_SIZE = (320, 240)  # about a flowers-dataset photo (their median is ~320x240 to 500x375)


def make_synthetic_jpegs(count: int, size: tuple[int, int] = SYNTHETIC_SIZE, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields plus grain: ~20 KB at 320x240, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
        images.append(out.getvalue())
    return images


def read_images(folder: str, count: int) -> list[bytes]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg", ".png")))[:count]
    if not names:
        raise SystemExit(f"error: no .jpg/.jpeg/.png files in {folder}")
    images = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            images.append(f.read())
    return [images[i % len(images)] for i in range(count)]


def time_loop(call, seconds: float, warmup: int = 3) -> tuple[int, float]:
    """(calls, elapsed seconds) of calling `call()` repeatedly for about `seconds` after `warmup` calls."""
    for _ in range(warmup):
        call()
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        calls += 1
    return calls, time.perf_counter() - start


def make_in_process_call(model_path: str, images: list[bytes], batch: int):
    """A call of serving_default on `batch` encoded images, with the model loaded once here."""
    import tensorflow as tf

    fn = tf.saved_model.load(model_path).signatures["serving_default"]
    tensor = tf.constant(images[:batch])
    return lambda: fn(image_bytes=tensor)["probability"].numpy()


def measure_server(url: str, images: list[bytes], batch: int, clients: int, seconds: float) -> tuple[float, float]:
    """(requests/s, images/s) of `clients` threads each posting `batch`-image requests back to back."""
    import httpx

    body = json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in images[:batch]]}).encode()
    headers = {"content-type": "application/json"}

    def one_client() -> tuple[int, float]:
        with httpx.Client(base_url=url, timeout=60) as c:
            def post():
                r = c.post("/v1/models/model:predict", content=body, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"the server answered {r.status_code}: {r.text[:300]}")
            return time_loop(post, seconds)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: one_client(), range(clients)))
    requests_per_s = sum(calls / elapsed for calls, elapsed in results)
    return requests_per_s, requests_per_s * batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, port: int, log_path: str) -> subprocess.Popen:
    import httpx

    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "trainer.serve", "--model", model_path, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.monotonic() + 120
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
    raise SystemExit(f"error: the server did not answer within 120 s; see {log_path}")


def run(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m trainer.bench_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the export folder (runs/<run>/export)")
    p.add_argument("--images", default=None, help="folder of .jpg/.png to send (default: synthetic 320x240 JPEGs)")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per row and repeat (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="each row's best of this many runs is printed (default: %(default)s)")
    p.add_argument("--clients", type=int, default=1, help="concurrent client threads per server row (default: %(default)s)")
    p.add_argument("--server_log", default="/tmp/bench_serve_server.log")
    args = p.parse_args(argv)

    count = max(BATCH_SIZES)
    images = read_images(args.images, count) if args.images else make_synthetic_jpegs(count)
    mean_kb = sum(map(len, images)) / len(images) / 1024
    print(f"images: {'synthetic 320x240 JPEG' if not args.images else args.images}, mean {mean_kb:.1f} KB; "
          f"best of {args.repeats} x {args.seconds:g} s per row; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; {args.clients} client thread(s)")
    port = free_port()
    server = start_server(args.model, port, args.server_log)
    url = f"http://127.0.0.1:{port}"
    in_process = {batch: make_in_process_call(args.model, images, batch) for batch in BATCH_SIZES}
    best: dict[str, float] = {}  # images/s, the best of --repeats: other load on the machine only slows a row down
    try:
        for _ in range(args.repeats):  # rows interleaved, so a burst of outside load hits one repeat, not one row
            for batch in BATCH_SIZES:
                _, ips = measure_server(url, images, batch, args.clients, args.seconds)
                best[f"server_{batch}"] = max(best.get(f"server_{batch}", 0.0), ips)
                calls, elapsed = time_loop(in_process[batch], args.seconds)
                best[f"in_process_{batch}"] = max(best.get(f"in_process_{batch}", 0.0), calls * batch / elapsed)
    finally:
        server.terminate()
        server.wait(30)
    for batch in BATCH_SIZES:
        ips = best[f"server_{batch}"]
        print(f"server      batch {batch:2d}: {ips / batch:8.1f} requests/s {ips:8.1f} images/s")
    for batch in BATCH_SIZES:
        ips = best[f"in_process_{batch}"]
        print(f"in-process  batch {batch:2d}: {ips / batch:8.1f} calls/s    {ips:8.1f} images/s")
    gain = best["server_32"] / best["server_1"]
    share = best["server_32"] / best["in_process_32"]
    print(f"goal: a 32-image request gives {gain:.1f}x the images/s of single-image requests (goal >= 5x): "
          f"{'met' if gain >= 5 else 'NOT met'}")
    print(f"goal: the server reaches {share:.0%} of in-process images/s at batch 32 (goal >= 80%): "
          f"{'met' if share >= 0.8 else 'NOT met'}")
    return best


if __name__ == "__main__":
    run()
