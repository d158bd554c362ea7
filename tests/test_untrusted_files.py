"""shared.untrusted_files: the one reader of files someone else named (ETL inputs, trainer.predict's
arguments, the server's `filenames`); each caller's own tests check its error types and statuses."""
import io
import os

import pytest

from shared.untrusted_files import FileRefused, read_untrusted_file


class CountingOpener:
    """open_binary for read_untrusted_file that records whether it was called and how much was asked."""

    def __init__(self, data: bytes):
        self.data, self.opened, self.asked = data, False, None

    def __call__(self):
        self.opened = True
        opener = self

        class Reader(io.BytesIO):
            def read(self, size=-1):
                opener.asked = size
                return super().read(size)
        return Reader(self.data)


def test_a_file_within_the_limit_is_read_whole():
    opener = CountingOpener(b"x" * 100)
    st = os.stat(__file__)
    assert read_untrusted_file(opener, 100, mode=st.st_mode, size=100) == b"x" * 100
    assert opener.asked == 101  # one byte more than the limit, to see a file that grew


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    opener = CountingOpener(b"")
    with pytest.raises(FileRefused) as e:
        read_untrusted_file(opener, 100, mode=os.stat(fifo).st_mode, size=0)
    assert e.value.reason == "not_regular" and str(e.value) == "not a regular file (a FIFO or pipe)"
    assert not opener.opened


def test_a_file_over_the_limit_is_refused_before_it_is_opened():
    opener = CountingOpener(b"x" * 101)
    with pytest.raises(FileRefused) as e:
        read_untrusted_file(opener, 100, size=101)
    assert e.value.reason == "too_large" and str(e.value) == "the file has 101 bytes, over the limit of 100"
    assert not opener.opened


@pytest.mark.parametrize("size", [10, None])  # stat before it grew, or an object store with no size given
def test_a_file_larger_than_its_size_said_is_refused_after_reading_one_byte_over(size):
    opener = CountingOpener(b"x" * 10_000)
    with pytest.raises(FileRefused) as e:
        read_untrusted_file(opener, 100, size=size)
    assert e.value.reason == "too_large" and opener.asked == 101
