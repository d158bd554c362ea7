"""Local paths and URLs (`gs://bucket/x`, `ram://x`), told apart in one place."""
from __future__ import annotations

import re

# A scheme and "://": what Beam's FileSystems and tf.io.gfile dispatch on. A colon alone is an
# ordinary file-name character ("shot:1.png"), and so is "://" after the first slash.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str) -> bool:
    """True for a URL that a filesystem plugin reads (gs://, ram://, s3://, ...), False for a local path."""
    return bool(_URL.match(path))
