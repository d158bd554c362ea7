"""TFRecord framing over Beam's file systems (local, gs://), so shards can be cut at record boundaries.

Format (TFRecord, as tf.io.TFRecordWriter writes it), per record:
  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
so a record of n bytes takes n + 16 bytes, and concatenating TFRecord files gives a TFRecord file.
"""
from __future__ import annotations

import struct

import google_crc32c

FRAMING_BYTES = 16
_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record as it is laid out in a TFRecord file."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", _masked_crc(length)), data, struct.pack("<I", _masked_crc(data))))


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
