"""TensorFlow loaded without its native start-up notes on stderr.

TensorFlow's C++ libraries log before absl::InitializeLog() runs, where TF_CPP_MIN_LOG_LEVEL is
not read yet (tensorflow/tensorflow#100442): 7 lines per command on a CPU machine (oneDNN, "Could
not find cuda drivers", "failed call to cuInit"). They are written to file descriptor 2 from C++,
so `sys.stderr` cannot catch them; `load_tensorflow` points fd 2 at a file while TensorFlow loads
and finds its devices, then writes back every line that is not one of KNOWN_NOTES.

Free of TensorFlow at import: every role installs `shared/`.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from types import ModuleType

# IMAGEPIPE_NATIVE_LOG=all shows every native line (and leaves TF_CPP_MIN_LOG_LEVEL unset: all of
# TensorFlow's INFO lines), to debug a GPU set-up.
SHOW_ALL_ENV = "IMAGEPIPE_NATIVE_LOG"

# Messages TensorFlow prints at every start-up that ask nothing of the user; matched at the start
# of the message, after the log prefix. Anything else (a real error) is written back.
KNOWN_NOTES = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"oneDNN custom operations are on.",
    b"Could not find cuda drivers on your machine, GPU will not be used.",
    b"failed call to cuInit:",
    b"Unable to register cuDNN factory:",
    b"Unable to register cuFFT factory:",
    b"Unable to register cuBLAS factory:",
    b"This TensorFlow binary is optimized to use available CPU instructions",
    b"To enable the following instructions:",  # the second line of the one above, without a prefix
    b"TF-TRT Warning: Could not find TensorRT",
)
# absl's prefix ("I0000 00:00:1796387216.020786   24454 port.cc:153] ") or TensorFlow's own
# ("2024-01-31 12:00:00.123456: I tensorflow/core/util/port.cc:113] ").
_LOG_PREFIX = re.compile(rb"(?:[IWEF]\d{4} [\d:.]+ +\d+ |\d{4}-\d\d-\d\d [\d:.]+: [IWEF] )\S+:\d+\] ")


def is_known_note(line: bytes) -> bool:
    """Whether one complete line (without its newline) is one of KNOWN_NOTES."""
    prefix = _LOG_PREFIX.match(line)
    return line[prefix.end() if prefix else 0:].startswith(KNOWN_NOTES)


def drop_known_notes(output: bytes) -> bytes:
    """`output` without its complete lines that are KNOWN_NOTES; everything else, in order. A last
    line without its newline is kept as it is (it may be the start of something else)."""
    lines = output.splitlines(keepends=True)
    return b"".join(line for line in lines if not (line.endswith(b"\n") and is_known_note(line.rstrip(b"\r\n"))))


def load_tensorflow() -> ModuleType:
    """`import tensorflow` and its first device listing (which prints the cuInit line), with
    KNOWN_NOTES dropped from what they write to stderr; returns the module.

    Call it from the main thread of an entry point before other threads exist: fd 2 belongs to the
    whole process while it is redirected (~5 s), so another thread's stderr lines would come out
    late, and one that redirects fd 2 itself would be undone. Elsewhere, and when TensorFlow is
    already imported, it is a plain import. An exception during the import propagates after stderr
    is restored and what was written to it shown. Sets TF_CPP_MIN_LOG_LEVEL=2 (TensorFlow's INFO
    and WARNING lines after start-up) unless already set; with IMAGEPIPE_NATIVE_LOG=all it hides
    nothing and sets nothing.
    """
    show_all = os.environ.get(SHOW_ALL_ENV, "").lower() == "all"
    if not show_all:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if show_all or "tensorflow" in sys.modules or threading.current_thread() is not threading.main_thread():
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            captured.seek(0)
            kept = memoryview(drop_known_notes(captured.read()))
            while kept:
                kept = kept[os.write(2, kept):]
    return tf
