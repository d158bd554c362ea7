"""Throughput and latency of `trainer.serve` against the export's own, in one run (a benchmark, not a test):

    python -m trainer.serving.bench --model runs/r1/export [--images DIR] [--seconds 2] [--repeats 5]

Starts `python -m trainer.serve` twice on free 127.0.0.1 ports, with batching on (its default) and
with --enable_batching false, and measures every row once per repeat, interleaved:
  1. requests of 1 and 32 images to the batching server, and the same images given to the export
     in-process through the server's own model call (`ExportedModel.predict`), for one caller and
     one per core, with the CPU each request costs the server, the model and the load generator;
  2. where a request's time goes (the server's Server-Timing phases);
  3. single-image requests from 1, 4 and 16 concurrent clients, batching on and off: images/s and
     p50/p99 latency.
Then it prints the ratios measured in this run: batching on against off, the server's own CPU per
32-image request against the model call's, 32-image requests against single images, the server
against in-process, and the model's call against decoding the same images alone.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from shared import native_log
from trainer.serving.bench_client import free_port, launch_server, make_server_post, wait_until_answering

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


# Per caller and row: a slow export (MobileNetV2: ~0.3 s for 32 images) fits only 4-8 calls in a 2 s
# window, too few for a stable rate, so a row runs until it has this many.
MIN_CALLS = 10


def time_loop(call, seconds: float, min_calls: int = MIN_CALLS) -> tuple[int, float]:
    """(calls, elapsed seconds) of calling `call()` repeatedly for about `seconds`, and at least `min_calls` times."""
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or calls < min_calls:
        call()
        calls += 1
    return calls, time.perf_counter() - start


def make_in_process_call(model_path: str, thread_spinning: bool):
    """Loads the export once, as the server does; returns images -> a call of `ExportedModel.predict`
    on them: the model's batched call from encoded bytes, with the tensor built from those bytes and
    the outputs converted to Python, exactly the server's `model` phase. (A tensor built once and
    reused for every call measured 0.2 ms of 8.4 faster at batch 32: fresh bytes in cache, which no
    caller with new images gets.) TensorFlow's thread pools spin or not as the server's do."""
    from trainer.serving.exported_model import disable_thread_spinning, load_exported_model

    if not thread_spinning:
        disable_thread_spinning()  # RuntimeError if this process already ran TensorFlow: pass --thread_spinning
    model = load_exported_model(model_path)
    return lambda images: (lambda: model.predict(images))


def make_decode_only_call():
    """images -> a call that only decodes them, as the export's signature does (`decode_image` in a
    tf.map_fn over the batch, from a tensor built from the bytes): the floor under the model's
    batched call, whatever the model, since every image is decoded in full before it is resized."""
    import tensorflow as tf

    from shared import preprocess

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode_all(image_bytes):
        # One pixel of each image comes out: nothing big is copied back, and the decode cannot be pruned.
        return tf.map_fn(lambda b: preprocess.decode_image(b)[0, 0, 0], image_bytes, fn_output_signature=tf.uint8)

    return lambda images: (lambda: decode_all(tf.constant(images)).numpy())


BATCHING, NO_BATCHING, IN_PROCESS, DECODE = "batching on", "batching off", "in-process", "decode"
BATCHING_CLIENTS = (1, 4, 16)  # concurrent clients of single images, batching on and off


@dataclasses.dataclass(frozen=True)
class Rate:
    calls_per_s: float
    here_cpu_ms: float  # CPU of this process per call: the model in-process, the load generator for server rows
    server_cpu_ms: float | None  # CPU of the server process per call; None in-process
    phases_ms: dict[str, float] | None = None  # server rows: median round trip and Server-Timing phases
    round_trips_ms: tuple[float, ...] = ()  # server rows: every call's


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process `pid`, or of this one."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure(make_call, callers: int, seconds: float, server_pid: int | None = None) -> Rate:
    """Calls/s of `callers` threads, each calling its own `make_call()` back to back, and the CPU
    each call cost here and in the server."""
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        calls = [make_call() for _ in range(callers)]
        for call in calls:  # connect and warm up outside the measured window
            call()
            getattr(call, "samples", []).clear()
        here, server = cpu_seconds(), cpu_seconds(server_pid) if server_pid else None
        results = list(pool.map(lambda call: time_loop(call, seconds), calls))
        here_cpu = cpu_seconds() - here
        server_cpu = cpu_seconds(server_pid) - server if server is not None else None
    total = sum(n for n, _ in results)
    samples = [sample for call in calls for sample in getattr(call, "samples", [])]
    phases = ({name: statistics.median(s[name] for s in samples if name in s) for name in samples[0]}
              if samples else None)
    return Rate(sum(n / elapsed for n, elapsed in results), here_cpu / total * 1e3,
                None if server_cpu is None else server_cpu / total * 1e3, phases,
                tuple(s["round_trip"] for s in samples))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.serving.bench", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the export folder (runs/<run>/export)")
    p.add_argument("--images", default=None, help="folder of .jpg/.png to send (default: synthetic 320x240 JPEGs)")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per row and repeat (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="rows measured this many times, interleaved; medians are printed (default: %(default)s)")
    p.add_argument("--callers", default=f"1,{os.cpu_count() or 1}",
                   help="comma-separated counts of concurrent callers for the 1- and 32-image rows, each measured "
                        "for the server (client threads) and in-process (calling threads) alike "
                        "(default: %(default)s, one and one per core)")
    p.add_argument("--batch_timeout_micros", type=int, default=None,
                   help="passed to the batching server (default: the server's)")
    p.add_argument("--thread_spinning", action="store_true",
                   help="TensorFlow's thread pools spin between calls, in the servers and in-process alike "
                        "(default: they sleep, as `trainer.serve` runs by default)")
    p.add_argument("--server_log", default=os.path.join(tempfile.gettempdir(), "bench_serve_server.log"),
                   help="the servers' logs go here, with '.batching_off' for the second (default: %(default)s)")
    args = p.parse_args(argv)
    args.callers = sorted({int(c) for c in args.callers.split(",")})
    return args


def make_rows(caller_counts: Sequence[int]) -> list[tuple[str, int, int]]:
    """(where, images per call, concurrent callers) of every row, in the order each repeat measures them."""
    rows = [(where, batch, callers) for callers in caller_counts for batch in BATCH_SIZES
            for where in (BATCHING, IN_PROCESS)] + [(DECODE, max(BATCH_SIZES), c) for c in caller_counts]
    return rows + [(where, 1, clients) for clients in BATCHING_CLIENTS for where in (BATCHING, NO_BATCHING)
                   if (where, 1, clients) not in rows]


@contextlib.contextmanager
def started_servers(args: argparse.Namespace):
    """{BATCHING: (port, process), NO_BATCHING: (port, process)}: both servers, stopped on exit."""
    flags = {BATCHING: [] if args.batch_timeout_micros is None else ["--batch_timeout_micros", str(args.batch_timeout_micros)],
             NO_BATCHING: ["--enable_batching", "false"]}
    logs = {BATCHING: args.server_log, NO_BATCHING: args.server_log + ".batching_off"}
    servers = {}
    try:
        for where in (BATCHING, NO_BATCHING):  # both start at once: TensorFlow's import is most of a start
            port = free_port()
            servers[where] = port, launch_server(args.model, port, logs[where], args.thread_spinning, flags[where])
        for where, (port, process) in servers.items():
            wait_until_answering(process, port, logs[where])
        yield servers
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(30)


def make_calls(args: argparse.Namespace, images: list[bytes], servers: dict) -> dict[tuple[str, int], object]:
    """(where, images per call) -> a factory of calls, as `measure` takes them."""
    in_process = make_in_process_call(args.model, args.thread_spinning)
    decode_only = make_decode_only_call()
    calls = {(DECODE, len(images)): lambda: decode_only(images)}
    for batch in BATCH_SIZES:
        calls[IN_PROCESS, batch] = lambda batch=batch: in_process(images[:batch])
        for where, (port, _) in servers.items():
            calls[where, batch] = make_server_post(port, images[:batch])
    answer = json.loads(calls[BATCHING, len(images)]()())
    if len(answer.get("predictions", [])) != len(images):
        raise SystemExit(f"error: the server answered {str(answer)[:300]} to {len(images)} instances")
    return calls


def measure_interleaved(rows, calls, servers, args) -> dict[tuple, list[Rate]]:
    """Every row once per repeat, back to back: this VM's speed drifts by +-20% over tens of seconds,
    so each ratio below is the median of ratios within a repeat, which mostly cancels the drift."""
    runs: dict[tuple, list[Rate]] = {}
    for _ in range(args.repeats):
        for where, batch, callers in rows:
            pid = servers[where][1].pid if where in servers else None
            runs.setdefault((where, batch, callers), []).append(measure(calls[where, batch], callers, args.seconds, pid))
    return runs


class Report:
    """Medians and paired ratios of the runs, printed as tables; every printed number lands in `results`."""

    def __init__(self, runs: dict[tuple, list[Rate]], repeats: int):
        self.runs, self.repeats, self.results = runs, repeats, {}

    def median(self, row, field: str) -> float | None:
        values = [getattr(r, field) for r in self.runs[row] if getattr(r, field) is not None]
        return statistics.median(values) if values else None

    def images_per_s(self, row) -> float:
        return self.median(row, "calls_per_s") * row[1]

    def paired(self, numerator, denominator, field: str = "calls_per_s") -> float:
        """Median over repeats of numerator's / denominator's `field`, both of the same repeat."""
        return statistics.median(getattr(self.runs[numerator][i], field) / getattr(self.runs[denominator][i], field)
                                 for i in range(self.repeats))

    def own_cpu_share(self, served, own) -> float:
        """The server's own CPU per call as a share of the model's: the median over repeats of the
        server row's CPU per call over the in-process row's of the same repeat, minus 1. Paired like
        every other ratio here; over four runs the medians of each side, taken apart, put it anywhere
        from 10% to 28%."""
        return statistics.median(s.server_cpu_ms / m.here_cpu_ms - 1 for s, m in zip(self.runs[served], self.runs[own]))

    def phase(self, row, name: str) -> float:
        return statistics.median(r.phases_ms[name] for r in self.runs[row])

    def percentile(self, row, q: float) -> float:
        return float(np.percentile([t for r in self.runs[row] for t in r.round_trips_ms], q))

def print_throughput(report: Report, caller_counts: Sequence[int]) -> None:
    def ms(value: float | None) -> str:
        return "?" if value is None else f"{value:.2f}"

    print("| callers | batch | server requests/s | server images/s | in-process calls/s | in-process images/s "
          "| server / in-process | CPU ms per call: in-process | server | load generator |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for callers in caller_counts:
        for batch in BATCH_SIZES:
            served, own = (BATCHING, batch, callers), (IN_PROCESS, batch, callers)
            share = report.paired(served, own)
            report.results.update({f"server_{batch}_{callers}": report.images_per_s(served),
                                   f"in-process_{batch}_{callers}": report.images_per_s(own),
                                   f"share_{batch}_{callers}": share})
            print(f"| {callers} | {batch} | {report.median(served, 'calls_per_s'):.1f} | {report.images_per_s(served):.1f} "
                  f"| {report.median(own, 'calls_per_s'):.1f} | {report.images_per_s(own):.1f} | {share:.0%} | "
                  f"{ms(report.median(own, 'here_cpu_ms'))} | {ms(report.median(served, 'server_cpu_ms'))} | "
                  f"{ms(report.median(served, 'here_cpu_ms'))} |")


PHASES = ("round_trip", "read", "parse", "queue", "model", "hand_offs", "outside", "in_process_call")


def print_phases(report: Report, caller_counts: Sequence[int]) -> None:
    """Where a request's time goes (medians; Server-Timing phases as the server measured them), next to
    the export's own call: what the server adds to the model is what keeps it from the in-process rate."""
    print("\n| callers | batch | round trip ms | read body | parse | wait for a model call | model | thread hand-offs, "
          "response | outside the handler: HTTP, sockets, load generator | in-process call ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for callers in caller_counts:
        for batch in BATCH_SIZES:
            row = (BATCHING, batch, callers)
            phases = {name: report.phase(row, name) for name in ("round_trip", "read", "parse", "queue", "model", "total")}
            phases["hand_offs"] = phases["total"] - phases["read"] - phases["parse"] - phases["queue"] - phases["model"]
            phases["outside"] = phases["round_trip"] - phases["total"]
            phases["in_process_call"] = callers / report.median((IN_PROCESS, batch, callers), "calls_per_s") * 1e3
            print(f"| {callers} | {batch} | " + " | ".join(f"{phases[name]:.2f}" for name in PHASES) + " |")
            report.results.update({f"{name}_ms_{batch}_{callers}": value for name, value in phases.items()})


def print_batching(report: Report) -> None:
    print("\n| clients of single images | batching | images/s | p50 ms | p99 ms | server CPU ms per image "
          "| load generator CPU ms |")
    print("|---|---|---|---|---|---|---|")
    for clients in BATCHING_CLIENTS:
        for where in (BATCHING, NO_BATCHING):
            row = (where, 1, clients)
            key = f"{where.split()[1]}_{clients}"
            report.results.update({f"images_per_s_{key}": report.images_per_s(row),
                                   f"p50_ms_{key}": report.percentile(row, 50), f"p99_ms_{key}": report.percentile(row, 99)})
            print(f"| {clients} | {where.split()[1]} | {report.images_per_s(row):.1f} | {report.percentile(row, 50):.2f} | "
                  f"{report.percentile(row, 99):.2f} | {report.median(row, 'server_cpu_ms'):.2f} | "
                  f"{report.median(row, 'here_cpu_ms'):.2f} |")


def print_ratios(report: Report, caller_counts: Sequence[int], batch_timeout_micros: int | None) -> None:
    results, most, big = report.results, max(BATCHING_CLIENTS), max(BATCH_SIZES)
    gain = report.paired((BATCHING, 1, most), (NO_BATCHING, 1, most))
    p50_added = results["p50_ms_on_1"] - results["p50_ms_off_1"]
    results.update(batching_gain=gain, p50_added_ms_1=p50_added)
    timeout = "the server's default" if batch_timeout_micros is None else f"{batch_timeout_micros} us"
    ceiling = report.paired((IN_PROCESS, big, 1), (NO_BATCHING, 1, most)) * big
    results.update(batching_ceiling=ceiling)
    print(f"\n{most} clients of single images: batching on gives {gain:.2f}x the images/s of batching off; "
          f"the model alone in-process at batch {big} gives {ceiling:.2f}x, what a server that cost nothing could")
    callers = max(caller_counts)
    one, batched = (IN_PROCESS, 1, callers), (IN_PROCESS, big, callers)
    model_gain = report.paired(batched, one) * big
    model_cpu_gain = statistics.median(a.here_cpu_ms / (b.here_cpu_ms / big)
                                       for a, b in zip(report.runs[one], report.runs[batched]))
    results.update(model_batching_gain=model_gain, model_batching_cpu_gain=model_cpu_gain)
    # CPU per image with batching on and off is (w + model at batch 1) against (w + model at batch N
    # / N), w the server's own work per request, so batching can divide it by no more than the model's
    # own ratio, however cheap the server, unless w itself shrinks with batching.
    print(f"the model alone in-process, {callers} caller(s): batch {big} takes {model_cpu_gain:.2f}x less CPU per "
          f"image than batch 1 ({model_gain:.2f}x the images/s); batching divides a server's CPU per single-image "
          f"request by less, unless it also cuts the server's own work per request")
    print(f"1 client of single images: p50 latency {results['p50_ms_on_1']:.2f} ms batching on "
          f"(--batch_timeout_micros: {timeout}), {results['p50_ms_off_1']:.2f} ms off: {p50_added:+.2f} ms")
    for callers in caller_counts:
        served, own, decoded = (BATCHING, big, callers), (IN_PROCESS, big, callers), (DECODE, big, callers)
        model_cpu, server_cpu = report.median(own, "here_cpu_ms"), report.median(served, "server_cpu_ms")
        own_share = report.own_cpu_share(served, own)
        gain_32 = report.paired(served, (BATCHING, 1, callers)) * big
        own_gain_32 = report.paired(own, (IN_PROCESS, 1, callers)) * big
        model_of_limit, server_of_limit = report.paired(own, decoded), report.paired(served, decoded)
        results.update({f"server_own_cpu_share_{callers}": own_share, f"gain_{callers}": gain_32,
                        f"own_gain_{callers}": own_gain_32, f"model_of_limit_{callers}": model_of_limit,
                        f"server_of_limit_{callers}": server_of_limit, f"decode_{big}_{callers}": report.images_per_s(decoded)})
        print(f"{callers} caller(s), CPU per {big}-image request: the server {server_cpu:.2f} ms, the model's call "
              f"in-process {model_cpu:.2f} ms (medians): the server's own {server_cpu - model_cpu:+.2f} ms; paired within "
              f"each repeat, {own_share:.1%} of the model's; the load generator {report.median(served, 'here_cpu_ms'):.2f} ms on the same cores")
        print(f"{callers} caller(s): {big}-image requests give {gain_32:.2f}x the images/s of single-image requests "
              f"(the model in-process {own_gain_32:.2f}x); the server reaches {report.paired(served, own):.1%} of "
              f"in-process images/s at {big}")
        print(f"{callers} caller(s): decoding the {big} images alone, as the model's call does, runs at "
              f"{report.images_per_s(decoded):.0f} images/s; the model's call reaches {model_of_limit:.0%} of that "
              f"and the server {server_of_limit:.0%}")


def run(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    native_log.load_tensorflow()
    count = max(BATCH_SIZES)
    images = read_images(args.images, count) if args.images else make_synthetic_jpegs(count)
    print(f"images: {args.images or 'synthetic 320x240 JPEG'}, mean {sum(map(len, images)) / len(images) / 1024:.1f} KB; "
          f"median of {args.repeats} x {args.seconds:g} s per row; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; client and servers share the machine; TensorFlow's threads "
          f"{'spin' if args.thread_spinning else 'sleep'} between calls on both sides")
    sys.stdout.flush()
    with started_servers(args) as servers:
        calls = make_calls(args, images, servers)
        runs = measure_interleaved(make_rows(args.callers), calls, servers, args)
    report = Report(runs, args.repeats)
    print_throughput(report, args.callers)
    print_phases(report, args.callers)
    print_batching(report)
    print_ratios(report, args.callers, args.batch_timeout_micros)
    return report.results


if __name__ == "__main__":
    run()
