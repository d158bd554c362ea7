"""The ingest benchmark runs on any record form and prints the book's rows, the TFDS peer and the
decode+resize limits with CPU and wall seconds.

Speed is measured by running the tool on an idle machine (its ratios, all rows in one run), not
asserted here: CI shares its 2 cores with other tests.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from shared import preprocess
from tests import trainer_fixtures as fx
from trainer import bench_ingest, bench_tfds

pytestmark = pytest.mark.slow

BOOK_AND_TRAINER_ROWS = ["plain, one thread", "plain", "parallel map", "interleave", "interleave + parallel map",
                         "+ cache", "+ cache + prefetch", "trainer pipeline, batch 1", "trainer pipeline, batch 8",
                         "trainer pipeline, batch 16", "trainer pipeline, batch 32"]
TFDS_ROWS = ["TFDS: its reader + decoder, then resize_image", "TFDS: its reader, then preprocess_image",
             "TFDS defaults: 1 shard, cached decoded"]


def test_bench_prints_every_row_with_measured_times(tmp_path, capsys):
    images = fx.make_image_files(str(tmp_path / "images"), per_class=6)
    data = str(tmp_path / "jpeg")
    meta = fx.write_dataset(data, images, "jpeg", shards_per_split={"train": 2, "valid": 1, "test": 1})
    with_tfds = bench_tfds.tfds_available()  # the bench extra; `make bench-ingest` installs it
    rows = bench_ingest.run_benchmark(data, batch_size=4, image_size=32, crop_ratio=0.5, epochs=2, log=lambda s: None,
                                      repeats=1, tfds=with_tfds)
    limits = ["limit: " + name for name in bench_ingest.LIMIT_CANDIDATES]
    assert [r.name.strip() for r in rows] == BOOK_AND_TRAINER_ROWS + (TFDS_ROWS if with_tfds else []) + limits
    train_count = meta.splits["train"].num_examples
    fastest_limit = max(rows[-len(limits):], key=lambda r: r.images_per_s)
    for r in rows:
        assert all(math.isfinite(v) and v > 0 for v in (r.loop_cpu, r.loop_wall)) and r.least_loop_cpu == r.loop_cpu, r
        # Two passes each (in one pipeline or two); the trainer's pipeline repeats forever, so the bench
        # takes whole batches of a pass.
        batch = int(r.name.rsplit(" ", 1)[1]) if r.name.startswith("trainer") else None
        assert r.images == 2 * (max(1, train_count // batch) * batch if batch else train_count), r
        trained = not r.name.startswith("limit: ") or r is fastest_limit
        assert all(math.isfinite(v) and v > 0 for v in (r.train_cpu, r.train_wall)) == trained, r
        # Measured on one thread: the summary's trainer row, TFDS, and the limits that decode as the ETL does.
        # (batch 4 is not a trainer row, so the summary and the one-thread runs take batch 32.)
        alone = (r.name == "trainer pipeline, batch 32" or r.name == TFDS_ROWS[0]
                 or (r.name.startswith("limit: ") and "(other pixels)" not in r.name))
        assert (math.isfinite(r.one_thread_cpu_per_image) and r.one_thread_cpu_per_image > 0) == alone, r
    table = bench_ingest.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| plain |" in table and "| - | - | - |" in table
    text = bench_ingest.summarise(rows, 4)
    trainer = next(r for r in rows if r.name == "trainer pipeline, batch 32")
    line = next(line for line in table.splitlines() if line.startswith("| trainer pipeline, batch 32 |"))
    assert line.endswith(f"| {trainer.one_thread_cpu_per_image * 1e6:,.0f} |"), line
    least = min((r for r in rows if r.name.startswith("limit: ") and "(other pixels)" not in r.name),
                key=lambda r: r.one_thread_cpu_per_image)
    assert (f"CPU per image on one thread: trainer pipeline {trainer.one_thread_cpu_per_image * 1e6:,.0f} us; decode+resize "
            f"alone as the ETL decodes ({least.name[len('limit: '):]}) {least.one_thread_cpu_per_image * 1e6:,.0f} us") in text
    assert "vs plain" in text and f"decode+resize limit ({fastest_limit.name[len('limit: '):]}," in text
    assert ("vs TFDS" in text) == with_tfds and "by CPU" in text
    if with_tfds:  # the ceiling counts only the rows that decode as the ETL does
        by_name = {r.name.strip(): r for r in rows}
        same = [r for r in rows[-len(limits):] if "(other pixels)" not in r.name]
        fastest = max(same, key=lambda r: r.images_per_s)
        tfds = by_name["TFDS: its reader + decoder, then resize_image"]
        assert f"{fastest.images_per_s / tfds.images_per_s:.2f}x TFDS by wall ({fastest.name[len('limit: '):]})" in text
        assert (f"the trainer at {tfds.one_thread_cpu_per_image / trainer.one_thread_cpu_per_image:.2f}x TFDS, and at "
                f"most {tfds.one_thread_cpu_per_image / least.one_thread_cpu_per_image:.2f}x") in text


def test_limit_rows_say_which_give_the_etls_pixels(tmp_path):
    # The limit rows are named for whether they decode as the ETL does: those not marked "(other
    # pixels)" must give preprocess_image's pixels bit for bit (TF's default dct_method is INTEGER_FAST).
    images = [tf.constant(open(path, "rb").read()) for path, _ in fx.make_image_files(str(tmp_path), per_class=2)]
    want = [preprocess.preprocess_image(b, 64).numpy() for b in images]
    for name, prepare in bench_ingest.LIMIT_CANDIDATES.items():
        same = [np.array_equal(prepare(b, 64).numpy(), w) for b, w in zip(images, want)]
        assert all(same) if "(other pixels)" not in name else not all(same), name
