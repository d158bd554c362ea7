"""TensorFlow's native start-up notes are dropped from stderr; every other line, and an import error,
still reach the user (shared/native_log.py)."""
import os
import subprocess
import sys

from shared import native_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow 2.21 prints at every start-up on a machine without a GPU, as the commands' tests
# look for it (typed here, not taken from native_log, so that a broken list fails them).
NATIVE_START_UP_NOTES = ("absl::InitializeLog", "oneDNN custom operations", "Could not find cuda drivers",
                         "failed call to cuInit")

ABSL = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = (b"I0000 00:00:1796387216.020786   24454 port.cc:153] oneDNN custom operations are on. You may see "
          b"slightly different numerical results due to floating-point round-off errors.\n")
CUDA = (b"I0000 00:00:1796387216.021938   24454 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
        b"GPU will not be used.\n")
CUINIT = (b"E0000 00:00:1796387219.432902   24454 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          b"Failed call to cuInit: UNKNOWN ERROR (303)\n")
CPU_INSTRUCTIONS = (b"2024-01-31 12:00:00.123456: I tensorflow/core/platform/cpu_feature_guard.cc:210] This TensorFlow "
                    b"binary is optimized to use available CPU instructions in performance-critical operations.\n"
                    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
                    b"appropriate compiler flags.\n")
REAL_ERROR = b"E0000 00:00:1796387219.5   24454 op_kernel.cc:1857] OP_REQUIRES failed: libcudnn.so.9: cannot open\n"


def test_the_known_notes_are_dropped_and_other_lines_kept_in_order():
    captured = (ABSL + ONEDNN + b"a line of the project's\n" + CUDA + REAL_ERROR + ABSL + ONEDNN + CUDA + CUINIT
                + CPU_INSTRUCTIONS + b"Traceback (most recent call last):\n" + b"no newline yet")
    assert native_log.drop_known_notes(captured) == (b"a line of the project's\n" + REAL_ERROR
                                                     + b"Traceback (most recent call last):\n" + b"no newline yet")


def test_a_known_note_without_its_newline_is_kept():
    """It may be the start of a longer line that only looks like a note."""
    assert native_log.drop_known_notes(ONEDNN + CUDA.rstrip(b"\n")) == CUDA.rstrip(b"\n")


def test_a_note_text_inside_another_message_is_kept():
    line = b"E0000 00:00:1.5 1 x.cc:1] GPU set-up failed after: failed call to cuInit: CUDA_ERROR_NO_DEVICE\n"
    assert native_log.drop_known_notes(line) == line


# A stand-in `tensorflow` package that writes to fd 2 from below Python, as TensorFlow's C++ does.
FAKE_TENSORFLOW = """
import os, sys
os.write(2, {import_output!r})
print("a Python warning during the import", file=sys.stderr)
if os.environ.get("FAKE_TF_FAILS"):
    raise ImportError("libtensorflow_framework.so.2: cannot open shared object file")

class config:
    @staticmethod
    def list_physical_devices():
        os.write(2, {devices_output!r})
        return []
"""
LOAD_THEN_SAY_DONE = """
import os, sys
from shared import native_log
try:
    tf = native_log.load_tensorflow()
    print("loaded", tf.__name__, file=sys.stderr)
except ImportError as e:
    print("ImportError:", e, file=sys.stderr)
print("stderr is back", file=sys.stderr)
print("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
"""


def run_with_fake_tensorflow(tmp_path, **env) -> tuple[str, str]:
    """(stderr, stdout) of LOAD_THEN_SAY_DONE with the fake `tensorflow`, as a new user runs it."""
    package = tmp_path / "tensorflow"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(FAKE_TENSORFLOW.format(import_output=ABSL + ONEDNN + REAL_ERROR + CUDA,
                                                                devices_output=CUINIT))
    environ = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", native_log.SHOW_ALL_ENV)}
    proc = subprocess.run([sys.executable, "-c", LOAD_THEN_SAY_DONE], cwd=REPO, capture_output=True, timeout=60,
                          env={**environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.decode(), proc.stdout.decode()


def test_load_tensorflow_shows_only_the_lines_that_are_not_notes(tmp_path):
    stderr, stdout = run_with_fake_tensorflow(tmp_path)
    assert stderr == REAL_ERROR.decode() + "a Python warning during the import\nloaded tensorflow\nstderr is back\n"
    assert stdout == "TF_CPP_MIN_LOG_LEVEL 2\n"  # TensorFlow's INFO and WARNING lines after start-up


def test_an_import_error_propagates_after_stderr_is_restored(tmp_path):
    assert run_with_fake_tensorflow(tmp_path, FAKE_TF_FAILS="1")[0] == (
        REAL_ERROR.decode() + "a Python warning during the import\n"
        "ImportError: libtensorflow_framework.so.2: cannot open shared object file\nstderr is back\n")


def test_imagepipe_native_log_all_shows_everything(tmp_path):
    """For debugging a GPU set-up; TF_CPP_MIN_LOG_LEVEL stays unset, so TensorFlow's INFO lines show too."""
    stderr, stdout = run_with_fake_tensorflow(tmp_path, **{native_log.SHOW_ALL_ENV: "all"})
    assert stderr == ((ABSL + ONEDNN + REAL_ERROR + CUDA).decode() + "a Python warning during the import\n"
                      "loaded tensorflow\nstderr is back\n")
    assert stdout == "TF_CPP_MIN_LOG_LEVEL None\n"
