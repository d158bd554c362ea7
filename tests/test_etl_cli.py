"""What `python -m etl` shows: the project's own lines (progress, a summary), not Beam's chatter;
refusals as one line (exit 2), bugs with their traceback (exit 1); counts that add up."""
import logging
import os
import re
import subprocess
import sys

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from etl import pipeline, progress
from etl.options import parse_etl_args
from shared import native_log
from tests import image_factory
from tests.test_native_log import NATIVE_START_UP_NOTES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture()
def messy_csv(tmp_path):
    """8 images, 2 missing files, 1 malformed line, 1 duplicate: 12 rows."""
    rows = image_factory.write_class_folders(str(tmp_path / "in"), classes=("cat", "dog"), per_class=4)
    rows += [(str(tmp_path / "gone1.jpg"), "cat"), (str(tmp_path / "gone2.jpg"), "dog"), rows[0]]
    path = image_factory.write_csv(str(tmp_path / "rows.csv"), rows)
    with open(path, "a") as f:
        f.write("a,b,c\n")
    return path


def test_beam_counters_account_for_every_row(tmp_path, messy_csv):
    config, _ = parse_etl_args(["--input", messy_csv, "--output", str(tmp_path / "out"), "--form", "jpeg"])
    temp_dir = tmp_path / "staging"
    temp_dir.mkdir()
    p = TestPipeline()
    pipeline.build_pipeline(p, config, str(temp_dir), pipeline.make_features(config, None), None)
    counts = progress.counts_from_result(p.run())
    assert counts == {progress.ROWS: 12, progress.IMAGES: 10, progress.RECORDS: 8,
                      progress.RECORD_BYTES: counts[progress.RECORD_BYTES], progress.REJECTED: 4,
                      "rejected_missing_file": 2, "rejected_malformed_row": 1, "rejected_duplicate": 1}
    assert counts[progress.RECORD_BYTES] > 8 * 1000  # 48x40 JPEGs of ~1.1 KB


def test_a_run_logs_progress_while_it_works_and_a_summary_at_the_end(tmp_path, messy_csv, caplog):
    caplog.set_level(logging.INFO)
    meta = pipeline.run(["--input", messy_csv, "--output", str(tmp_path / "out"), "--form", "pixels",
                         "--image_size", "8", "--progress_seconds", "0.05"])
    lines = [r.getMessage() for r in caplog.records]
    progress_lines = [line for line in lines if line.startswith("progress ")]
    assert len(progress_lines) >= 2, lines  # a run of a second or more, a line every 0.05 s
    pattern = re.compile(r"progress \d+:\d\d:\d\d: (\d+) images read, (\d+) records written \([\d.,]+ \w+\), "
                         r"(\d+) rejected( \(\d+% of (\d+) rows\))?; [\d,]+ records/s")
    for line in progress_lines:
        images, records, rejected, _, rows = pattern.fullmatch(line).groups()
        assert int(images) <= 10 and int(records) <= 8 and int(rejected) <= 4 and rows in (None, "12"), line
    split_counts = ", ".join(f"{name} {meta.splits[name].num_examples}" for name in ("train", "valid", "test"))
    shards = [shard for s in meta.splits.values() for shard in s.shards]
    size = progress.size_text(sum(shard.num_bytes for shard in shards))
    summary = lines[lines.index(f"Wrote {tmp_path / 'out'}") + 1:]
    assert summary[:2] == [
        f"  records: {split_counts} (8 in all); {size} in {len(shards)} shards",
        "  rejected: 4 (duplicate 1, malformed_row 1, missing_file 2) of 12 rows"]
    assert re.fullmatch(r"  wall time: 0:00:\d\d, the first record written after \d+\.\d s", summary[2])


def test_the_command_shows_the_projects_lines_not_beams_or_tensorflows(tmp_path, messy_csv):
    new_user = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", native_log.SHOW_ALL_ENV)}
    proc = subprocess.run([sys.executable, "-m", "etl", "--input", messy_csv, "--output", str(tmp_path / "out"),
                           "--form", "jpeg", "--progress_seconds", "0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=new_user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Converting string literal type hint" not in proc.stderr
    assert not [note for note in NATIVE_START_UP_NOTES if note in proc.stderr], proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if re.search(r" INFO (?!ETL |progress |Wrote |  )", line)]
    assert " INFO progress " in proc.stderr and " INFO   rejected: 4 (" in proc.stderr
    assert proc.stdout.startswith("etl: wrote train=")


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path, class_folder_dataset):
    """Only refusals are one line with exit 2; a ValueError from a bug was shown the same way."""
    broken = ("import sys; from etl import cli, pipeline\n"
              "def make_features(*args): raise ValueError('a bug in the ETL')\n"
              "pipeline.make_features = make_features\n"
              "cli.main(sys.argv[1:])\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", broken, "--input", class_folder_dataset, "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("ValueError: a bug in the ETL")
    assert "etl: error" not in proc.stderr
    assert os.listdir(out) == [], "the staging folder is removed"
