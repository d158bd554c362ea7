"""`python -m trainer.bench_ingest --data DIR`: the book's tables 7-1 to 7-4 on your own records.

Each input pipeline is timed (process CPU seconds, all threads, and wall seconds; the loop as
the fastest of --repeats runs, the rows taking turns) twice: looping through the data with a
little math per batch (the book's lightweight way to tune the I/O part), and training a linear
model on it. Rows, as in the book: plain; parallel map; interleave; interleave + parallel map;
+ cache; + cache + prefetch; then the trainer's own pipeline (trainer.ingest: batched parsing,
parallel decode, prefetch) at batch sizes 1/8/16/32. For the jpeg form, the peer: the same
images as a TensorFlow Datasets dataset read with TFDS's reader and decoder (trainer.bench_tfds;
`pip install '.[bench]'`); and the limit: decode+resize alone on JPEG bytes already in memory,
on all cores, with each decoder and resize TF offers (some give other pixels), the fastest
being the limit. The peer and the limits run all passes through one pipeline, as the trainer's
pipeline does; the book's rows start one iterator per pass, as the book's loop does. The trainer's
row, TFDS and the limits that give the ETL's pixels are also run on one thread, for what an image
costs each of them in CPU with no contention for the cores. Book figures (its machine): plain
7.99 s wall, interleave + parallel map 5.23 s (1.53x).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from shared import native_log

if __name__ == "__main__":
    native_log.load_tensorflow()

import tensorflow as tf
import tf_keras as keras

from shared import preprocess, schema
from trainer import bench_tfds, ingest

AUTOTUNE = tf.data.AUTOTUNE
TRAINER_BATCH_SIZES = (1, 8, 16, 32)
LIMIT_PREFIX = "limit: "
TFDS_ROW = "TFDS: its reader + decoder, then resize_image"
TFDS_DEFAULTS_ROW = "TFDS defaults: 1 shard, cached decoded"
OTHER_PIXELS = "(other pixels)"  # in the name of a limit row that does not give the ETL's pixels


def _trainer_row(batch_size: int) -> str:
    """The trainer row the summary compares: the one at --batch_size, else batch 32."""
    return f"trainer pipeline, batch {batch_size if batch_size in TRAINER_BATCH_SIZES else 32}"


@dataclasses.dataclass
class Row:
    name: str
    images: int = 0  # per loop measurement
    loop_cpu: float = float("nan")  # CPU and wall seconds of the fastest loop
    least_loop_cpu: float = float("inf")  # over all the loops
    loop_wall: float = float("nan")
    train_cpu: float = float("nan")
    train_wall: float = float("nan")
    # CPU seconds per image on one thread (least of the repeats), measured for the trainer at the
    # summary's batch size, TFDS and the limits that give the ETL's pixels; nan for the other rows.
    one_thread_cpu_per_image: float = float("nan")

    @property
    def images_per_s(self) -> float:
        return self.images / self.loop_wall

    @property
    def cpu_per_image(self) -> float:
        return self.least_loop_cpu / self.images


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def loop_through_dataset(ds: tf.data.Dataset, epochs: int) -> int:
    """The book's loop: a mean over values above a random threshold, so every batch is produced and
    used; returns the number of examples seen.

    On each image's first row only: on every 4th row and column it took 0.69 ms of CPU per 448 px
    image, half of what the trainer's pipeline spends making it, and on 2 cores the loop then held
    back the pipelines it is there to compare.
    """
    seen = 0
    for _ in range(epochs):
        threshold = float(np.random.uniform(0.3, 0.7))
        for x, _ in ds:
            sample = x[:, 0] if x.shape.rank == 4 else x
            float(tf.reduce_mean(tf.where(sample > threshold, sample, 0.0)))
            seen += int(x.shape[0])
    return seen


def train_linear_model(ds: tf.data.Dataset, epochs: int, x_shape: tuple[int, ...], num_classes: int) -> None:
    model = keras.Sequential([keras.Input(x_shape), keras.layers.Flatten(),
                              keras.layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(ds, epochs=epochs, verbose=0)


def make_book_dataset(meta, files: list[str], input_size: int | None, batch_size: int, *, interleave: bool,
                      parallel_map: bool, cache: bool = False, prefetch: bool = False,
                      one_thread: bool = False) -> tf.data.Dataset:
    """The book's per-record pipelines: read, parse and decode one record at a time, then batch.

    `one_thread` also stops each op from splitting its work over TF's intra-op threads (a resize
    to 448 px does, so the default "plain" already uses several cores)."""
    payload = meta.payload.name

    def parse_one(serialized):
        parsed = schema.parse_batch(meta.features, serialized[tf.newaxis])
        x = parsed[payload][0]
        if meta.form == "jpeg":
            x = preprocess.preprocess_image(x, input_size)
        return x, parsed["label"][0]

    ds = tf.data.TFRecordDataset(files, num_parallel_reads=AUTOTUNE if interleave else None)
    ds = ds.map(parse_one, num_parallel_calls=AUTOTUNE if parallel_map else None)
    if cache:
        ds = ds.cache()
    ds = ds.batch(batch_size)
    if one_thread:
        ds = on_one_thread(ds)
    return ds.prefetch(AUTOTUNE) if prefetch else ds


def on_one_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` with all of its work on one thread: one tf.data thread, and no op splitting its work
    over TF's intra-op threads (a resize to 448 px does)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def _resize(decode):
    return lambda image_bytes, size: preprocess.resize_image(decode(image_bytes), size, size)


def _decode_whole_crop(image_bytes):
    shape = tf.io.extract_jpeg_shape(image_bytes)
    return tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([0, 0, shape[0], shape[1]]), channels=3)


# name -> (JPEG bytes, side) -> float32 image. The first three give the ETL's pixels bit for bit (TF's
# default dct_method is already INTEGER_FAST); the others show what other pixels would buy.
LIMIT_CANDIDATES: dict[str, Callable[[tf.Tensor, int], tf.Tensor]] = {
    "preprocess_image": lambda image_bytes, size: preprocess.preprocess_image(image_bytes, size),
    "decode_jpeg + resize_image": _resize(lambda b: tf.io.decode_jpeg(b, channels=3)),
    "decode_and_crop_jpeg (whole) + resize_image": _resize(_decode_whole_crop),
    f"decode_jpeg INTEGER_ACCURATE + resize_image {OTHER_PIXELS}": _resize(
        lambda b: tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_ACCURATE")),
    f"decode_jpeg no fancy upscaling + resize_image {OTHER_PIXELS}": _resize(
        lambda b: tf.io.decode_jpeg(b, channels=3, fancy_upscaling=False)),
    f"decode_jpeg + uint8 resize, then scale {OTHER_PIXELS}": lambda image_bytes, size: tf.image.resize(
        tf.io.decode_jpeg(image_bytes, channels=3), [size, size]) * (1.0 / 255.0),
}


def make_limit_dataset(meta, files: list[str], input_size: int | None, batch_size: int,
                       prepare: Callable[[tf.Tensor, int], tf.Tensor] | None = None, passes: int = 1) -> tf.data.Dataset:
    """Decode+resize only: payloads already in memory (no reading, no parsing), decoded with `prepare`
    (default: the shared function) in a parallel map on every core, then batched; `passes` over the
    data in one pipeline. The trainer pipeline's share of this throughput is what reading and parsing
    cost it."""
    payload = meta.payload.name
    prepare = prepare or LIMIT_CANDIDATES["preprocess_image"]
    values, labels = [], []
    for batch in tf.data.TFRecordDataset(files).batch(256):
        parsed = schema.parse_batch(meta.features, batch)
        values.append(parsed[payload].numpy())
        labels.append(parsed["label"].numpy())
    ds = tf.data.Dataset.from_tensor_slices((np.concatenate(values), np.concatenate(labels))).repeat(passes)
    if meta.form == "jpeg":
        ds = ds.map(lambda b, y: (prepare(b, input_size), y), num_parallel_calls=AUTOTUNE, deterministic=False)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def make_trainer_dataset(meta, data_dir: str, split: str, input_size: int | None, batch_size: int,
                         epochs: int) -> tuple[tf.data.Dataset, int]:
    """trainer.ingest's training pipeline, cut to `epochs` passes (it repeats forever)."""
    steps = max(1, ingest.count_examples(meta, split) // batch_size) * epochs
    ds = ingest.make_train_dataset(meta, data_dir, batch_size, input_size=input_size, seed=0, split=split)
    return ds.take(steps), steps


def run_benchmark(data_dir: str, split: str = "train", batch_size: int = 32, image_size: int = 224,
                  crop_ratio: float = 0.5, epochs: int = 2, train: bool = True, log=print,
                  repeats: int = 5, tfds: bool = True) -> list[Row]:
    """Every row's loop timed `repeats` times, the rows taking turns (so a busy spell of the machine
    hits them alike), then each row's training, once. Of the limit rows only the fastest trains.
    `tfds`: add the TensorFlow Datasets rows (jpeg form; needs tensorflow_datasets)."""
    meta = ingest.load_dataset_metadata(data_dir, (split,))
    files = meta.shard_paths(data_dir, split)
    input_size = ingest.input_image_size(meta, image_size, crop_ratio)
    x_shape = tuple(meta.payload.shape) if meta.form != "jpeg" else (input_size, input_size, 3)
    num_classes = len(meta.class_names)
    log(f"{data_dir}: {meta.form} form, split {split}: {ingest.count_examples(meta, split)} records in {len(files)} "
        f"files; model input {x_shape}; {epochs} epochs per measurement")
    loop_through_dataset(make_limit_dataset(meta, files[:1], input_size, batch_size).take(2), 1)  # warm up TF

    variants: list[tuple[str, Callable[[int], tuple[tf.data.Dataset, int]]]] = []
    for name, kw in [("plain, one thread", dict(interleave=False, parallel_map=False, one_thread=True)),
                     ("plain", dict(interleave=False, parallel_map=False)),
                     ("parallel map", dict(interleave=False, parallel_map=True)),
                     ("interleave", dict(interleave=True, parallel_map=False)),
                     ("interleave + parallel map", dict(interleave=True, parallel_map=True)),
                     ("  + cache", dict(interleave=True, parallel_map=True, cache=True)),
                     ("  + cache + prefetch", dict(interleave=True, parallel_map=True, cache=True, prefetch=True))]:
        variants.append((name, lambda b, kw=kw: (make_book_dataset(meta, files, input_size, b, **kw), epochs)))
    for b in TRAINER_BATCH_SIZES:
        variants.append((f"trainer pipeline, batch {b}",
                         lambda _, b=b: (make_trainer_dataset(meta, data_dir, split, input_size, b, epochs)[0], 1)))
    with contextlib.ExitStack() as stack:
        if meta.form == "jpeg" and tfds:
            variants += _tfds_variants(meta, data_dir, split, input_size, epochs,
                                       stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tfds-")), log)
        # The peer and the limits repeat their source, so that all passes run through one pipeline, as
        # the trainer's do (it repeats its files forever). A new iterator per pass refills TFDS's
        # shuffle buffer of decoded images and restarts tf.data's tuning: TFDS took 10% longer per
        # image so (2 passes, best of 7).
        if meta.form == "jpeg":
            for name, prepare in LIMIT_CANDIDATES.items():
                variants.append((LIMIT_PREFIX + name, lambda b, prepare=prepare: (
                    make_limit_dataset(meta, files, input_size, b, prepare, passes=epochs), 1)))
        else:
            variants.append((LIMIT_PREFIX + "payloads in memory",
                             lambda b: (make_limit_dataset(meta, files, input_size, b, passes=epochs), 1)))
        log(f"load average (1/5/15 min) at start: {_load()}")
        rows = [Row(name) for name, _ in variants]
        # The fastest of `repeats`: other processes only ever add time, and on this VM (2 vCPUs) a
        # pipeline runs in one of two modes, on both cores or with one mostly idle: the same 1,908
        # images took 1.2-1.3 s or 2.56-2.57 s, the mode changing from one run to the next.
        for _ in range(repeats):
            for row, (_, make) in zip(rows, variants):
                ds, passes = make(batch_size)
                images = []
                cpu, wall = _timed(lambda: images.append(loop_through_dataset(ds, passes)))
                if not wall >= row.loop_wall:
                    row.images, row.loop_cpu, row.loop_wall = images[0], cpu, wall
                row.least_loop_cpu = min(row.least_loop_cpu, cpu)
        # Then CPU per image on one thread, for the rows the summary sets side by side: what an image
        # costs each pipeline, free of the contention for the cores and of the two modes (on this VM it
        # moves by ~5% between runs, where the loop's wall time moves by 2x).
        measured_alone = [(row, make) for row, (name, make) in zip(rows, variants)
                          if name == _trainer_row(batch_size) or name == TFDS_ROW
                          or (name.startswith(LIMIT_PREFIX) and OTHER_PIXELS not in name)]
        for _ in range(repeats):
            for row, make in measured_alone:
                ds, passes = make(batch_size)
                images = []
                cpu, _ = _timed(lambda: images.append(loop_through_dataset(on_one_thread(ds), passes)))
                if not row.one_thread_cpu_per_image <= cpu / images[0]:
                    row.one_thread_cpu_per_image = cpu / images[0]
        fastest_limit = max((r for r in rows if r.name.startswith(LIMIT_PREFIX)), key=lambda r: r.images_per_s)
        for row, (name, make) in zip(rows, variants):
            if train and (not name.startswith(LIMIT_PREFIX) or row is fastest_limit):
                ds, passes = make(batch_size)
                row.train_cpu, row.train_wall = _timed(lambda: train_linear_model(ds, passes, x_shape, num_classes))
            log(f"  {name:<60} loop {row.images_per_s:5.0f} images/s {row.loop_wall:5.2f} s wall   "
                f"train {row.train_wall:6.2f} s wall")
        log(f"load average (1/5/15 min) at end: {_load()}")
    return rows


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _tfds_variants(meta, data_dir: str, split: str, input_size: int, epochs: int, folder: str,
                   log) -> list[tuple[str, Callable[[int], tuple[tf.data.Dataset, int]]]]:
    """The TFDS rows: a copy in as many shards as the ETL wrote, read as the trainer reads (every
    pass from disk); and TFDS's defaults, one shard, which it caches decoded after the first pass."""
    files = meta.shard_paths(data_dir, split)
    started = time.perf_counter()
    same_shards = bench_tfds.build_tfds_copy(meta, data_dir, split, os.path.join(folder, "shards"), len(files))
    one_shard = bench_tfds.build_tfds_copy(meta, data_dir, split, os.path.join(folder, "defaults"), None)
    log(f"TFDS copies of {split} built in {time.perf_counter() - started:.1f} s under {folder}")

    def make(builder, **kw):
        return lambda b: (bench_tfds.make_tfds_dataset(builder, split, input_size, b, ingest.SHUFFLE_BATCHES * b,
                                                       passes=epochs, **kw), 1)

    return [(TFDS_ROW, make(same_shards)),
            ("TFDS: its reader, then preprocess_image", make(same_shards, tfds_decodes=False)),
            (TFDS_DEFAULTS_ROW, make(one_shard, autocache=True))]


def format_table(rows: list[Row]) -> str:
    lines = ["| pipeline | loop images/s | loop CPU s | loop wall s | train CPU s | train wall s "
             "| CPU us per image, one thread |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        train = f"{r.train_cpu:.2f} | {r.train_wall:.2f}" if r.train_wall == r.train_wall else "- | -"
        alone = f"{r.one_thread_cpu_per_image * 1e6:,.0f}" if r.one_thread_cpu_per_image == r.one_thread_cpu_per_image else "-"
        lines.append(f"| {r.name.strip()} | {r.images_per_s:.0f} | {r.loop_cpu:.2f} | {r.loop_wall:.2f} | {train} | {alone} |")
    return "\n".join(lines)


def summarise(rows: list[Row], batch_size: int) -> str:
    """The trainer pipeline's throughput (loop images/s) against plain, TFDS and the decode+resize
    limit; for TFDS and the limit also by CPU (loop CPU seconds per image, all threads), which
    other processes on the machine disturb less than wall time."""
    by_name = {r.name.strip(): r for r in rows}
    tuned = by_name[_trainer_row(batch_size)]
    plain, one_thread = by_name["plain"], by_name["plain, one thread"]
    limits = [r for r in rows if r.name.startswith(LIMIT_PREFIX)]
    limit = max(limits, key=lambda r: r.images_per_s)
    leanest = min(limits, key=lambda r: r.cpu_per_image)

    def named(row: Row) -> str:
        return row.name[len(LIMIT_PREFIX):]

    lines = [f"trainer pipeline vs plain: {tuned.images_per_s / plain.images_per_s:.2f}x (book: 1.53x); "
             f"vs plain on one thread: {tuned.images_per_s / one_thread.images_per_s:.2f}x"]
    if TFDS_ROW in by_name:
        tfds, cached = by_name[TFDS_ROW], by_name[TFDS_DEFAULTS_ROW]
        lines.append(f"trainer pipeline vs TFDS (its reader + decoder, then the same resize): "
                     f"{tuned.images_per_s / tfds.images_per_s:.2f}x, by CPU {tfds.cpu_per_image / tuned.cpu_per_image:.2f}x"
                     f"; vs TFDS defaults (one shard, decoded images cached after the first "
                     f"pass): {tuned.images_per_s / cached.images_per_s:.2f}x, by CPU "
                     f"{cached.cpu_per_image / tuned.cpu_per_image:.2f}x")
        # The trainer must decode as the ETL and the export do, so its ceiling against TFDS is the
        # fastest and the leanest limit row that gives those pixels, with reading and parsing free.
        same = [r for r in limits if OTHER_PIXELS not in r.name]
        fastest_same, leanest_same = max(same, key=lambda r: r.images_per_s), min(same, key=lambda r: r.cpu_per_image)
        lines.append(f"ceiling against TFDS, decoding as the ETL does with reading and parsing free: "
                     f"{fastest_same.images_per_s / tfds.images_per_s:.2f}x TFDS by wall ({named(fastest_same)}), "
                     f"{tfds.cpu_per_image / leanest_same.cpu_per_image:.2f}x by CPU ({named(leanest_same)})")
    lines.append(f"trainer pipeline vs decode+resize limit ({named(limit)}, the fastest limit row): "
                 f"{100 * tuned.images_per_s / limit.images_per_s:.0f}%; by CPU, vs {named(leanest)}: "
                 f"{100 * leanest.cpu_per_image / tuned.cpu_per_image:.0f}%")
    alone = [r for r in limits if r.one_thread_cpu_per_image == r.one_thread_cpu_per_image]  # not nan
    if alone and tuned.one_thread_cpu_per_image == tuned.one_thread_cpu_per_image:
        # Decode and resize are the same work in every row here, so CPU per image on one thread shows
        # what the rest of each pipeline costs, free of the cores' contention (see run_benchmark).
        least = min(alone, key=lambda r: r.one_thread_cpu_per_image)
        trainer_us, least_us = tuned.one_thread_cpu_per_image * 1e6, least.one_thread_cpu_per_image * 1e6
        line = (f"CPU per image on one thread: trainer pipeline {trainer_us:,.0f} us; decode+resize alone as the ETL "
                f"decodes ({named(least)}) {least_us:,.0f} us, so the rest of its pipeline (reading, shuffling, parsing) is "
                f"{100 * (1 - least_us / trainer_us):.0f}% of the trainer's")
        if TFDS_ROW in by_name and by_name[TFDS_ROW].one_thread_cpu_per_image == by_name[TFDS_ROW].one_thread_cpu_per_image:
            tfds_us = by_name[TFDS_ROW].one_thread_cpu_per_image * 1e6
            line += (f"; TFDS {tfds_us:,.0f} us: the trainer at {tfds_us / trainer_us:.2f}x TFDS, and at most "
                     f"{tfds_us / least_us:.2f}x however little the rest cost")
        lines.append(line)
    lines.append(f"plain vs decode+resize limit: {100 * plain.images_per_s / limit.images_per_s:.0f}% "
                 "(TF's ops can already spread one image over the cores; the closer to 100%, the less tf.data can win)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.bench_ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--data", required=True, help="ETL output folder (holds metadata.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=224, help="as trainer.train: jpeg form model size")
    p.add_argument("--crop_ratio", type=float, default=0.5, help="as trainer.train: jpeg decodes to size / ratio")
    p.add_argument("--epochs", type=int, default=2, help="passes per measurement (cache pays off from the 2nd)")
    p.add_argument("--no_train", action="store_true", help="loop only; skip the linear-model column")
    p.add_argument("--repeats", type=int, default=5, help="loop timings keep the fastest of this many runs")
    p.add_argument("--no_tfds", action="store_true", help="skip the TensorFlow Datasets rows")
    args = p.parse_args(argv)
    if not args.no_tfds and not bench_tfds.tfds_available():
        p.error("the TFDS rows need tensorflow-datasets: pip install '.[bench]', or pass --no_tfds")
    rows = run_benchmark(args.data, args.split, args.batch_size, args.image_size, args.crop_ratio, args.epochs,
                         train=not args.no_train, log=lambda s: print(s, file=sys.stderr), repeats=args.repeats,
                         tfds=not args.no_tfds)
    print(format_table(rows))
    print(summarise(rows, args.batch_size))
    print(f"load average (1/5/15 min) after the run: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
