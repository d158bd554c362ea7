"""`--pattern`: a run on the shards whose file names match, as the book's smoke test does
(`--pattern '-00000-*'` trains on one shard of each split).

The book globbed `<split>` + pattern; here the pattern is matched with fnmatch against each
shard's file name as the sidecar lists it, with a `*` in front, so `-00000-*` matches
`train-00000-of-00004.tfrecord` whatever comes before the index. The selection is a sidecar of
its own: counts, steps per epoch and virtual epochs follow the matched shards.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import posixpath

from shared import layout, metadata


def matches(file_name: str, pattern: str) -> bool:
    """True when the shard's file name (its last path part) matches `*pattern`, case-sensitively."""
    return fnmatch.fnmatchcase(posixpath.basename(file_name), "*" + pattern)


def select_shards(meta: metadata.DatasetMetadata, pattern: str, data_dir: str) -> metadata.DatasetMetadata:
    """The sidecar restricted to the shards matching `pattern` ("" keeps all); DatasetError when no
    shard of train or of valid matches (training and early stopping need both)."""
    if not pattern:
        return meta
    splits = {}
    for name, split in meta.splits.items():
        shards = tuple(s for s in split.shards if matches(s.file, pattern))
        splits[name] = metadata.SplitInfo(sum(s.num_examples for s in shards), shards)
    for name in ("train", "valid"):
        if not splits.get(name) or not splits[name].num_examples:
            listed = [s.file for s in meta.splits[name].shards] if name in meta.splits else []
            raise metadata.DatasetError(
                f"--pattern {pattern!r} matches no {name} shard with examples in "
                f"{layout.join(data_dir, layout.METADATA_FILE)} (it lists {listed[:4]}"
                f"{' ...' if len(listed) > 4 else ''}); the pattern is matched against '*PATTERN', e.g. '-00000-*'")
    return dataclasses.replace(meta, splits=splits)


def describe(meta: metadata.DatasetMetadata) -> dict:
    """{split: [matched shard count, examples]}, for the run's config.json."""
    return {name: [len(split.shards), split.num_examples] for name, split in meta.splits.items()}
