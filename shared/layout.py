"""File names inside a dataset folder, defined once for the writer and the reader."""
from __future__ import annotations

import re

METADATA_FILE = "metadata.json"  # written last: its presence means the dataset is complete
REJECTS_FILE = "rejects.jsonl"
SPLITS = ("train", "valid", "test")
SHARD_SUFFIX = ".tfrecord"

_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


def shard_file_name(split: str, index: int, count: int) -> str:
    """`train-00000-of-00004.tfrecord`: the form Beam and TFDS use."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def parse_shard_file_name(name: str) -> tuple[str, int, int] | None:
    """(split, index, count) for a shard file name, or None for anything else."""
    m = _SHARD_RE.match(name)
    return (m["split"], int(m["index"]), int(m["count"])) if m else None


def join(folder: str, name: str) -> str:
    """Joins with '/', which both local paths and gs:// URIs accept."""
    return folder.rstrip("/") + "/" + name
