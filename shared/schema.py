"""The record schema: one definition drives the Beam writer and the tf.data reader.

A dataset's features are a tuple of `Feature`s made by `record_features(form, ...)`.
The ETL encodes with `encode_example`, the trainer parses with `parse_batch`, and the
sidecar stores the same tuple (`features_to_json`), so the reader never retypes a key.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

# Bump when a change would make an old reader misread new records (or the reverse).
SCHEMA_VERSION = 1

FORMS = ("jpeg", "pixels", "embeddings")
CHANNELS = 3

# How a feature is stored inside tf.train.Example.
#   int64: Int64List of one value; utf8: BytesList of one UTF-8 string;
#   jpeg: BytesList of one RGB JPEG; float32_le: BytesList of one little-endian float32 buffer.
# Raw float32 bytes, not FloatList: a 224x224x3 FloatList serialised at 18 records/s, the
# same floats as bytes at 508 records/s, and both parse at ~2,000/s (measured for issue 2).
ENCODINGS = ("int64", "utf8", "jpeg", "float32_le")


class SchemaError(ValueError):
    """A record or a sidecar does not match the schema; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    dtype: str  # dtype of the decoded value: "int64", "string" or "float32"
    shape: tuple[int, ...]  # shape of the decoded value per example; () for a scalar
    encoding: str  # one of ENCODINGS
    description: str = ""

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise SchemaError(f"feature {self.name!r}: unknown encoding {self.encoding!r}; known: {ENCODINGS}")


COMMON_FEATURES = (
    Feature("label", "int64", (), "int64", "index into the sidecar's class_names"),
    Feature("label_name", "string", (), "utf8", "the class name as given in the input"),
    Feature("uri", "string", (), "utf8", "where the source image was read from"),
    Feature("example_id", "string", (), "utf8", "stable id: a hash of the uri"),
    Feature("height", "int64", (), "int64", "height of the source image in pixels"),
    Feature("width", "int64", (), "int64", "width of the source image in pixels"),
)


def record_features(form: str, image_size: int | None = None, embedding_size: int | None = None) -> tuple[Feature, ...]:
    """The features of a record of `form`; `image_size` for pixels, `embedding_size` for embeddings."""
    if form == "jpeg":
        payload = Feature("image", "string", (), "jpeg", "RGB JPEG bytes")
    elif form == "pixels":
        if not image_size or image_size <= 0:
            raise SchemaError(f"form 'pixels' needs a positive image_size, got {image_size!r}")
        payload = Feature("image", "float32", (image_size, image_size, CHANNELS), "float32_le",
                          "RGB in [0, 1], resized, row-major HWC")
    elif form == "embeddings":
        if not embedding_size or embedding_size <= 0:
            raise SchemaError(f"form 'embeddings' needs a positive embedding_size, got {embedding_size!r}")
        payload = Feature("embedding", "float32", (embedding_size,), "float32_le", "feature vector of the module")
    else:
        raise SchemaError(f"unknown form {form!r}; choose one of {FORMS}")
    return (payload,) + COMMON_FEATURES


def payload_feature(features: Sequence[Feature]) -> Feature:
    """The feature holding the image or embedding (the first one, by construction)."""
    return features[0]


_ONE_BYTE = [bytes([n]) for n in range(0x80)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    value &= (1 << 64) - 1  # a negative int64 is its two's complement, 10 bytes, as protobuf writes it
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_head(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + _varint(length)


def _feature_value(f: Feature, value) -> list[bytes]:
    """A `tf.train.Feature` message as byte strings; a bytes value is one of them, not copied."""
    if f.encoding == "int64":
        number = int(value)
        if not -2 ** 63 <= number < 2 ** 63:
            raise ValueError(f"{number} does not fit in int64")
        packed = _varint(number)
        int64_list = _field_head(1, len(packed)) + packed  # Int64List.value, packed
        return [_field_head(3, len(int64_list)) + int64_list]  # Feature.int64_list = 3
    if f.encoding == "utf8":
        data = str(value).encode("utf-8")
    elif f.encoding == "jpeg":
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"expected bytes, got {type(value).__name__}")
        data = bytes(value)
    else:  # float32_le: raw little-endian floats, given as an array or as its bytes
        expected = math.prod(f.shape)
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
            if len(data) != 4 * expected:
                raise ValueError(f"expected {4 * expected} bytes for shape {f.shape}, got {len(data)}")
        else:
            array = np.asarray(value, dtype="<f4")
            if array.size != expected:
                raise ValueError(f"expected {expected} floats for shape {f.shape}, got {array.size}")
            data = array.tobytes()
    bytes_list_head = _field_head(1, len(data))  # BytesList.value
    return [_field_head(1, len(bytes_list_head) + len(data)) + bytes_list_head, data]  # Feature.bytes_list = 1


def example_pieces(features: Sequence[Feature], values: Mapping[str, Any]) -> list[bytes]:
    """One record as byte strings whose concatenation is the serialised `tf.train.Example`; the
    payload is one of them, not copied, so a writer hashes and writes it as it is.

    Written by hand (the format is three nested length-prefixed messages) with the map entries
    sorted by name: the same bytes on every protobuf version and backend, which the shards' sha256
    in the sidecar relies on. Raises SchemaError naming the field that does not fit."""
    entries = []
    for f in sorted(features, key=lambda f: f.name.encode("utf-8")):
        if f.name not in values:
            raise SchemaError(f"record is missing feature {f.name!r} (has {sorted(values)})")
        try:
            feature = _feature_value(f, values[f.name])
        except (TypeError, ValueError) as e:
            raise SchemaError(f"feature {f.name!r} ({f.encoding}): {e}") from e
        key = f.name.encode("utf-8")
        feature_length = sum(len(p) for p in feature)
        entry_head = _field_head(1, len(key)) + key + _field_head(2, feature_length)  # MapEntry key = 1, value = 2
        entries.append([_field_head(1, len(entry_head) + feature_length) + entry_head, *feature])  # Features.feature
    features_length = sum(len(p) for entry in entries for p in entry)
    pieces = [_field_head(1, features_length)]  # Example.features = 1
    for entry in entries:
        for piece in entry:
            if len(piece) < 4096 and len(pieces[-1]) < 4096:
                pieces[-1] += piece  # small pieces joined; a payload stays its own object
            else:
                pieces.append(piece)
    return pieces


def encode_example(features: Sequence[Feature], values: Mapping[str, Any]) -> bytes:
    """Serialises one record (a `tf.train.Example`); raises SchemaError naming the field that does not fit."""
    return b"".join(example_pieces(features, values))


def parse_batch(features: Sequence[Feature], serialized):
    """Parses a 1-D string tensor of records into a dict of batched tensors (in-graph).

    jpeg stays as encoded bytes (decode with shared.preprocess); float32_le is decoded and
    reshaped to [batch, *shape]. A record of the wrong length fails with the feature's name.
    """
    import tensorflow as tf

    spec = {f.name: tf.io.FixedLenFeature([], tf.int64 if f.encoding == "int64" else tf.string) for f in features}
    parsed = tf.io.parse_example(serialized, spec)
    out = {}
    for f in features:
        value = parsed[f.name]
        if f.encoding == "float32_le":
            flat = tf.io.decode_raw(value, tf.float32, little_endian=True)
            expected = math.prod(f.shape)
            tf.debugging.assert_equal(tf.shape(flat)[-1], expected,
                                      message=f"feature {f.name!r}: stored length does not match shape {f.shape}")
            value = tf.reshape(flat, [-1, *f.shape])
        out[f.name] = value
    return out


def decode_example(features: Sequence[Feature], serialized: bytes) -> dict[str, Any]:
    """Decodes one record to Python/numpy values, without a TF graph (for tests and tools)."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    out = {}
    for f in features:
        if f.name not in example.features.feature:
            raise SchemaError(f"record has no feature {f.name!r}")
        feature = example.features.feature[f.name]
        if f.encoding == "int64":
            out[f.name] = int(feature.int64_list.value[0])
        elif f.encoding == "utf8":
            out[f.name] = feature.bytes_list.value[0].decode("utf-8")
        elif f.encoding == "jpeg":
            out[f.name] = feature.bytes_list.value[0]
        else:
            out[f.name] = np.frombuffer(feature.bytes_list.value[0], dtype="<f4").reshape(f.shape)
    return out


def features_to_json(features: Sequence[Feature]) -> list[dict]:
    return [dataclasses.asdict(f) | {"shape": list(f.shape)} for f in features]


def features_from_json(items: Sequence[Mapping[str, Any]]) -> tuple[Feature, ...]:
    try:
        return tuple(Feature(i["name"], i["dtype"], tuple(i["shape"]), i["encoding"], i.get("description", ""))
                     for i in items)
    except (KeyError, TypeError) as e:
        raise SchemaError(f"sidecar 'features' entry is malformed: {e!r}") from e
