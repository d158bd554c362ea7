"""Shards of fixed-size records (pixels, embeddings), each record written once.

A record's size follows from its row before its image is read: the payload has a fixed size,
and the other fields are the row's label, uri and id (plus two small ints). So:

1. `place_row` gives each row its split, sort key and the size of its record-to-be.
2. `plan_bounds` (pure, on 16 bytes a row: `KeysAndSizes`) orders each split by sort key and
   cuts it into shards by those sizes, as `sharding.plan_split` cuts written records: the same
   promise, decided before decoding. A shard is the key range up to its last key.
3. Rows go to their shard by key (`shard_of`, then a GroupByKey of the small rows), and
   `WriteShardOnce` (one worker per shard) loads, checks, decodes and encodes them in key order,
   streaming the records into the shard file; a writer thread hashes and writes while the next
   batch decodes. Memory per worker is a shard's rows and a batch or two of records.
4. Rejected rows leave their shard smaller. `finish_shards` keeps the written shards when
   their sizes still keep the promise (`sharding.sizes_keep_promise`); only a split that does
   not is cut again from the written records by `sharding.CopyShard` (a second write, for that
   split only). Shards that lost every row are never written.

Everything depends on the rows alone, so shard contents and sha256 are the same on any runner,
bundling and worker count.
"""
from __future__ import annotations

import array
import typing

import apache_beam as beam
import numpy as np

from etl import progress, records, sharding, stop_points
from etl.inputs import Row, rejected
from etl.tfrecord_io import FRAMING_BYTES, ShardFileWriter, frame_pieces
from shared import layout, schema

FORMS = ("pixels", "embeddings")  # records of a fixed size; `make bench-etl` empties it to time the staged path

# Height and width are unknown until the header is read: a guess that is off by a byte or two per field.
_GUESSED_SIDE = 1000


class PlacedRow(typing.NamedTuple):
    split: str
    sort_key: int
    size: int  # framed bytes of its record; 0 for a row that will be rejected for its label
    row: Row


class WrittenShard(typing.NamedTuple):
    split: str
    index: int  # of its plan; the final index skips shards that lost every row
    path: str
    keys: np.ndarray  # uint64 sort key per record
    lengths: np.ndarray  # int64 framed length per record
    num_bytes: int
    sha256: str


class RecordSize:
    """Row -> framed size of its record, for the records of `features` (payload of fixed size)."""

    def __init__(self, features):
        self._features = features
        payload = schema.payload_feature(features)
        self._payload = {payload.name: bytes(4 * int(np.prod(payload.shape)))}  # shared, never copied

    def __call__(self, row: Row, label_index: int, example_id: str) -> int:
        values = records.record_values_of(row, label_index, example_id, _GUESSED_SIDE, _GUESSED_SIDE) | self._payload
        return sum(len(p) for p in schema.example_pieces(self._features, values)) + FRAMING_BYTES


def place_row(row: Row, class_index: dict, split_weights, record_size: RecordSize) -> PlacedRow:
    split, example_id, sort_key = records.place(row, split_weights)
    label_index = class_index.get(row.label)
    size = record_size(row, label_index, example_id) if label_index is not None else 0
    return PlacedRow(split, sort_key, size, row)


class KeysAndSizes(beam.CombineFn):
    """PlacedRow -> {split: (sort keys, record sizes)} as numpy arrays: 16 bytes a row for the planner."""

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, placed: PlacedRow):
        keys, sizes = accumulator.setdefault(placed.split, (array.array("Q"), array.array("q")))
        keys.append(placed.sort_key)
        sizes.append(placed.size)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = {}
        for accumulator in accumulators:
            for split, (keys, sizes) in accumulator.items():
                all_keys, all_sizes = merged.setdefault(split, (array.array("Q"), array.array("q")))
                all_keys.extend(keys)
                all_sizes.extend(sizes)
        return merged

    def extract_output(self, accumulator):
        return {split: (np.frombuffer(keys, dtype=np.uint64), np.frombuffer(sizes, dtype=np.int64))
                for split, (keys, sizes) in accumulator.items()}


def plan_bounds(keys_and_sizes: dict, target_bytes: int, min_shards: int) -> dict:
    """{split: the last sort key of each shard}: each split in key order, cut into shards of
    ~target_bytes by the sizes of its records-to-be."""
    bounds = {}
    for split, (keys, sizes) in keys_and_sizes.items():
        order = np.argsort(keys, kind="stable")
        ends = sharding.cut_in_order(sizes[order], target_bytes, min_shards)
        bounds[split] = keys[order][np.array(ends, dtype=np.int64) - 1]
    return bounds


def shard_of(placed: PlacedRow, bounds: dict) -> tuple:
    """((split, shard index), (sort key, row)): the shard whose key range holds the row."""
    index = int(np.searchsorted(bounds[placed.split], np.uint64(placed.sort_key), side="left"))
    return (placed.split, index), (placed.sort_key, placed.row)


class WriteShardOnce(beam.DoFn):
    """((split, index), its (sort key, row)s) -> the records, written in key order into
    `<shard_dir>/<split>-<index>.tfrecord` -> a WrittenShard, and rejects (tagged `rejects`)."""

    def __init__(self, features, make_batch_fn, batch_size: int, load: records.LoadImage, shard_dir: str):
        self._features = features
        self._make_batch_fn = make_batch_fn  # called once per worker, in setup()
        self._batch_size = batch_size
        self._load = load
        self._shard_dir = shard_dir
        self._fn = None

    def setup(self):
        self._fn = self._make_batch_fn()

    def process(self, shard: tuple, class_index: dict):
        (split, index), keyed_rows = shard
        rows = [row for _, row in sorted(keyed_rows, key=lambda keyed: (keyed[0], keyed[1].uri))]
        path = layout.join(self._shard_dir, f"{split}-{index:05d}{layout.SHARD_SUFFIX}")
        writer, keys = None, []
        try:
            for start in range(0, len(rows), self._batch_size):
                loaded = []
                for row in rows[start:start + self._batch_size]:
                    for out in self._load.process(row, class_index):
                        if isinstance(out, records.Loaded):
                            loaded.append(out)
                        else:
                            yield out  # a tagged reject
                if not loaded:
                    continue
                for out in records.encode_tensor_batch(loaded, self._fn, self._features):
                    if isinstance(out, dict):
                        yield rejected(out)
                        continue
                    item, pieces = out
                    writer = writer or ShardFileWriter(path, background=True)  # no file for a shard of rejects
                    writer.write(frame_pieces(pieces))
                    keys.append(item.sort_key)
                    progress.count(progress.RECORDS)
                    progress.count(progress.RECORD_BYTES, sum(len(p) for p in pieces))
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
        if writer is None:
            return
        size, sha256, lengths = writer.close()
        stop_points.reached("write-shard")
        yield WrittenShard(split, index, path, np.array(keys, dtype=np.uint64),
                           np.array(lengths, dtype=np.int64), size, sha256)


def finish_shards(written: list[WrittenShard], target_bytes: int, min_shards: int, generation: str):
    """Written shards -> their stats for the sidecar (main output) when their split keeps the size
    promise, else recipes that cut the split again from them (tagged `recut`, for CopyShard)."""
    for split in layout.SPLITS:
        shards = sorted((w for w in written if w.split == split), key=lambda w: w.index)
        num_records = sum(w.keys.size for w in shards)
        sizes = [w.num_bytes for w in shards]
        keep = sharding.sizes_keep_promise(sizes, target_bytes, min_shards, num_records)
        if not keep:
            offsets = [np.concatenate([[0], np.cumsum(w.lengths)[:-1]]).astype(np.int64) for w in shards]
            recipes = sharding.plan_split(split, [sharding.TempFile(split, w.path, w.keys, o, w.lengths)
                                                  for w, o in zip(shards, offsets)], target_bytes, min_shards)
            # A cut that no record count can bring within the tolerance (records large against
            # --shard_mb) is already the one the written shards have: no copy then.
            keep = [len(r.pieces) for r in recipes] == [w.keys.size for w in shards]
            if not keep:
                for recipe in recipes:
                    yield beam.pvalue.TaggedOutput("recut", recipe)
                continue
        for index, w in enumerate(shards):
            yield {"split": split, "index": index, "file": layout.shard_file_name(split, index, len(shards), generation),
                   "num_examples": int(w.keys.size), "num_bytes": w.num_bytes, "sha256": w.sha256, "staged": w.path}
