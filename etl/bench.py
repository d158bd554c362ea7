"""`make bench-etl`: ETL throughput and peak memory, beside this machine's limit and the book's way.

Corpus: photo-like JPEGs (~300x400 px, ~25 KB) cut from the photographs scikit-image ships
(no download). Per form and worker count, the ETL runs as its own process (`python -m etl`),
so peak memory is that of the whole process tree. Images/s is reported end to end and as the
steady rate: (N - N/4) / (run() time for N - run() time for N/4), which removes the fixed
costs (imports, Beam set-up and publishing, whatever the input size). The start-up column is
the seconds from starting the process to the first record written (imports, flag and folder
checks, building and staging the pipeline, reading the CSV, TensorFlow's import in the steps),
and its share of the wall time. In the same
run: the decode+resize limit (tf.data, all cores, the shared preprocessing function), the book's
per-element eager way (`FloatList` from the tensor), and the disk's one-write limit (one
sequential write with fsync, over the record size), for the ratios. Pixels and embeddings run
twice: written once (the default) and on the staged path that jpeg takes (each record written
twice), for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
from PIL import Image

from shared import native_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Quality 88 puts these 300x400 crops at ~25 KB, a typical web photo of that size.
QUALITY = 88
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def write_corpus(folder: str, count: int, seed: int = 0) -> list[str]:
    """`count` JPEGs of 300x400 (landscape) or 400x300, random crops/zooms/flips of skimage's photos."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        crop = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        size = (400, 300) if i % 2 else (300, 400)
        image = Image.fromarray(photo[top:top + crop, left:left + crop]).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        label = PHOTOS[i % len(PHOTOS)]
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        path = os.path.join(folder, label, f"{i:05d}.jpg")
        image.save(path, format="JPEG", quality=QUALITY)
        paths.append(path)
    return paths


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Beam's workers)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in tree:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended since it was listed
            pass
    return total


# Runs the ETL in a fresh process; prints the seconds `run()` took (imports excluded) and the
# wall-clock time of the first record written.
_TIMED_RUN = ("import json, sys, time; from etl import pipeline, progress; t = time.perf_counter(); "
              "pipeline.run(sys.argv[1:]); print(json.dumps({'run': time.perf_counter() - t, "
              "'first_record_at': progress.TALLY.first_time(progress.RECORDS)}))")


# The same, with pixels and embeddings taking the staged path (written twice, as jpeg is), for comparison.
_TIMED_STAGED_RUN = "from etl import fixed_size_shards; fixed_size_shards.FORMS = (); " + _TIMED_RUN
WRITES = {"once": 1, "staged": 2}  # times each record's bytes are written, by path


def run_measured(argv: list[str], path: str = "once") -> tuple[float, float, int, float]:
    """(wall seconds of the process, seconds inside the ETL's run(), peak tree RSS bytes, seconds from
    starting the process to the first record written) of one ETL run in its own process, sampling memory
    every 50 ms. `path` "staged" makes fixed-size records take the two-write path."""
    start, started_at = time.perf_counter(), time.time()
    code = _TIMED_STAGED_RUN if path == "staged" else _TIMED_RUN
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"etl {' '.join(argv)} failed:\n{stderr.decode()[-2000:]}")
    timed = json.loads(stdout.decode().splitlines()[-1])
    return time.perf_counter() - start, timed["run"], peak, timed["first_record_at"] - started_at


def etl_argv(input_dir, output, form, workers, image_size, module):
    cmd = ["--input", input_dir, "--output", output, "--form", form,
           "--image_size", str(image_size), "--overwrite", "--direct_num_workers", str(workers)]
    if workers > 1:
        # Threads in one process: TF and file reads release the GIL, and 'multi_processing'
        # costs a TF import (~0.5 GB, ~10 s) per worker on a 2-core machine (measured).
        cmd += ["--direct_running_mode", "multi_threading"]
    if module:
        cmd += ["--embedding_module", module]
    return cmd


def decode_resize_limit(paths: list[str], size: int) -> float:
    """Images/s of read + decode + resize in tf.data with all cores: the ceiling for the ETL."""
    import tensorflow as tf

    from shared import preprocess

    ds = (tf.data.Dataset.from_tensor_slices(paths)
          .map(lambda p: preprocess.preprocess_image(tf.io.read_file(p), size), num_parallel_calls=tf.data.AUTOTUNE)
          .batch(32).prefetch(tf.data.AUTOTUNE))
    for _ in ds.take(2):  # warm up the graph
        pass
    start = time.perf_counter()
    n = sum(int(batch.shape[0]) for batch in ds)
    return n / (time.perf_counter() - start)


def book_baseline(paths: list[str], size: int) -> float:
    """Images/s the book's way: eager TF per element, then a FloatList built from the tensor."""
    import tensorflow as tf

    start = time.perf_counter()
    for path in paths:
        img = tf.io.read_file(path)
        img = tf.image.decode_jpeg(img, channels=3)
        img = tf.image.convert_image_dtype(img, tf.float32)
        img = tf.image.resize(img, [size, size])
        feature = tf.train.Feature(float_list=tf.train.FloatList(value=tf.reshape(img, [-1]).numpy()))
        tf.train.Example(features=tf.train.Features(feature={"image": feature})).SerializeToString()
    return len(paths) / (time.perf_counter() - start)


def disk_write_limit(folder: str, megabytes: int = 1024) -> float:
    """Bytes/s of one sequential write, fsync included: the ceiling for writing records."""
    path = os.path.join(folder, "disk-probe.bin")
    chunk = os.urandom(8 * 2 ** 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(megabytes // 8):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return megabytes * 2 ** 20 / seconds


def mean_record_bytes(out_dir: str) -> float:
    import json

    with open(os.path.join(out_dir, "metadata.json")) as f:
        splits = json.load(f)["splits"].values()
    return sum(sh["num_bytes"] for s in splits for sh in s["shards"]) / max(1, sum(s["num_examples"] for s in splits))


def build_default_sized_module(folder: str) -> str:
    """MobileNetV2 at 224 px with random weights: the default module's cost, without a download."""
    from etl.embeddings import save_random_mobilenet

    return save_random_mobilenet(os.path.join(folder, "mobilenet_v2_224"), size=224)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m etl.bench", description=__doc__, allow_abbrev=False)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--forms", default="jpeg,pixels,embeddings")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--paths", default="once,staged",
                        help="for pixels and embeddings: written once, and/or staged and copied as jpeg is")
    args = parser.parse_args(argv)
    native_log.load_tensorflow()  # also sets TF_CPP_MIN_LOG_LEVEL for the runs
    from etl import fixed_size_shards  # Beam: not for `write_corpus` alone (make bench-ingest)

    work = tempfile.mkdtemp(prefix="bench-etl-")
    corpus, small = os.path.join(work, "corpus"), os.path.join(work, "small")
    paths = write_corpus(corpus, args.images)
    write_corpus(small, len(paths) // 4, seed=1)
    n_small = len(paths) // 4
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    print(f"corpus: {len(paths)} JPEGs, 300x400 or 400x300, mean {mean_kb:.1f} KB; {os.cpu_count()} cores")
    limit = decode_resize_limit(paths, args.image_size)
    baseline = book_baseline(paths[:60], args.image_size)
    print(f"decode+resize limit (tf.data, all cores, {args.image_size} px): {limit:8.1f} images/s")
    print(f"book's way (eager per element, FloatList):      {baseline:8.1f} images/s")
    disk = disk_write_limit(work)
    print(f"disk, one sequential write with fsync:          {disk / 2 ** 20:8.1f} MB/s (the one-write limit is this "
          "rate over the record size; measured again before each row's run, for that row)")
    forms = args.forms.split(",")
    module = build_default_sized_module(work) if "embeddings" in forms else None
    print("\n| form | shards | workers | wall s | start-up s (share) | images/s end to end | steady images/s | "
          "vs decode limit | record KB | disk MB/s | I/O limit images/s | vs one-write disk limit | vs min(limits) | "
          "vs book | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for form in forms:
        for workers in [int(w) for w in args.workers.split(",")]:
            shares = {}
            for path in (args.paths.split(",") if form in fixed_size_shards.FORMS else ["staged"]):
                out = os.path.join(work, f"out-{form}-{workers}-{path}")
                _, fixed, _, _ = run_measured(etl_argv(small, out + "-small", form, workers, args.image_size, module),
                                              path)
                disk = disk_write_limit(work)  # the disk is shared: its rate right before this run
                wall, inside, peak, start_up = run_measured(
                    etl_argv(corpus, out, form, workers, args.image_size, module), path)
                steady = (len(paths) - n_small) / max(inside - fixed, 1e-6)
                record = mean_record_bytes(out)
                io_limit = disk / (WRITES[path] * record)
                shares[path] = (steady, steady * record / disk)
                label = "written once" if path == "once" else "staged, copied"
                print(f"| {form} | {label} | {workers} | {wall:.1f} | {start_up:.1f} ({start_up / wall:.0%}) | "
                      f"{len(paths) / wall:.1f} | {steady:.1f} | {steady / limit:.0%} | {record / 1024:.1f} | "
                      f"{disk / 2 ** 20:.0f} | {io_limit:.0f} | {steady * record / disk:.0%} | {steady / min(limit, io_limit):.0%} | "
                      f"{steady / baseline:.0f}x | {peak / 2 ** 30:.2f} GB |", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(out + "-small", ignore_errors=True)
            if "once" in shares:
                line = (f"{form} at {args.image_size} px, {workers} worker(s): written once {shares['once'][0]:.0f} "
                        f"images/s = {shares['once'][1]:.0%} of the one-write disk limit")
                if "staged" in shares:
                    line += (f"; staged and copied (two writes) {shares['staged'][0]:.0f} images/s = "
                             f"{shares['staged'][1]:.0%}")
                summary.append(line)
    print("\n" + "\n".join(summary))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
