"""The Makefile's promise that `make serve` serves the last `make train`, checked with `make -n`
(which prints the recipes it would run and runs none)."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(*args: str) -> str:
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout


def test_train_records_its_job_dir_and_serve_reads_it(tmp_path):
    last = tmp_path / "LAST_TRAIN"
    assert f"echo 'runs/r7' > {last}" in dry_run("train", "JOB_DIR=runs/r7", f"LAST_TRAIN={last}")
    last.write_text("runs/r7\n")
    for target in ("serve", "bench-serve"):
        assert "--model runs/r7/export" in dry_run(target, f"LAST_TRAIN={last}")


def test_a_given_job_dir_or_export_wins_and_without_a_record_serve_falls_back_to_the_default(tmp_path):
    last = tmp_path / "LAST_TRAIN"
    last.write_text("runs/r7\n")
    assert "--model runs/other/export" in dry_run("serve", "JOB_DIR=runs/other", f"LAST_TRAIN={last}")
    assert "--model elsewhere/export" in dry_run("serve", "EXPORT=elsewhere/export", f"LAST_TRAIN={last}")
    assert "--model runs/pixels/export" in dry_run("serve", f"LAST_TRAIN={tmp_path / 'missing'}")


def test_a_given_data_folder_is_used_as_is_and_only_the_default_one_is_built_first():
    assert "test -f data/out/pixels/metadata.json || make" in dry_run("train").replace("$(MAKE)", "make")
    for target in ("train", "tune"):
        given = dry_run(target, "DATA=/typo/out")
        assert "--data /typo/out" in given and "test -f" not in given, given


def test_mobilenet_on_the_jpeg_form_trains_at_224_px_unless_told_otherwise():
    assert "--image_size 224" in dry_run("train", "FORM=jpeg", "MODEL=mobilenet")
    assert "--image_size 32" in dry_run("train", "FORM=jpeg", "MODEL=dnn")
    assert "--image_size 160" in dry_run("train", "FORM=jpeg", "MODEL=mobilenet", "TRAIN_IMAGE_SIZE=160")


def test_the_chapter_7_benches_run_on_data_as_train_does():
    assert "test -f data/out/pixels/metadata.json || make" in dry_run("bench-vectorise").replace("$(MAKE)", "make")
    given = dry_run("bench-strategies", "DATA=data/out/bench-jpeg", "MODEL=mobilenet")
    assert "-m trainer.bench_strategies --data data/out/bench-jpeg --model mobilenet --image_size 224" in given
    assert "test -f" not in given
    assert "-m trainer.bench_ingest --data data/out/bench-jpeg" in dry_run("bench-ingest")


def test_the_samples_training_flags_apply_to_the_samples_data_only():
    for target in ("train", "bench-strategies"):
        assert "--num_hidden 128 --crop_ratio 1.0 --with_flip false" in dry_run(target)
        assert "--with_flip false" not in dry_run(target, "DATA=data/out/bench-jpeg")
    assert "--with_flip false" in dry_run("tune") and "--with_flip false" not in dry_run("tune", "DATA=/d")


def test_etl_passes_the_class_names_file_under_its_new_flag():
    assert "--class_names_file data/sample/digits/dict.txt" in dry_run("etl")
    assert "--class_names_file mine.txt" in dry_run("etl", "INPUT=x.csv", "LABELS=mine.txt")  # the old variable
    assert "--class_names_file" not in dry_run("etl", "INPUT=x.csv")
