"""Shards sized by bytes, assembled without shuffling image data through a GroupByKey.

1. `WriteTempRecords` streams each bundle's records into one temporary TFRecord file per
   split and emits a small summary (sort key, offset, length of every record).
2. `plan_shards` (pure, on the summaries only) orders each split by sort key (a hash of the
   uri, so classes are mixed and the result does not depend on bundling) and cuts it at
   record boundaries into shards of ~`--shard_mb`.
3. `CopyShard` copies each shard's records from the temporary files into its final file,
   hashing as it writes. Memory per worker is one shard, whatever the dataset's size.

Records of a fixed size (pixels, embeddings) skip the temporary files: see `fixed_size_shards`.
"""
from __future__ import annotations

import math
import typing
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from etl import stop_points
from etl.tfrecord_io import ShardFileWriter, create_binary, frame_record
from shared import layout

# Every shard but at most one per split lands within this fraction of the target size.
SIZE_TOLERANCE = 0.2


class TempFile(typing.NamedTuple):
    split: str
    path: str
    keys: np.ndarray  # uint64 sort key per record
    offsets: np.ndarray  # int64 byte offset of each framed record
    lengths: np.ndarray  # int64 framed length of each record (payload + 16)


class ShardRecipe(typing.NamedTuple):
    split: str
    index: int
    count: int
    pieces: list  # (temp path, offset, length), in the order the records are written


class WriteTempRecords(beam.DoFn):
    """Encoded records -> temporary files (one per bundle and split) -> TempFile summaries."""

    def __init__(self, temp_dir: str):
        self._temp_dir = temp_dir

    def start_bundle(self):
        self._open = {}

    def process(self, record):
        state = self._open.get(record.split)
        if state is None:
            path = layout.join(self._temp_dir, f"{record.split}-{uuid.uuid4().hex}.part")
            state = self._open[record.split] = {"file": create_binary(path), "path": path, "pos": 0,
                                                "keys": [], "offsets": [], "lengths": []}
        framed = frame_record(record.serialized)
        state["file"].write(framed)
        state["keys"].append(record.sort_key)
        state["offsets"].append(state["pos"])
        state["lengths"].append(len(framed))
        state["pos"] += len(framed)

    def finish_bundle(self):
        for split, state in self._open.items():
            state["file"].close()
            yield GlobalWindows.windowed_value(TempFile(
                split, state["path"], np.array(state["keys"], dtype=np.uint64),
                np.array(state["offsets"], dtype=np.int64), np.array(state["lengths"], dtype=np.int64)))
        self._open = {}


def shard_boundaries(total_bytes: int, target_bytes: int, min_shards: int, num_records: int) -> list[float]:
    """Byte positions (cumulative, excluding 0) at which to end each shard.

    Equal shards when some count puts them all within the tolerance; otherwise full shards
    of the target plus one remainder (only when total/target is in (1.2, 1.6)); at least
    `min_shards` equal shards (smaller than the target when the floor decides), never more
    shards than records, so that no shard is empty.
    """
    if num_records == 0:
        return []
    ratio = total_bytes / target_bytes
    low, high = 1 - SIZE_TOLERANCE, 1 + SIZE_TOLERANCE
    if ratio <= high:
        count = 1
    else:
        fitting = [n for n in range(math.ceil(ratio / high), math.floor(ratio / low) + 1) if n >= 1]
        count = min(fitting, key=lambda n: abs(math.log(ratio / n))) if fitting else None
    if count is None and min_shards <= math.ceil(ratio) and math.floor(ratio) < num_records:
        full = math.floor(ratio)
        return [float(target_bytes * (k + 1)) for k in range(full)] + [float(total_bytes)]
    count = min(max(count or 1, min_shards), num_records)
    return [total_bytes * (k + 1) / count for k in range(count)]


def cut_in_order(lengths: np.ndarray, target_bytes: int, min_shards: int) -> list[int]:
    """The end (exclusive) of each shard over records in their final order, cut at the record end
    nearest each of `shard_boundaries`; every shard gets at least one record."""
    if lengths.size == 0:
        return []
    cumulative = np.cumsum(lengths)
    bounds = shard_boundaries(int(cumulative[-1]), target_bytes, min_shards, lengths.size)
    ends, previous = [], 0
    for i, bound in enumerate(bounds):
        end = int(np.searchsorted(cumulative, bound, side="left"))
        if end < lengths.size and end > 0 and abs(cumulative[end - 1] - bound) <= abs(cumulative[end] - bound):
            cut = end
        else:
            cut = end + 1
        remaining_shards = len(bounds) - i - 1
        cut = max(previous + 1, min(cut, lengths.size - remaining_shards))
        if i == len(bounds) - 1:
            cut = lengths.size
        ends.append(cut)
        previous = cut
    return ends


def sizes_keep_promise(sizes: list[int], target_bytes: int, min_shards: int, num_records: int) -> bool:
    """Whether shards of these sizes keep the planner's promise: none empty, at least `min_shards`
    (or one per record), and all but at most one within SIZE_TOLERANCE of the target, or of the
    equal share when `min_shards` makes the shards smaller than the target."""
    if not sizes:
        return num_records == 0
    count, total = len(sizes), sum(sizes)
    if min(sizes) <= 0 or count < min(min_shards, num_records):
        return False
    low, high = 1 - SIZE_TOLERANCE, 1 + SIZE_TOLERANCE
    reference = total / count if count <= min_shards and total / count < low * target_bytes else target_bytes
    return sum(not low * reference <= size <= high * reference for size in sizes) <= 1


def plan_split(split: str, files: list[TempFile], target_bytes: int, min_shards: int) -> list[ShardRecipe]:
    """The shards of one split: records in sort-key order, cut at the record nearest each boundary."""
    keys = np.concatenate([f.keys for f in files]) if files else np.zeros(0, np.uint64)
    if keys.size == 0:
        return []
    file_index = np.concatenate([np.full(f.keys.size, i, dtype=np.int64) for i, f in enumerate(files)])
    offsets = np.concatenate([f.offsets for f in files])
    lengths = np.concatenate([f.lengths for f in files])
    order = np.lexsort((offsets, file_index, keys))  # by key; ties (never, in practice) stay stable
    ends = cut_in_order(lengths[order], target_bytes, min_shards)
    recipes, start = [], 0
    for index, end in enumerate(ends):
        rows = order[start:end]
        pieces = [(files[file_index[r]].path, int(offsets[r]), int(lengths[r])) for r in rows]
        recipes.append(ShardRecipe(split, index, len(ends), pieces))
        start = end
    return recipes


def plan_shards(temp_files: list[TempFile], target_bytes: int, min_shards: int) -> list[ShardRecipe]:
    by_split: dict[str, list[TempFile]] = {}
    for f in sorted(temp_files, key=lambda f: f.path):
        by_split.setdefault(f.split, []).append(f)
    recipes = []
    for split in layout.SPLITS:
        recipes.extend(plan_split(split, by_split.get(split, []), target_bytes, min_shards))
    return recipes


class CopyShard(beam.DoFn):
    """ShardRecipe -> its shard file (named with the run's generation) in `shard_dir` -> its stats
    for the sidecar, with `staged`, where `publish` moves it from."""

    def __init__(self, shard_dir: str, generation: str):
        self._shard_dir = shard_dir
        self._generation = generation

    def process(self, recipe: ShardRecipe):
        records: list = [None] * len(recipe.pieces)
        by_file: dict[str, list] = {}
        for position, (path, offset, length) in enumerate(recipe.pieces):
            by_file.setdefault(path, []).append((offset, length, position))
        for path, wanted in by_file.items():
            # Forward-only reads in offset order: one sequential pass over each temporary file.
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                for offset, length, position in sorted(wanted):
                    f.seek(offset)
                    records[position] = f.read(length)
                    if len(records[position]) != length:
                        raise IOError(f"{path}: expected {length} bytes at offset {offset}, "
                                      f"got {len(records[position])} (temporary file truncated)")
        name = layout.shard_file_name(recipe.split, recipe.index, recipe.count, self._generation)
        writer = ShardFileWriter(layout.join(self._shard_dir, name))
        for record in records:
            writer.write([record])
        size, sha256, _ = writer.close()
        stop_points.reached("write-shard")
        yield {"split": recipe.split, "index": recipe.index, "file": name, "num_examples": len(records),
               "num_bytes": size, "sha256": sha256, "staged": writer.path}
