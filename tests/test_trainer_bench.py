"""The ingest benchmark runs on any record form and prints the book's rows with CPU and wall seconds.

Its speed goals (>= 1.8x plain, >= 85% of the decode+resize limit) are measured by running the
tool on an idle machine, not asserted here: CI shares its 2 cores with other tests.
"""
import math

import pytest

from tests import trainer_fixtures as fx
from trainer import bench_ingest

pytestmark = pytest.mark.slow


def test_bench_prints_every_row_with_measured_times(tmp_path, capsys):
    images = fx.make_image_files(str(tmp_path / "images"), per_class=6)
    data = str(tmp_path / "jpeg")
    fx.write_dataset(data, images, "jpeg", shards_per_split={"train": 2, "valid": 1, "test": 1})
    rows = bench_ingest.run_benchmark(data, batch_size=4, image_size=32, crop_ratio=0.5, epochs=1, log=lambda s: None)
    names = [r.name.strip() for r in rows]
    assert names == ["plain, one thread", "plain", "parallel map", "interleave", "interleave + parallel map", "+ cache",
                     "+ cache + prefetch", "trainer pipeline, batch 1", "trainer pipeline, batch 8",
                     "trainer pipeline, batch 16", "trainer pipeline, batch 32", "decode+resize limit (in memory)"]
    for r in rows:
        assert all(math.isfinite(v) and v > 0 for v in (r.loop_cpu, r.loop_wall, r.train_cpu, r.train_wall)), r
    table = bench_ingest.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| plain |" in table
    text, _ = bench_ingest.summarise(rows, 4)
    assert "vs plain" in text and "decode+resize limit" in text
