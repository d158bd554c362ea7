"""`--help`, flag errors and refusals answer without loading TensorFlow (~5 s to import) or Beam's
runner: each command runs in a fresh interpreter, which then reports what it imported."""
import json
import os
import subprocess
import sys

import pytest

from tests import image_factory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Whole packages by their top name; Beam's runner by its module (Beam itself is ~1.2 s, its runner more).
HEAVY = ("tensorflow", "tf_keras", "apache_beam", "apache_beam.runners.portability.fn_api_runner")
# Runs a module as `python -m` does, then prints its exit status and which of HEAVY it loaded.
_REPORT = """
import json, runpy, sys
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print("\\nREPORT " + json.dumps({"code": code, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def run_reporting(module: str, *args: str) -> tuple[int, set, str]:
    """(exit status, the heavy modules it loaded, stdout + stderr) of `python -m module args`."""
    proc = subprocess.run([sys.executable, "-c", _REPORT, module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    report = json.loads(proc.stdout.rsplit("REPORT ", 1)[1])
    return report["code"], set(report["loaded"]), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dataset_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    image_factory.write_class_folders(str(root / "images"), classes=("cat", "dog"), per_class=1)
    (root / "out").mkdir()
    (root / "out" / "metadata.json").write_text("{}")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return root


@pytest.mark.parametrize("args, expected", [
    (["--help"], "Labelled images to sharded TFRecords"),
    (["--input", "x.csv"], "the following arguments are required: --output"),
    (["--input", "x.csv", "--output", "o", "--split", "nan,1,1"], "--split takes three non-negative weights"),
    # With a Beam flag, as `make etl` passes one: Beam's flags are checked after these refusals.
    (["--input", "{root}/images", "--output", "{root}/o", "--class_names_file", "{root}/latin1.txt",
      "--runner", "DirectRunner"], "latin1.txt is not UTF-8 text"),
    (["--input", "{root}/images", "--output", "{root}/images/out", "--runner", "DirectRunner"],
     "lies inside the class-folder --input"),
    (["--input", "{root}/missing.csv", "--output", "{root}/o"], "missing.csv does not exist"),
    (["--input", "{root}/images", "--output", "{root}/out", "--runner", "DirectRunner"], "is not empty"),
], ids=["help", "missing_flag", "bad_value", "bad_class_names_file", "output_inside_input", "missing_input",
        "non_empty_output"])
def test_etl_answers_without_beam_or_tensorflow(dataset_dirs, args, expected):
    code, loaded, output = run_reporting("etl", *[a.format(root=dataset_dirs) for a in args])
    assert (code, loaded) == (0 if args == ["--help"] else 2, set()), output
    assert expected in output and "Traceback" not in output


def test_a_mistyped_beam_flag_is_refused_without_tensorflow_or_beams_runner(dataset_dirs):
    code, loaded, output = run_reporting("etl", "--input", str(dataset_dirs / "images"), "--runner", "DirectRunner",
                                         "--output", str(dataset_dirs / "o"), "--shard-mb", "1")
    assert (code, loaded) == (2, {"apache_beam"}), output  # Beam knows its flags
    assert "--shard-mb (did you mean --shard_mb?)" in output and "Traceback" not in output


@pytest.mark.parametrize("module, args, expected_code, expected", [
    ("trainer.train", ["--help"], 0, "--num_epochs"),
    ("trainer.train", ["--data", "d", "--job_dir", "j", "--lrate", "0"], 2, "--lrate must be a positive number"),
    ("trainer.predict", ["--help"], 0, "--batch_size"),
    ("trainer.serve", ["--help"], 0, "--max_body_mb"),
])
def test_trainer_commands_answer_help_and_flag_errors_without_tensorflow(module, args, expected_code, expected):
    code, loaded, output = run_reporting(module, *args)
    assert (code, loaded) == (expected_code, set()), output
    assert expected in output
