"""Vertex AI job specs (trainer.cloud, trainer.vertex_specs) and metric reporting
(trainer.hypertune_report). Nothing is submitted: --dry_run, or a fake client.

Every spec the command can make is parsed back from its printed YAML through the SDK's own
types (an unknown or misplaced field fails), and its module and flags go through the trainer's
own argument parser.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re

import pytest
from google.cloud import aiplatform_v1 as aip

from trainer import hypertune_report
from trainer.cloud import jobs as cloud, vertex_specs
from trainer.config import make_arg_parser, parse_config
from trainer.tuning.search_space import load_search_space, parse_search_space

PACKAGE = "gs://my-bucket/packages/imagepipe-0.1.0.tar.gz"  # skips the sdist build in most tests
BASE = ["--data", "gs://my-bucket/out", "--project", "my-project", "--region", "us-central1",
        "--package_uri", PACKAGE, "--dry_run", "--display_name", "test-job"]

LAYOUTS = {  # strategy -> (hardware flags, image kind, replica counts per pool, accelerator)
    "one_device": ([], "tf-cpu.", [1], None),
    "mirrored": (["--machine", "n1-standard-8", "--accelerator", "NVIDIA_TESLA_T4:2"], "tf-gpu.", [1],
                 ("NVIDIA_TESLA_T4", 2)),
    "multi_worker": (["--accelerator", "NVIDIA_TESLA_T4:1", "--workers", "4", "--num_training_examples", "4000"],
                     "tf-gpu.", [1, 3], ("NVIDIA_TESLA_T4", 1)),
    "tpu": (["--accelerator", "TPU_V3:8"], "tf-tpu.", [1], ("TPU_V3", 8)),
}


def dry_run(argv: list[str]) -> tuple[str, str]:
    """(the printed YAML, the printed gcloud command)."""
    out = io.StringIO()
    assert cloud.run(argv, out=out) is None
    text = out.getvalue()
    spec_text, _, command = text.partition("# Equivalent gcloud command")
    return spec_text.split("\n", 1)[1], command.strip().splitlines()[-1]


def assert_trainer_accepts(package: aip.PythonPackageSpec, strategy: str, monkeypatch, tuning: bool):
    assert package.python_module == "trainer.train"
    assert importlib.util.find_spec(package.python_module) is not None
    if tuning:  # Vertex gives each trial its own folder through AIP_MODEL_DIR
        monkeypatch.setenv("AIP_MODEL_DIR", "gs://my-bucket/runs/t1/7/model")
    else:
        monkeypatch.delenv("AIP_MODEL_DIR", raising=False)
    config = parse_config(list(package.args))
    assert config.strategy == strategy and config.data == "gs://my-bucket/out"
    return config


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("strategy", sorted(LAYOUTS))
def test_every_layout_round_trips_through_sdk_types_and_the_trainer_parser(strategy, command, monkeypatch):
    hw_flags, image_kind, replicas, accelerator = LAYOUTS[strategy]
    job_dir = f"gs://my-bucket/runs/{command}"
    text, gcloud = dry_run([command, *BASE, "--job_dir", job_dir, "--strategy", strategy, *hw_flags,
                            "--num_epochs", "7"])
    if command == "train":
        spec = vertex_specs.spec_from_yaml(text, aip.CustomJobSpec)
        assert gcloud.startswith("gcloud ai custom-jobs create ")
    else:
        job = vertex_specs.spec_from_yaml(text, aip.HyperparameterTuningJob)
        spec = job.trial_job_spec
        assert gcloud.startswith("gcloud ai hp-tuning-jobs create ")
        assert "--max-trial-count=50 --parallel-trial-count=2" in gcloud  # the book's budget
        assert job.study_spec.metrics[0].metric_id == hypertune_report.METRIC_TAG
    assert "--project=my-project --region=us-central1" in gcloud and "--config=" in gcloud
    assert spec.base_output_directory.output_uri_prefix == job_dir
    assert [pool.replica_count for pool in spec.worker_pool_specs] == replicas
    for pool in spec.worker_pool_specs:
        package = pool.python_package_spec
        assert image_kind in package.executor_image_uri and package.executor_image_uri.endswith(":latest")
        assert list(package.package_uris) == [PACKAGE]
        if accelerator:
            assert (pool.machine_spec.accelerator_type.name, pool.machine_spec.accelerator_count) == accelerator
        else:
            assert pool.machine_spec.accelerator_count == 0
        config = assert_trainer_accepts(package, strategy, monkeypatch, tuning=command == "tune")
        assert config.num_epochs == 7
        # train names its folder; tune must not, or every trial would resume the previous one's run
        assert config.job_dir == (job_dir if command == "train" else "gs://my-bucket/runs/t1/7/model")
    if strategy == "multi_worker":
        assert config.num_training_examples == 4000  # virtual epochs


def test_the_gcloud_command_names_a_config_file_that_holds_the_printed_spec(tmp_path):
    out = io.StringIO()
    cloud.run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r"], out=out)
    assert "--config names custom_job.yaml: save the spec above there, or pass --spec_file" in out.getvalue()
    spec_file = tmp_path / "job.yaml"
    text, gcloud = dry_run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", "--spec_file", str(spec_file)])
    assert f"--config={spec_file}" in gcloud and spec_file.read_text().strip() == text.strip()


def test_tuning_trials_need_vertex_to_name_their_folder(monkeypatch):
    text, _ = dry_run(["tune", *BASE, "--job_dir", "gs://my-bucket/runs/t1"])
    args = list(vertex_specs.spec_from_yaml(text, aip.HyperparameterTuningJob)
                .trial_job_spec.worker_pool_specs[0].python_package_spec.args)
    assert not any(a.startswith(("--job_dir", "--job-dir")) for a in args)
    monkeypatch.delenv("AIP_MODEL_DIR", raising=False)
    with pytest.raises(SystemExit):  # so the trainer would refuse to start without AIP_MODEL_DIR
        parse_config(args)


def test_book_search_space_becomes_a_study_spec_whose_parameters_the_trainer_parses():
    space = load_search_space(None)
    study = vertex_specs.build_study_spec(space)
    by_id = {p.parameter_id: p for p in study.parameters}
    assert set(by_id) == {"l2", "batch_size", "num_hidden", "with_color_distort", "crop_ratio"}
    assert (by_id["l2"].double_value_spec.min_value, by_id["l2"].double_value_spec.max_value) == (0.0, 0.2)
    assert by_id["l2"].scale_type.name == "UNIT_LINEAR_SCALE"
    assert list(by_id["batch_size"].discrete_value_spec.values) == [16, 32, 64]
    assert list(by_id["with_color_distort"].categorical_value_spec.values) == ["true", "false"]
    assert (by_id["crop_ratio"].double_value_spec.min_value, by_id["crop_ratio"].double_value_spec.max_value) \
        == (0.5, 0.8)
    assert study.algorithm.name == "ALGORITHM_UNSPECIFIED"  # Vertex's Bayesian optimisation
    assert study.metrics[0].goal.name == "MAXIMIZE"
    options = {o: a for a in make_arg_parser()._actions for o in a.option_strings}
    for p in study.parameters:  # the way Vertex passes values: --name=value, DISCRETE ones as floats ("16.0")
        values = (list(p.categorical_value_spec.values) or list(p.discrete_value_spec.values)
                  or [p.double_value_spec.min_value, p.double_value_spec.max_value])
        for v in values:
            parsed = options[f"--{p.parameter_id}"].type(str(v))
            if p.discrete_value_spec.values:
                assert isinstance(parsed, int) and parsed == v, (p.parameter_id, v, parsed)


def test_grid_search_maps_to_grid_search_and_caps_the_budget_at_the_grid():
    space = parse_search_space("algorithm: grid\nparameters:\n  batch_size: {type: discrete, values: [48, 64, 96]}\n"
                               "  num_hidden: {type: discrete, values: [16, 24, 32]}\n")
    hw = vertex_specs.make_hardware("one_device", None, None)
    spec = vertex_specs.build_custom_job_spec(hw, "img", PACKAGE, ["--data=gs://x"], "gs://x/run")
    job = vertex_specs.build_tuning_job("g", space, spec, max_trials=45, parallel_trials=3)
    assert job.study_spec.algorithm.name == "GRID_SEARCH" and job.max_trial_count == 9


@pytest.mark.parametrize("strategy, machine, accelerator, message", [
    ("mirrored", None, None, "needs GPUs"),
    ("one_device", None, "NVIDIA_TESLA_T4:1", "runs on CPU"),
    ("tpu", None, "TPU_V3:4", "8 cores"),
    ("tpu", None, "NVIDIA_TESLA_T4:8", "TPU_V2:8 or TPU_V3:8"),
    ("multi_worker", None, "NVIDIA_TESLA_T4:1", "at least 2"),
    ("mirrored", None, "NVIDIA_TESLA_X9:1", "unknown accelerator"),
    # Vertex AI refuses these: A100s and L4s are built into a2 and g2 machines, T4s come 1, 2 or 4.
    ("mirrored", "n1-standard-8", "NVIDIA_TESLA_A100:2", "runs on ['a2-highgpu-2g'], not 'n1-standard-8'"),
    ("mirrored", "a2-highgpu-1g", "NVIDIA_TESLA_A100:2", "not 'a2-highgpu-1g'"),
    ("mirrored", None, "NVIDIA_L4:3", "hold [1, 2, 4, 8] GPUs"),
    ("mirrored", None, "NVIDIA_TESLA_T4:3", "takes [1, 2, 4]"),
    ("mirrored", "e2-standard-8", "NVIDIA_TESLA_T4:2", "N1 machines only"),
    ("mirrored", None, "NVIDIA_B200:8", "pass --machine"),
])
def test_hardware_that_does_not_fit_the_strategy_is_refused(strategy, machine, accelerator, message):
    with pytest.raises(vertex_specs.SpecError, match=re.escape(message)):
        vertex_specs.make_hardware(strategy, machine, accelerator, workers=1)


@pytest.mark.parametrize("accelerator, machine", [
    ("NVIDIA_TESLA_T4:4", "n1-standard-8"), ("NVIDIA_TESLA_A100:2", "a2-highgpu-2g"),
    ("NVIDIA_A100_80GB:1", "a2-ultragpu-1g"), ("NVIDIA_L4:1", "g2-standard-8"), ("NVIDIA_H100_80GB:8", "a3-highgpu-8g")])
def test_the_default_machine_is_one_that_takes_the_gpus(accelerator, machine):
    assert vertex_specs.make_hardware("mirrored", None, accelerator).machine_type == machine


def test_prebuilt_images_match_accelerator_version_and_region():
    assert vertex_specs.prebuilt_training_image("gpu", "2.17", "europe-west4") == \
        "europe-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest"
    assert vertex_specs.prebuilt_training_image("tpu", "2.15") == \
        "us-docker.pkg.dev/vertex-ai/training/tf-tpu.2-15.cp310:latest"
    with pytest.raises(vertex_specs.SpecError, match="available"):
        vertex_specs.prebuilt_training_image("gpu", "2.21")


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "multi_worker", "--accelerator", "NVIDIA_TESLA_T4:1"], "num_training_examples"),
    (["--no_such_trainer_flag", "1"], "the trainer rejects"),
])
def test_jobs_the_trainer_would_reject_are_refused(extra, message):
    with pytest.raises(cloud.CloudJobError, match=message):
        cloud.run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", *extra], out=io.StringIO())


@pytest.mark.parametrize("command, extra, message", [
    # 3 machines x 1 GPU = 3 replicas: the trainer refuses the default batch of 32 on Vertex AI.
    ("train", ["--workers", "3"], "batch size [32] does not split over the 3 replicas"),
    ("tune", ["--workers", "3"], "batch size [16, 32, 64] does not split over the 3 replicas"),
    ("train", ["--workers", "4", "--batch_size", "30"], "batch size [30] does not split over the 4 replicas"),
])
def test_batch_sizes_that_do_not_split_over_the_replicas_are_refused(command, extra, message):
    argv = [command, *BASE, "--job_dir", "gs://my-bucket/runs/r", "--strategy", "multi_worker",
            "--accelerator", "NVIDIA_TESLA_T4:1", "--num_training_examples", "4000", *extra]
    with pytest.raises(cloud.CloudJobError, match=re.escape(message)):
        cloud.run(argv, out=io.StringIO())


def test_a_tuned_batch_size_range_is_refused_on_several_replicas(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  batch_size: {type: integer, min: 16, max: 64}\n")
    argv = ["tune", *BASE, "--job_dir", "gs://my-bucket/runs/r", "--search_space", str(space),
            "--strategy", "mirrored", "--accelerator", "NVIDIA_TESLA_T4:2"]
    with pytest.raises(cloud.CloudJobError, match=re.escape("batch_size is tuned over a range [16, 64], but with 2")):
        cloud.run(argv, out=io.StringIO())


def test_a_metric_the_trainer_does_not_report_is_refused(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("metric: val_loss\ngoal: minimize\nparameters:\n  l2: {type: double, min: 0.0, max: 0.2}\n")
    with pytest.raises(cloud.CloudJobError, match="metric 'val_loss': the trainer reports only 'accuracy'"):
        cloud.run(["tune", *BASE, "--job_dir", "gs://my-bucket/runs/t", "--search_space", str(space)],
                  out=io.StringIO())


@pytest.mark.parametrize("budget", [["--max_trials", "0"], ["--parallel_trials", "0"], ["--max_failed_trials", "-1"]])
def test_a_budget_of_zero_is_refused_not_replaced_by_the_spaces(budget):
    with pytest.raises(cloud.CloudJobError, match="must be positive"):
        cloud.run(["tune", *BASE, "--job_dir", "gs://my-bucket/runs/t", *budget], out=io.StringIO())


def test_local_paths_are_refused():
    argv = ["train", *BASE, "--job_dir", "runs/r"]
    with pytest.raises(cloud.CloudJobError, match="--job_dir must be on gs://"):
        cloud.run(argv, out=io.StringIO())


def test_sdist_is_built_and_its_python_and_tf_pins_are_checked_against_the_image(tmp_path, capsys):
    argv = ["train", *[a for a in BASE if a not in ("--package_uri", PACKAGE)], "--job_dir", "gs://my-bucket/r1"]
    text, _ = dry_run(argv)
    uri = vertex_specs.spec_from_yaml(text, aip.CustomJobSpec).worker_pool_specs[0].python_package_spec.package_uris[0]
    assert uri == "gs://my-bucket/r1/package/imagepipe-0.1.0.tar.gz"
    python, requires = cloud.read_sdist_requirements(cloud.build_sdist(str(tmp_path)))
    assert python and any(r.startswith("tensorflow") for r in requires)  # read from setup.py's sdist
    expected = cloud.image_compatibility_problems(python, requires, vertex_specs.PREBUILT_IMAGE_PYTHON, "2.17")
    assert capsys.readouterr().err.count("WARNING: this job would fail") == len(expected)
    assert cloud.image_compatibility_problems(">=3.10", ["tensorflow>=2.17,<2.18"], "3.10", "2.17") == []
    problems = cloud.image_compatibility_problems(">=3.11,<3.13", ["tensorflow>=2.21,<2.22"], "3.10", "2.17")
    assert len(problems) == 2 and "Python 3.10" in problems[0] and "TensorFlow 2.17" in problems[1]


class FakeJobClient:
    def __init__(self):
        self.calls = []

    def create_custom_job(self, parent, custom_job):
        self.calls.append(("custom", parent, custom_job))
        return aip.CustomJob(name=f"{parent}/customJobs/1")

    def create_hyperparameter_tuning_job(self, parent, hyperparameter_tuning_job):
        self.calls.append(("tune", parent, hyperparameter_tuning_job))
        return aip.HyperparameterTuningJob(name=f"{parent}/hyperparameterTuningJobs/2")


@pytest.mark.parametrize("command", ["train", "tune"])
def test_submission_sends_the_printed_spec(command):
    argv = [command, *BASE, "--job_dir", "gs://my-bucket/runs/s"]
    text, _ = dry_run(argv)
    client = FakeJobClient()
    name = cloud.run([a for a in argv if a != "--dry_run"], out=io.StringIO(), client=client)
    [(kind, parent, job)] = client.calls
    assert parent == "projects/my-project/locations/us-central1" and name.startswith(parent)
    if command == "train":
        assert kind == "custom" and job.display_name == "test-job"
        assert job.job_spec == vertex_specs.spec_from_yaml(text, aip.CustomJobSpec)
    else:
        assert kind == "tune" and job == vertex_specs.spec_from_yaml(text, aip.HyperparameterTuningJob)


def test_submission_is_refused_when_the_package_cannot_install_on_the_image(monkeypatch):
    monkeypatch.setattr(cloud, "image_compatibility_problems", lambda *a: ["needs Python 3.11"])
    client = FakeJobClient()
    argv = ["train", *[a for a in BASE if a not in ("--package_uri", PACKAGE, "--dry_run")],
            "--job_dir", "gs://my-bucket/r1"]
    with pytest.raises(cloud.CloudJobError, match="refusing to submit: needs Python 3.11"):
        cloud.run(argv, out=io.StringIO(), client=client)
    assert client.calls == []


def test_metric_is_reported_only_inside_a_vertex_trial(tmp_path, monkeypatch):
    for name in hypertune_report.VERTEX_TRIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    assert hypertune_report.report_metric(0.5, 1) is False
    metric_file = tmp_path / "hypertune" / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metric_file))
    assert hypertune_report.report_metric(0.81, 2) is True
    assert hypertune_report.report_metric(0.87, 3) is True
    lines = [json.loads(x) for x in metric_file.read_text().splitlines()]
    assert [(x["accuracy"], x["global_step"]) for x in lines] == [("0.81", "2"), ("0.87", "3")]
    with pytest.raises(ValueError, match="NaN"):
        hypertune_report.report_metric(float("nan"), 4)


def test_workers_is_for_multi_worker_only_and_defaults_to_two_machines():
    # It used to default to 2 for every strategy, so a typed --workers 8 on mirrored was dropped unseen.
    with pytest.raises(cloud.CloudJobError, match="--workers 8 is for --strategy multi_worker; mirrored runs on one"):
        cloud.run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", *LAYOUTS["mirrored"][0], "--workers", "8",
                   "--strategy", "mirrored"], out=io.StringIO())
    text, _ = dry_run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", "--strategy", "multi_worker",
                       "--accelerator", "NVIDIA_TESLA_T4:1", "--num_training_examples", "4000"])
    spec = vertex_specs.spec_from_yaml(text, aip.CustomJobSpec)
    assert [pool.replica_count for pool in spec.worker_pool_specs] == [1, cloud.DEFAULT_WORKERS - 1]
