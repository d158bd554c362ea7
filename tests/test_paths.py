"""shared.paths: one test for "is this a URL a filesystem plugin reads", used by every module."""
import pytest

from shared.paths import is_remote


@pytest.mark.parametrize("path, remote", [
    ("gs://bucket/out", True), ("ram://data/x", True), ("s3://b/k", True), ("GS://bucket", True),
    ("/data/out", False), ("out", False), ("shot:1.png", False), ("data/a://b.jpg", False), ("://x", False), ("", False),
])
def test_only_a_scheme_with_slashes_at_the_start_is_remote(path, remote):
    assert is_remote(path) is remote
