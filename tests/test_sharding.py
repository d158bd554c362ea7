"""Shard planning: sizes by bytes within tolerance, every record exactly once, order independent of bundling."""
import numpy as np
import pytest

from etl import sharding


@pytest.mark.parametrize("min_shards", [1, 3])
def test_boundaries_keep_all_but_one_shard_within_tolerance(min_shards):
    target = 1000
    for total in range(50, 60_000, 37):
        bounds = sharding.shard_boundaries(total, target, min_shards, num_records=10 ** 6)
        sizes = np.diff([0.0] + bounds)
        assert bounds[-1] == pytest.approx(total)
        assert len(bounds) >= min(min_shards, 10 ** 6)
        if total / min_shards >= target * 0.8:  # the floor did not decide the size
            outside = [s for s in sizes if not 0.8 * target <= s <= 1.2 * target]
            assert len(outside) <= 1, (total, sizes)


def test_boundaries_never_exceed_the_record_count():
    assert len(sharding.shard_boundaries(10_000, 10, 1, num_records=4)) == 4
    assert sharding.shard_boundaries(0, 10, 1, num_records=0) == []


def _temp_files(rng, bundles):
    files = []
    for b, n in enumerate(bundles):
        lengths = rng.integers(500, 1500, size=n).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        keys = rng.integers(0, 2 ** 63, size=n, dtype=np.int64).astype(np.uint64)
        files.append(sharding.TempFile("train", f"/tmp/t{b}", keys, offsets, lengths))
    return files


def test_plan_covers_every_record_once_in_key_order():
    rng = np.random.default_rng(0)
    files = _temp_files(rng, [300, 5, 700, 1])
    recipes = sharding.plan_split("train", files, target_bytes=50_000, min_shards=1)
    pieces = [p for r in recipes for p in r.pieces]
    assert len(pieces) == len(set(pieces)) == 1006
    key_of = {(f.path, int(o)): int(k) for f in files for k, o in zip(f.keys, f.offsets)}
    keys = [key_of[(path, offset)] for path, offset, _ in pieces]
    assert keys == sorted(keys)
    sizes = [sum(length for _, _, length in r.pieces) for r in recipes]
    assert sum(not 40_000 <= s <= 60_000 for s in sizes) <= 1, sizes
    assert {r.count for r in recipes} == {len(recipes)} and [r.index for r in recipes] == list(range(len(recipes)))


def test_plan_does_not_depend_on_bundling():
    rng = np.random.default_rng(1)
    one = _temp_files(rng, [400])[0]
    # The same records split over three "bundles" (files) instead of one.
    parts = [sharding.TempFile("train", f"/tmp/p{i}", one.keys[s], one.offsets[s], one.lengths[s])
             for i, s in enumerate([slice(0, 100), slice(100, 250), slice(250, 400)])]
    a = sharding.plan_split("train", [one], 40_000, 1)
    b = sharding.plan_split("train", parts, 40_000, 1)
    assert [len(r.pieces) for r in a] == [len(r.pieces) for r in b]
    assert [[length for *_, length in r.pieces] for r in a] == [[length for *_, length in r.pieces] for r in b]


def test_no_shard_is_empty():
    # One 1,300-byte record with a 1,000-byte target: "one full shard plus a remainder" gave 1 and 0.
    one = sharding.TempFile("train", "/tmp/one", np.array([7], np.uint64), np.array([0]), np.array([1300]))
    recipes = sharding.plan_split("train", [one], target_bytes=1000, min_shards=1)
    assert [len(r.pieces) for r in recipes] == [1]
    assert recipes[0].count == 1
    rng = np.random.default_rng(2)
    for _ in range(300):  # few records against the target and the floor: counts from 1 to 6
        n = int(rng.integers(1, 7))
        lengths = rng.integers(100, 3000, size=n).astype(np.int64)
        file = sharding.TempFile("train", "/tmp/f", rng.integers(0, 2 ** 63, size=n).astype(np.uint64),
                                 np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        for min_shards in (1, 2, 5):
            sizes = [len(r.pieces) for r in sharding.plan_split("train", [file], 1000, min_shards)]
            assert sum(sizes) == n and min(sizes) >= 1, (lengths, min_shards, sizes)


def test_the_size_promise_is_what_the_planner_keeps():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 400))
        lengths = rng.integers(900, 1100, size=n).astype(np.int64)
        for target, min_shards in ((20_000, 1), (20_000, 4), (500_000, 3)):
            ends = sharding.cut_in_order(lengths, target, min_shards)
            sizes = np.diff([0] + [int(np.sum(lengths[:e])) for e in ends]).tolist()
            if n >= 10 * len(ends):  # records small against shards: cuts at record ends stay close to the bounds
                assert sharding.sizes_keep_promise(sizes, target, min_shards, n), (n, target, min_shards, sizes)
    assert not sharding.sizes_keep_promise([20_000, 9_000, 9_000], 20_000, 1, 60)  # two shards shrunk
    assert not sharding.sizes_keep_promise([20_000, 0], 20_000, 1, 30)  # an empty shard
    assert not sharding.sizes_keep_promise([30_000], 20_000, 2, 30)  # fewer than --min_shards
    assert sharding.sizes_keep_promise([5_000, 5_500, 4_800], 20_000, 3, 30)  # the floor decides the size
