"""TFRecord framing over Beam's file systems (local, gs://), so shards can be cut at record boundaries.

Format (TFRecord, as tf.io.TFRecordWriter writes it), per record:
  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
so a record of n bytes takes n + 16 bytes, and concatenating TFRecord files gives a TFRecord file.
"""
from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
from typing import Sequence

import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from shared.paths import is_remote

FRAMING_BYTES = 16
_MASK_DELTA = 0xA282EAD8
# A local shard's bytes go to disk every this many bytes, on the writing thread: the disk writes
# while the next images decode, instead of all at once in the fsync when the shard closes.
SYNC_EVERY_BYTES = 16 * 2 ** 20


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    return _mask(google_crc32c.value(data))


def frame_pieces(pieces: Sequence[bytes]) -> list[bytes]:
    """One record, given as byte strings (`schema.example_pieces`), laid out as in a TFRecord file:
    [length and its crc, *pieces, crc of the data]. The pieces are not copied."""
    length = struct.pack("<Q", sum(len(p) for p in pieces))
    crc = 0
    for piece in pieces:
        crc = google_crc32c.extend(crc, piece)
    return [length + struct.pack("<I", _masked_crc(length)), *pieces, struct.pack("<I", _mask(crc))]


def frame_record(data: bytes) -> bytes:
    """One record as it is laid out in a TFRecord file."""
    return b"".join(frame_pieces([data]))


def create_binary(path: str):
    return FileSystems.create(path, mime_type="application/octet-stream",
                              compression_type=CompressionTypes.UNCOMPRESSED)


class ShardFileWriter:
    """Writes framed records, in order, into one file (local or gs://), hashing them as it goes.

    `background=True` hashes and writes on a thread (both release the GIL), so the caller decodes
    the next images meanwhile; at most `max_queued` records wait. A local file is synced as it
    grows and at `close()`, so that no sidecar ever lists bytes a power cut could still take back.
    `close()` returns (size, sha256 hex, framed length of each record).
    """

    def __init__(self, path: str, background: bool = False, max_queued: int = 32):
        self.path = path
        self._file = create_binary(path)
        self._digest = hashlib.sha256()
        self._lengths: list[int] = []
        self._error: BaseException | None = None
        self._unsynced = 0
        self._local = not is_remote(path)
        self._queue: queue.Queue | None = queue.Queue(max_queued) if background else None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._drain, name=f"write {os.path.basename(path)}", daemon=True)
            self._thread.start()

    def write(self, framed: Sequence[bytes]) -> None:
        if self._queue is None:
            self._write_now(framed)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(framed)

    def _write_now(self, framed: Sequence[bytes]) -> None:
        size = 0
        for piece in framed:
            self._digest.update(piece)
            self._file.write(piece)
            size += len(piece)
        self._lengths.append(size)
        self._unsynced += size
        if self._local and self._unsynced >= SYNC_EVERY_BYTES:
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    def _drain(self) -> None:
        while (framed := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write_now(framed)
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e

    def close(self) -> tuple[int, str, list[int]]:
        self._stop()
        if self._error is not None:
            self._file.close()
            raise self._error
        if self._local:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        return sum(self._lengths), self._digest.hexdigest(), self._lengths

    def abandon(self) -> None:
        """Stops writing after an error elsewhere; the partial file is left for its folder's cleanup."""
        self._stop()
        self._file.close()

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


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
