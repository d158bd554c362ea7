"""What `python -m trainer.train` prints: the project's lines, Keras's progress and warnings, not
TensorFlow's per-checkpoint INFO lines ("Sharding callback duration", absl logging, at every save)
or its native start-up notes."""
import os
import subprocess
import sys

from tests import trainer_fixtures as fx
from tests.test_native_log import NATIVE_START_UP_NOTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -m trainer.train ...`, then warnings and an INFO line from the libraries' loggers, in one process.
RUN_TRAINER_THEN_LOG = """
import runpy, sys
from absl import logging as absl_logging
try:
    runpy.run_module("trainer.train", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
import tensorflow as tf
absl_logging.warning("an absl warning after training")
absl_logging.info("an absl INFO line after training")
tf.get_logger().warning("a tensorflow warning after training")
sys.exit(code)
"""


def test_a_training_prints_the_projects_lines_and_warnings_without_tensorflows_info_lines(tmp_path):
    images = fx.make_image_files(str(tmp_path / "images"), per_class=4)
    fx.write_dataset(str(tmp_path / "pixels"), images, "pixels")
    # --image_size 224 on the 32 px pixels form: the project's own warning that it is ignored
    argv = fx.trainer_argv(str(tmp_path / "pixels"), str(tmp_path / "run"), num_epochs=1, image_size=224)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a new user runs it
    env["PYTHONPATH"] = ROOT
    shown = subprocess.run([sys.executable, "-c", RUN_TRAINER_THEN_LOG, *argv], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert " - val_accuracy: " in shown.stdout, shown.stdout  # Keras's line for the epoch
    for line in ("INFO training took", "INFO metrics of the exported weights", "WARNING --image_size 224 ignored",
                 "an absl warning after training"):
        assert line in shown.stderr, (line, shown.stderr[-3000:])
    assert "Sharding callback duration" not in shown.stderr, shown.stderr[-3000:]
    assert not [note for note in NATIVE_START_UP_NOTES if note in shown.stderr], shown.stderr[-3000:]
    assert "an absl INFO line after training" not in shown.stderr
    assert shown.stderr.count("a tensorflow warning after training") == 1, shown.stderr[-3000:]  # not twice
