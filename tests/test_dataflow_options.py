"""Dataflow settings for the ETL: complete and checked before submission, and what Beam's
DataflowRunner translates them into (built offline with Beam's own --dry_run; nothing is sent)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from etl import dataflow_options
from etl.dataflow_options import DataflowOptionsError, dataflow_args


def test_every_missing_setting_is_named_before_anything_runs(tmp_path):
    with pytest.raises(DataflowOptionsError) as e:
        dataflow_args(project="", region=None, bucket="gs://", setup_file=tmp_path / "nope.py", max_workers=0)
    message = str(e.value)
    for name in ("PROJECT (--project)", "REGION (--region)", "BUCKET (--bucket)", "nope.py", "MAX_WORKERS"):
        assert name in message


@pytest.mark.parametrize("field, value, named", [
    ("region", "us central", "REGION"), ("bucket", "gs://my-bucket/some/path", "BUCKET"),
    ("job_name", "My_Job", "JOB_NAME"), ("input_path", "data/all_data.csv", "INPUT (--input)"),
    ("output_path", "data/out", "OUTPUT (--output)")])
def test_malformed_settings_are_refused(field, value, named):
    kwargs = {"project": "p", "region": "us-central1", "bucket": "my-bucket", field: value}
    with pytest.raises(DataflowOptionsError, match=re.escape(named)):
        dataflow_args(**kwargs)


def test_cli_prints_flags_or_fails_with_exit_2(capsys):
    assert dataflow_options.main(["--project", "p", "--region", "us-central1", "--bucket", "gs://my-bucket",
                                  "--job_name", "etl-1"]) == 0
    flags = shlex.split(capsys.readouterr().out)
    assert "--temp_location=gs://my-bucket/dataflow/temp" in flags and "--job_name=etl-1" in flags
    assert dataflow_options.main(["--project", "p", "--region", "us-central1"]) == 2  # what `make etl` sees
    assert "BUCKET (--bucket) is missing" in capsys.readouterr().err


WORKER_IMAGE = "europe-west4-docker.pkg.dev/my-project/imagepipe/imagepipe-dataflow-worker:0.1.0"


@pytest.mark.slow  # builds the ETL graph, and an sdist for --setup_file (~5 s each)
@pytest.mark.parametrize("worker_image", [None, WORKER_IMAGE], ids=["setup_file", "worker_image"])
def test_the_etl_pipeline_translates_to_a_dataflow_job(tmp_path, worker_image):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions
    from apache_beam.runners.dataflow.internal import apiclient

    from etl import pipeline
    from etl.options import parse_etl_args

    rows = tmp_path / "rows.csv"  # the ETL reads the CSV header while building the graph
    rows.write_text("gs://my-bucket/images/a.jpg,cat\n")
    names = tmp_path / "dict.txt"
    names.write_text("cat\n")
    # Job labels in Beam's two spellings beside the class names file in the ETL's old spelling.
    config, etl_beam_args = parse_etl_args(["--input", str(rows), "--output", "gs://my-bucket/out", "--form",
                                            "pixels", "--image_size", "32", "--labels", str(names),
                                            "--labels", "team=vision", "--label", "data=digits"])
    assert config.class_names_file == str(names)
    args = dataflow_args("my-project", "europe-west4", "my-bucket", job_name="imagepipe-etl-test", max_workers=7,
                         machine_type="n1-standard-2", worker_image=worker_image)
    # --dry_run: DataflowRunner translates the job and returns before creating it; --no_auth: offline.
    # (Without a worker image, --sdk_location=container spares this test staging Beam's own sdist.)
    options = PipelineOptions(args + etl_beam_args + ["--dry_run=True", "--no_auth"]
                              + ([] if worker_image else ["--sdk_location=container"]))
    p = beam.Pipeline(options=options)
    pipeline.build_pipeline(p, config, "gs://my-bucket/out.tmp", pipeline.make_features(config, None), None,
                            ["cat"])
    job = p.run().job

    assert job.proto.name == "imagepipe-etl-test"
    assert dict(job.proto.labels) == {"team": "vision", "data": "digits"}
    cloud = job.options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region) == ("my-project", "europe-west4")
    assert cloud.temp_location.startswith("gs://my-bucket/dataflow/temp/")
    assert cloud.staging_location.startswith("gs://my-bucket/dataflow/staging/")
    [environment_proto] = job.proto_pipeline.components.environments.values()
    staged = [d.role_payload for d in environment_proto.dependencies]
    steps = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    # pixels: each shard loaded, encoded and written once (etl.fixed_size_shards)
    assert {"LoadEncodeAndWriteEachShardOnce", "CopyRecordsIntoRecutShards", "WriteRejects"} <= steps
    # The worker pool Dataflow would get (the same object the runner sends after staging).
    environment = apiclient.Environment(packages=[], options=job.options, environment_version="8",
                                        proto_pipeline_staged_url="gs://my-bucket/dataflow/staging/pipeline.pb",
                                        proto_pipeline=job.proto_pipeline).proto
    pool = environment.worker_pools[0]
    harness = [c.container_image for c in pool.sdk_harness_container_images]
    if worker_image is None:  # Beam's SDK image, which pip-installs the package built from setup.py
        assert job.options.view_as(SetupOptions).setup_file == str(dataflow_options.SETUP_FILE)
        assert any(b"workflow.tar.gz" in payload for payload in staged), staged
        assert len(harness) == 1 and harness[0].endswith(f"/beam_python3.11_sdk:{beam.__version__}")
    else:  # our image, which holds the package and its dependencies: nothing to install at start
        assert job.options.view_as(SetupOptions).setup_file is None
        assert not any(b"workflow.tar.gz" in payload for payload in staged), staged
        assert environment_proto.urn == "beam:env:docker:v1" and worker_image.encode() in environment_proto.payload
        assert harness == [worker_image] and pool.worker_harness_container_image == worker_image
        assert "use_runner_v2" in environment.experiments
    assert pool.autoscaling_settings.max_num_workers == 7
    assert pool.autoscaling_settings.algorithm.name == "AUTOSCALING_ALGORITHM_BASIC"
    assert pool.machine_type == "n1-standard-2"
    assert environment.temp_storage_prefix.startswith("storage.googleapis.com/my-bucket/dataflow/temp/")


def test_a_worker_image_replaces_the_setup_file_and_make_passes_it(capsys):
    args = dataflow_args("p", "us-central1", "my-bucket", job_name="j", worker_image=WORKER_IMAGE)
    assert f"--sdk_container_image={WORKER_IMAGE}" in args and "--sdk_location=container" in args
    assert not any(a.startswith("--setup_file") for a in args)
    assert any(a.startswith("--setup_file=") for a in dataflow_args("p", "us-central1", "my-bucket", job_name="j"))
    assert dataflow_options.main(["--project", "p", "--region", "us-central1", "--bucket", "my-bucket",
                                  "--worker_image", WORKER_IMAGE]) == 0
    assert f"--sdk_container_image={WORKER_IMAGE}" in shlex.split(capsys.readouterr().out)
    with pytest.raises(DataflowOptionsError, match="WORKER_IMAGE"):
        dataflow_args("p", "us-central1", "my-bucket", worker_image="two words")


def test_the_etl_takes_every_flag_dataflow_options_prints_and_refuses_mistyped_ones(capsys):
    from etl.options import parse_etl_args

    args = dataflow_args("my-project", "europe-west4", "my-bucket", job_name="j", max_workers=7,
                         machine_type="n1-standard-2")
    _, beam_args = parse_etl_args(["--input", "gs://b/in.csv", "--output", "gs://b/out", *args])
    assert beam_args == args  # all of them known to Beam: none refused
    for argv, named in [(["--shard-mb", "0.001"], "--shard-mb (did you mean --shard_mb?)"),
                        (["--imagesize=8"], "--imagesize (did you mean --image_size?)"),
                        (["--shard_mb", "inf"], "--shard_mb must be a positive number, got inf"),
                        (["--max_file_mb", "nan"], "--max_file_mb must be positive"),
                        (["--split", "nan,1,1"], "--split takes three non-negative weights")]:
        with pytest.raises(SystemExit):
            parse_etl_args(["--input", "in.csv", "--output", "out", *argv])
        assert named in capsys.readouterr().err, argv


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("worker_image", ["", WORKER_IMAGE])
def test_make_etl_passes_the_worker_image_to_the_flags_it_runs_with(worker_image):
    """`make -n` prints the recipe; the flags it would run with come from dataflow_options itself."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = subprocess.run(["make", "-n", "--no-print-directory", "etl", "RUNNER=DataflowRunner", "PROJECT=p",
                             "REGION=us-central1", "BUCKET=my-bucket", "INPUT=gs://my-bucket/in.csv",
                             "OUTPUT=gs://my-bucket/out", f"WORKER_IMAGE={worker_image}"],
                            cwd=repo, capture_output=True, text=True, check=True).stdout
    assert f'--worker_image "{worker_image}"' in recipe
