"""File names inside a dataset folder, defined once for the writer and the reader."""
from __future__ import annotations

import re
import typing

METADATA_FILE = "metadata.json"  # written last: its presence means the dataset is complete
REJECTS_FILE = "rejects.jsonl"
SPLITS = ("train", "valid", "test")
SHARD_SUFFIX = ".tfrecord"

_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?:(?P<generation>[0-9a-z]+)-)?(?P<index>\d{5})-of-(?P<count>\d{5})"
                       r"\.tfrecord$")


class ShardName(typing.NamedTuple):
    split: str
    index: int
    count: int
    generation: str | None  # the run that wrote it; None in names without one


def shard_file_name(split: str, index: int, count: int, generation: str | None = None) -> str:
    """`train-<generation>-00000-of-00004.tfrecord`: Beam's and TFDS's `-00000-of-00004` form after a
    prefix. The generation (the writing run's id) lets a new dataset's shards sit beside the live
    one's until its sidecar replaces the old sidecar; readers take the file names from the sidecar."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    if generation is not None and not re.fullmatch(r"[0-9a-z]+", generation):
        raise ValueError(f"shard generation {generation!r} must be lower-case letters and digits")
    prefix = f"{split}-{generation}" if generation else split
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def parse_shard_file_name(name: str) -> ShardName | None:
    """(split, index, count, generation) for a shard file name, or None for anything else."""
    m = _SHARD_RE.match(name)
    return ShardName(m["split"], int(m["index"]), int(m["count"]), m["generation"]) if m else None


def join(folder: str, name: str) -> str:
    """Joins with '/', which both local paths and gs:// URIs accept."""
    return folder.rstrip("/") + "/" + name
