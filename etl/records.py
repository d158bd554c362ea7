"""One input image -> one record of the chosen form (or a reject with its reason).

`LoadImage` reads and checks the file (size, header, full decode); the form's DoFn turns the
canonical bytes into the record's payload with the shared preprocessing function.
"""
from __future__ import annotations

import hashlib
import logging
import os
import typing

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from etl import progress
from etl.inputs import Row, make_reject, rejected
from shared import image_check, layout, schema
from shared.image_check import ImageRejected
from shared.paths import is_remote
from shared.untrusted_files import FileRefused, read_untrusted_file


class Loaded(typing.NamedTuple):
    row: Row
    label_index: int
    split: str
    example_id: str
    sort_key: int  # a hash of the uri: decides the order (and so the shard) of the record
    height: int
    width: int
    image_bytes: bytes  # canonical bytes: RGB JPEG for the jpeg form, TF-decodable otherwise


class Encoded(typing.NamedTuple):
    split: str
    sort_key: int
    serialized: bytes


def split_for(uri: str, weights: tuple[float, float, float]) -> str:
    """The split of an input, from a hash of its key (`inputs.Row.key`, the uri relative to the input's
    root): the same on every run, runner, worker count and location of the data."""
    fraction = int.from_bytes(hashlib.sha256(("split:" + uri).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    total = float(sum(weights))
    bound = 0.0
    for split, weight in zip(layout.SPLITS, weights):
        bound += weight / total
        if fraction < bound:
            return split
    return next(s for s, w in reversed(list(zip(layout.SPLITS, weights))) if w > 0)


def example_id_for(uri: str) -> str:
    return hashlib.sha256(("id:" + uri).encode("utf-8")).hexdigest()[:24]


def sort_key_for(example_id: str) -> int:
    return int(example_id[:16], 16)


def place(row: Row, weights: tuple[float, float, float]) -> tuple[str, str, int]:
    """(split, example id, sort key) of a row: hashes of its key, known before its file is read."""
    key = row.key or row.uri
    example_id = example_id_for(key)
    return split_for(key, weights), example_id, sort_key_for(example_id)


def read_limited(uri: str, max_bytes: int) -> bytes:
    """The file's bytes (`shared.untrusted_files.read_untrusted_file`), refusing a file larger than
    max_bytes and a local path that is not a regular file (opening a FIFO would wait for a writer forever)."""
    mode = size = None
    if not is_remote(uri):
        try:
            info = os.stat(uri)
        except FileNotFoundError:
            raise ImageRejected("missing_file", "no such file") from None
        except OSError as e:
            raise ImageRejected("read_error", f"{type(e).__name__}: {e.strerror}") from None
        mode, size = info.st_mode, info.st_size
    try:
        return read_untrusted_file(lambda: FileSystems.open(uri, compression_type="uncompressed"), max_bytes,
                                   mode=mode, size=size)
    except FileRefused as e:
        if e.reason == "too_large":
            raise ImageRejected("too_large", f"{e.detail} (--max_file_mb {max_bytes / 2**20:g})") from None
        raise ImageRejected("read_error", e.detail) from None
    except FileNotFoundError:
        raise ImageRejected("missing_file", "no such file") from None
    except Exception as e:  # Beam wraps GCS errors; tell a missing object from an unreadable one
        try:
            missing = not FileSystems.exists(uri)
        except Exception:
            missing = False
        if missing:
            raise ImageRejected("missing_file", "no such file") from None
        raise ImageRejected("read_error", f"{type(e).__name__}: {e}") from None


class LoadImage(beam.DoFn):
    """Row -> Loaded, or a reject (missing, unreadable, not an image, too large, corrupt, unknown label)."""

    def __init__(self, form: str, split_weights, max_pixels: int, max_bytes: int, jpeg_quality: int):
        self._form = form
        self._split_weights = split_weights
        self._max_pixels = max_pixels
        self._max_bytes = max_bytes
        self._jpeg_quality = jpeg_quality

    def process(self, row: Row, class_index: dict):
        progress.count(progress.IMAGES)
        try:
            if row.label not in class_index:
                raise ImageRejected("unknown_label", f"label {row.label!r} is not in the labels file "
                                                     f"({len(class_index)} classes)")
            data = read_limited(row.uri, self._max_bytes)
            header = image_check.read_header(data, self._max_pixels)
            if self._form == "jpeg":
                # Only this form stores bytes without TF decoding them here; for the others TF's
                # decoder (which refuses truncated data) runs next, and a full PIL decode would
                # add ~0.5 ms per 300x400 image.
                image_check.verify_decodes(data, header)
            canonical = self._canonical_bytes(data, header)
        except ImageRejected as e:
            yield rejected(make_reject(row.uri, row.label, e.reason, e.detail, row.source))
            return
        split, example_id, sort_key = place(row, self._split_weights)
        yield Loaded(row, class_index[row.label], split, example_id, sort_key, header.height, header.width, canonical)

    def _canonical_bytes(self, data: bytes, header: image_check.ImageHeader) -> bytes:
        try:
            if self._form == "jpeg":
                # An RGB JPEG keeps its bytes; anything else becomes one, so every reader decodes alike.
                if header.format == "JPEG" and header.mode == "RGB":
                    return data
                return image_check.to_rgb_image_bytes(data, "JPEG", self._jpeg_quality)
            return image_check.to_tf_decodable(data, header)  # as the server does before TF sees it
        except ImageRejected:
            raise  # it says what is wrong already
        except Exception as e:
            raise ImageRejected("corrupt", f"cannot convert {header.format} {header.mode} to RGB: "
                                           f"{type(e).__name__}: {e}") from None


def record_values_of(row: Row, label_index: int, example_id: str, height: int, width: int) -> dict:
    """The non-payload fields of a record."""
    return {"label": label_index, "label_name": row.label, "uri": row.uri, "example_id": example_id,
            "height": height, "width": width}


def record_values(item: Loaded) -> dict:
    return record_values_of(item.row, item.label_index, item.example_id, item.height, item.width)


def counted(record: Encoded) -> Encoded:
    progress.count(progress.RECORDS)
    progress.count(progress.RECORD_BYTES, len(record.serialized))
    return record


class EncodeJpeg(beam.DoFn):
    def __init__(self, features):
        self._features = features

    def process(self, item: Loaded):
        values = record_values(item) | {"image": item.image_bytes}
        yield counted(Encoded(item.split, item.sort_key, schema.encode_example(self._features, values)))


def encode_tensor_batch(batch: list[Loaded], fn, features):
    """A batch of Loaded -> through a batched TF function (pixels, or the embedding module) ->
    (item, record pieces) for each item, or a reject dict for one that TF cannot decode.

    Batches amortise TF's per-call cost (~1 ms); an image that TF cannot decode although PIL
    could is retried alone and rejected, so one bad file never fails its batch.
    """
    try:
        outputs = fn([item.image_bytes for item in batch])
    except Exception:  # find the culprit(s) one by one
        outputs = None
    payload = schema.payload_feature(features)
    for i, item in enumerate(batch):
        try:
            value = outputs[i] if outputs is not None else fn([item.image_bytes])[0]
        except Exception as e:
            logging.warning("TensorFlow could not process %s: %s", item.row.uri, e)
            yield make_reject(item.row.uri, item.row.label, "corrupt", f"TensorFlow cannot decode it: {type(e).__name__}: "
                              f"{image_check.decode_error_cause(getattr(e, 'message', None) or str(e))}", item.row.source)
            continue
        values = record_values(item) | {payload.name: np.asarray(value, dtype=np.float32)}
        yield item, schema.example_pieces(features, values)


class EncodeTensor(beam.DoFn):
    """A batch of Loaded -> Encoded, through `encode_tensor_batch`."""

    def __init__(self, features, make_batch_fn):
        self._features = features
        self._make_batch_fn = make_batch_fn  # called once per worker, in setup()
        self._fn = None

    def setup(self):
        self._fn = self._make_batch_fn()

    def process(self, batch: list[Loaded]):
        for out in encode_tensor_batch(batch, self._fn, self._features):
            if isinstance(out, dict):
                yield rejected(out)
            else:
                item, pieces = out
                yield counted(Encoded(item.split, item.sort_key, b"".join(pieces)))


def make_pixels_fn(image_size: int):
    """A function: list of encoded images -> float32 [n, size, size, 3] (the shared preprocessing,
    traced once)."""
    import tensorflow as tf

    from shared import preprocess

    batch_fn = tf.function(lambda image_bytes: preprocess.preprocess_batch(image_bytes, image_size),
                           input_signature=[tf.TensorSpec([None], tf.string)])
    # np.asarray shares the tensor's memory; .numpy() copied the batch (38 MB at 224 px, 64 images).
    return lambda images: np.asarray(batch_fn(tf.constant(images)))
