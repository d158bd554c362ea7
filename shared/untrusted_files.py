"""Reading a file someone else named: the ETL's inputs, `trainer.predict`'s arguments, the server's
`filenames` instances. Each caller opens the file its own way (Beam, tf.io.gfile, a checked
descriptor) and turns `FileRefused` into its own error; the checks are these, once.
"""
from __future__ import annotations

import stat
from typing import BinaryIO, Callable

_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO or pipe"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class FileRefused(ValueError):
    """A file that is not read (whole). `reason`: "not_regular" or "too_large"; the message says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def not_a_regular_file(mode: int) -> str | None:
    """None for a regular file's st_mode, else why it cannot be an image file, e.g. "not a regular
    file (a FIFO or pipe)": opening a FIFO waits for a writer forever, and a device or pipe has no
    size to check."""
    if stat.S_ISREG(mode):
        return None
    kind = next((kind for is_kind, kind in _NOT_REGULAR if is_kind(mode)), oct(stat.S_IFMT(mode)))
    return f"not a regular file ({kind})"


def read_untrusted_file(open_binary: Callable[[], BinaryIO], max_bytes: int, *, mode: int | None = None,
                        size: int | None = None) -> bytes:
    """The bytes of a file of at most `max_bytes`, or FileRefused.

    `mode` and `size` are the file's st_mode and length when the caller knows them (None for an
    object store): a file that is not regular is refused before it is opened, one over the limit
    before it is read. `open_binary()` is called only then, and at most max_bytes + 1 bytes are
    read, so a file that grew since its size was taken (or a size that was not known) is refused
    without holding more than the limit.
    """
    if mode is not None:
        problem = not_a_regular_file(mode)
        if problem:
            raise FileRefused("not_regular", problem)
    if size is not None and size > max_bytes:
        raise FileRefused("too_large", f"the file has {size:,} bytes, over the limit of {max_bytes:,}")
    with open_binary() as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRefused("too_large", f"the file has over {max_bytes:,} bytes, the limit")
    return data
