"""The dataset sidecar (`metadata.json`): what is in the records and how they were made.

The ETL builds it with `DatasetMetadata.to_json`; the trainer reads it with `read_metadata`,
which refuses a missing, partial or other-version sidecar with a message that names the file.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from shared import layout, schema


class DatasetError(RuntimeError):
    """The dataset on disk does not match its sidecar (or has none). The message names the file."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    file: str  # name relative to the dataset folder
    num_examples: int
    num_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    num_examples: int
    shards: tuple[ShardInfo, ...]


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    schema_version: int
    form: str
    class_names: tuple[str, ...]
    features: tuple[schema.Feature, ...]
    preprocessing: Mapping[str, Any]
    splits: Mapping[str, SplitInfo]
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # rejected, input, versions, ...

    @property
    def payload(self) -> schema.Feature:
        return schema.payload_feature(self.features)

    def shard_paths(self, data_dir: str, split: str) -> list[str]:
        if split not in self.splits:
            raise DatasetError(f"{layout.join(data_dir, layout.METADATA_FILE)} has no split {split!r}; "
                               f"it has {sorted(self.splits)}")
        return [layout.join(data_dir, s.file) for s in self.splits[split].shards]

    def to_json(self) -> str:
        body = {
            "schema_version": self.schema_version,
            "form": self.form,
            "class_names": list(self.class_names),
            "features": schema.features_to_json(self.features),
            "preprocessing": dict(self.preprocessing),
            "splits": {name: {"num_examples": s.num_examples, "shards": [dataclasses.asdict(x) for x in s.shards]}
                       for name, s in self.splits.items()},
        }
        body.update(self.extra)
        return json.dumps(body, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def metadata_from_dict(body: Mapping[str, Any], source: str = layout.METADATA_FILE) -> DatasetMetadata:
    if not isinstance(body, Mapping):
        raise DatasetError(f"{source}: the sidecar must be a JSON object, got {type(body).__name__}")
    version = body.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise DatasetError(f"{source}: schema_version {version!r} is not the version this code reads "
                           f"({schema.SCHEMA_VERSION}); re-run the ETL with this version, or use the matching release")
    try:
        form = body["form"]
        if form not in schema.FORMS:
            raise DatasetError(f"{source}: unknown form {form!r}; known: {schema.FORMS}")
        splits = {name: SplitInfo(int(s["num_examples"]), tuple(ShardInfo(**x) for x in s["shards"]))
                  for name, s in body["splits"].items()}
        for name, split in splits.items():
            in_shards = sum(int(x.num_examples) for x in split.shards)
            if in_shards != split.num_examples:  # steps per epoch come from the split's count
                raise DatasetError(f"{source}: split {name!r} records {split.num_examples} examples but its shards "
                                   f"{in_shards}; the sidecar was edited or is from a failed ETL run")
        known = {"schema_version", "form", "class_names", "features", "preprocessing", "splits"}
        return DatasetMetadata(
            schema_version=version, form=form, class_names=tuple(body["class_names"]),
            features=schema.features_from_json(body["features"]), preprocessing=body["preprocessing"],
            splits=splits, extra={k: v for k, v in body.items() if k not in known})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{source}: malformed sidecar, {type(e).__name__}: {e}") from e


def read_metadata(data_dir: str) -> DatasetMetadata:
    """Reads and validates `<data_dir>/metadata.json` (local or gs://)."""
    import tensorflow as tf

    path = layout.join(data_dir, layout.METADATA_FILE)
    if not tf.io.gfile.exists(path):
        raise DatasetError(f"{path} does not exist: {data_dir} is not a finished ETL output "
                           f"(the ETL writes {layout.METADATA_FILE} last, after every shard is in place)")
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            body = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} is not valid JSON: {e}") from e
    return metadata_from_dict(body, source=path)


def check_shards(meta: DatasetMetadata, data_dir: str, splits: tuple[str, ...] = layout.SPLITS) -> None:
    """Every shard the sidecar lists exists with the size it records (cheap: no read)."""
    import tensorflow as tf

    for split in splits:
        if split not in meta.splits:
            continue
        for shard in meta.splits[split].shards:
            path = layout.join(data_dir, shard.file)
            if not tf.io.gfile.exists(path):
                raise DatasetError(f"{path} is listed in {layout.METADATA_FILE} but does not exist")
            size = tf.io.gfile.stat(path).length
            if size != shard.num_bytes:
                raise DatasetError(f"{path} has {size} bytes but {layout.METADATA_FILE} records {shard.num_bytes}: "
                                   f"the shard was changed or truncated after the ETL wrote it")
