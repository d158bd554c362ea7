"""Fixed-size records (pixels, embeddings) are planned from the rows and written once, in hash order,
with the same shards (and sha256) as the staged two-write path, on any worker count."""
import apache_beam as beam
import numpy as np
import psutil
import pytest
import tensorflow as tf

from etl import fixed_size_shards, inputs, pipeline, sharding
from shared import layout, schema
from tests import image_factory


def _placed(rng, n, split="train"):
    return [fixed_size_shards.PlacedRow(split, int(k), int(size), inputs.Row(f"/in/{split}/{i}.jpg", "a", f"{split}/{i}.jpg"))
            for i, (k, size) in enumerate(zip(rng.integers(0, 2 ** 63, n), rng.integers(3000, 3100, n)))]


def _plan(placed, target_bytes, min_shards):
    """The planner's steps as the pipeline wires them, without a runner: {(split, index): [uri in key order]}."""
    combine = fixed_size_shards.KeysAndSizes()
    halves = [combine.add_inputs(combine.create_accumulator(), part) for part in (placed[::2], placed[1::2])]
    bounds = fixed_size_shards.plan_bounds(combine.extract_output(combine.merge_accumulators(halves)),
                                           target_bytes, min_shards)
    shards = {}
    for placed_row in placed:
        key, keyed_row = fixed_size_shards.shard_of(placed_row, bounds)
        shards.setdefault(key, []).append(keyed_row)
    return {key: [row.uri for _, row in sorted(rows, key=lambda kr: kr[0])] for key, rows in sorted(shards.items())}


def test_plans_cover_every_row_once_in_key_order_and_do_not_depend_on_input_order():
    rng = np.random.default_rng(0)
    placed = _placed(rng, 500) + _placed(rng, 40, "valid")
    plans = _plan(placed, target_bytes=100_000, min_shards=1)
    assert plans == _plan([placed[i] for i in rng.permutation(len(placed))], 100_000, 1)
    by_uri = {p.row.uri: p for p in placed}
    for split in ("train", "valid"):
        split_plans = [uris for (s, _), uris in plans.items() if s == split]
        uris = [u for shard in split_plans for u in shard]
        assert len(uris) == len(set(uris)) == sum(p.split == split for p in placed)
        assert [by_uri[u].sort_key for u in uris] == sorted(by_uri[u].sort_key for u in uris)
        sizes = [sum(by_uri[u].size for u in shard) for shard in split_plans]
        assert sharding.sizes_keep_promise(sizes, 100_000, 1, len(uris)), sizes
        assert sorted(i for s, i in plans if s == split) == list(range(len(split_plans)))
    assert len([key for key in plans if key[0] == "train"]) == 15  # 500 x ~3 KB in ~100 KB shards


def _written(rng, counts, record=3000):
    shards, key = [], 0
    for index, n in enumerate(counts):
        keys = np.arange(key, key + n, dtype=np.uint64)
        key += n
        lengths = np.full(n, record, dtype=np.int64)
        shards.append(fixed_size_shards.WrittenShard("train", index, f"/staging/written/train-{index}", keys, lengths,
                                                     int(lengths.sum()), f"sha{index}"))
    return shards


def _finish(written):
    kept, recut = [], []
    for out in fixed_size_shards.finish_shards(written, 30_000, 1, "0123456789ab"):
        (recut.append(out.value) if isinstance(out, beam.pvalue.TaggedOutput) else kept.append(out))
    return kept, recut


def test_written_shards_are_kept_when_rejects_left_them_within_the_tolerance():
    rng = np.random.default_rng(1)
    # Plan 3 shards of 10 records; one lost 2 to rejects and plan 3 lost all (it was never written).
    kept, recut = _finish(_written(rng, [10, 8, 10]))
    assert recut == []
    assert [k["file"] for k in kept] == [layout.shard_file_name("train", i, 3, "0123456789ab") for i in range(3)]
    assert [k["staged"] for k in kept] == [f"/staging/written/train-{i}" for i in range(3)]
    assert [k["num_examples"] for k in kept] == [10, 8, 10]


def test_a_split_that_rejects_shrank_out_of_the_tolerance_is_cut_again_in_key_order():
    rng = np.random.default_rng(2)
    kept, recut = _finish(_written(rng, [10, 5, 4, 10]))  # two shards at half size
    assert kept == []
    sizes = [sum(length for *_, length in r.pieces) for r in recut]
    assert sharding.sizes_keep_promise(sizes, 30_000, 1, 29)
    pieces = [p for r in recut for p in r.pieces]
    order = [(path, offset) for path, offset, _ in pieces]
    expected = [(f"/staging/written/train-{i}", 3000 * j) for i, n in enumerate([10, 5, 4, 10]) for j in range(n)]
    assert order == expected  # every record once, in the key order the written shards hold


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "in"
    image_factory.write_class_folders(str(root), classes=("a", "b", "c"), per_class=12)
    return str(root)


def _bytes_written_by_this_process() -> int:
    """Bytes passed to write() by this process (all threads), as psutil reads them from the OS."""
    return psutil.Process().io_counters().write_chars


def _run(input_path, out, *flags):
    before = _bytes_written_by_this_process()
    meta = pipeline.run(["--input", input_path, "--output", str(out), "--form", "pixels", "--image_size", "48",
                         "--shard_mb", "0.25", "--split", "70,30,0", *flags])
    shards = {s: [(x.num_examples, x.num_bytes, x.sha256) for x in meta.splits[s].shards] for s in layout.SPLITS}
    return meta, shards, _bytes_written_by_this_process() - before


@pytest.mark.skipif(not hasattr(psutil.Process().io_counters(), "write_chars"),
                    reason="counts the bytes written with psutil's write_chars (Linux)")
def test_pixels_are_written_once_in_hash_order_with_the_staged_paths_bytes(tmp_path, photos, monkeypatch):
    one, shards_one, written_one = _run(photos, tmp_path / "one")
    two, shards_two, _ = _run(photos, tmp_path / "two", "--direct_num_workers", "2",
                              "--direct_running_mode", "multi_threading")
    monkeypatch.setattr(fixed_size_shards, "FORMS", ())  # the staged path, as jpeg takes
    _, shards_staged, written_staged = _run(photos, tmp_path / "staged")
    assert len(shards_one["train"]) >= 3
    assert shards_one == shards_two == shards_staged
    dataset_bytes = sum(n for split in shards_one.values() for _, n, _ in split)
    assert dataset_bytes <= written_one < 1.3 * dataset_bytes, "each record written once"
    assert written_staged >= 2 * dataset_bytes
    keys = [int(schema.decode_example(one.features, r.numpy())["example_id"][:16], 16)
            for path in one.shard_paths(str(tmp_path / "one"), "train") for r in tf.data.TFRecordDataset(path)]
    assert keys == sorted(keys) and len(keys) == one.splits["train"].num_examples


def test_rejects_that_shrink_shards_too_far_cost_a_recut_not_the_promise(tmp_path, photos, monkeypatch):
    """14 of 36+14 rows are not images: shards planned from the rows lose ~28% of their records, out
    of the tolerance, so the split is cut again; the result is the staged path's, byte for byte."""
    rows = inputs.list_class_folders(photos)
    rows = [(r.uri, r.label) for r in rows] + [(str(tmp_path / f"bad{i}.jpg"), "a") for i in range(14)]
    for i in range(14):
        (tmp_path / f"bad{i}.jpg").write_text("not a picture")
    csv_path = image_factory.write_csv(str(tmp_path / "rows.csv"), rows)
    meta, shards, _ = _run(csv_path, tmp_path / "once", "--split", "100,0,0")
    monkeypatch.setattr(fixed_size_shards, "FORMS", ())
    _, staged, _ = _run(csv_path, tmp_path / "staged", "--split", "100,0,0")
    assert meta.extra["rejected"]["count"] == 14 and meta.splits["train"].num_examples == 36
    assert shards == staged
    sizes = [n for _, n, _ in shards["train"]]
    assert sharding.sizes_keep_promise(sizes, int(0.25 * 2 ** 20), 1, 36), sizes
