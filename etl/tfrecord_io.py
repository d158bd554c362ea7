"""TFRecord framing over Beam's file systems (local, gs://), so shards can be cut at record boundaries.

Format (TFRecord, as tf.io.TFRecordWriter writes it), per record:
  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
so a record of n bytes takes n + 16 bytes, and concatenating TFRecord files gives a TFRecord file.
"""
from __future__ import annotations

import hashlib
import os
import struct
from typing import Sequence

import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from shared.paths import is_remote

FRAMING_BYTES = 16
_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record as it is laid out in a TFRecord file."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", _masked_crc(length)), data, struct.pack("<I", _masked_crc(data))))


def create_binary(path: str):
    return FileSystems.create(path, mime_type="application/octet-stream",
                              compression_type=CompressionTypes.UNCOMPRESSED)


class ShardFileWriter:
    """Writes framed records, in order, into one file (local or gs://), hashing them as it goes.

    `close()` fsyncs a local file, so that no sidecar ever lists bytes that a power cut could
    still take back, and returns (size, sha256 hex, framed length of each record).
    """

    def __init__(self, path: str):
        self.path = path
        self._file = create_binary(path)
        self._digest = hashlib.sha256()
        self._lengths: list[int] = []

    def write(self, framed: Sequence[bytes]) -> None:
        size = 0
        for piece in framed:
            self._digest.update(piece)
            self._file.write(piece)
            size += len(piece)
        self._lengths.append(size)

    def close(self) -> tuple[int, str, list[int]]:
        if not is_remote(self.path):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        return sum(self._lengths), self._digest.hexdigest(), self._lengths


def read_framed_records(data: bytes, source: str = "<bytes>"):
    """Yields the records of a whole TFRecord file's bytes, checking both CRCs (tests and tools)."""
    pos = 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{source}: truncated record header at byte {pos}")
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        if length_crc != _masked_crc(data[pos:pos + 8]):
            raise ValueError(f"{source}: corrupt length at byte {pos}")
        end = pos + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{source}: truncated record at byte {pos}")
        record = data[pos + 12:end]
        (data_crc,) = struct.unpack_from("<I", data, end)
        if data_crc != _masked_crc(record):
            raise ValueError(f"{source}: corrupt record at byte {pos}")
        yield record
        pos = end + 4
