"""Vertex AI job specs (trainer.cloud.jobs, vertex_specs) and metric reporting (trainer.hypertune_report).
Nothing is submitted: --dry_run, or a fake client.

Every spec the command can make is parsed back from its printed YAML through the SDK's own
types (an unknown or misplaced field fails), and its command and flags go through the trainer's
own argument parser.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys

import pytest
from google.cloud import aiplatform_v1 as aip

from trainer import hypertune_report
from trainer.cloud import cli, images, jobs as cloud, package_spec, vertex_specs
from trainer.config import make_arg_parser, parse_config
from trainer.tuning.search_space import load_search_space, parse_search_space

BASE = ["--data", "gs://my-bucket/out", "--project", "my-project", "--region", "us-central1",
        "--dry_run", "--display_name", "test-job"]
TPU_IMAGE = "us-central1-docker.pkg.dev/my-project/imagepipe/my-tpu-image:1"

LAYOUTS = {  # name -> (strategy, hardware flags, image, replica counts per pool, accelerator)
    "one_device": ("one_device", [], "imagepipe-train:", [1], None),
    "mirrored": ("mirrored", ["--machine", "n1-standard-8", "--accelerator", "NVIDIA_TESLA_T4:2"],
                 "imagepipe-train-gpu:", [1], ("NVIDIA_TESLA_T4", 2)),
    "multi_worker_gpu": ("multi_worker", ["--accelerator", "NVIDIA_TESLA_T4:1", "--workers", "4",
                                          "--num_training_examples", "4000"], "imagepipe-train-gpu:", [1, 3],
                         ("NVIDIA_TESLA_T4", 1)),
    # MultiWorkerMirroredStrategy on CPU machines: one replica each.
    "multi_worker_cpu": ("multi_worker", ["--workers", "2", "--num_training_examples", "4000"],
                         "imagepipe-train:", [1, 1], None),
    "tpu": ("tpu", ["--accelerator", "TPU_V3:8", "--image_uri", TPU_IMAGE], TPU_IMAGE, [1], ("TPU_V3", 8)),
}


def dry_run(argv: list[str]) -> tuple[str, str]:
    """(the printed YAML, the printed gcloud command)."""
    out = io.StringIO()
    assert cli.run(argv, out=out) is None
    text = out.getvalue()
    spec_text, _, command = text.partition("# Equivalent gcloud command")
    return spec_text.split("\n", 1)[1], command.strip().splitlines()[-1]


def assert_trainer_accepts(container: aip.ContainerSpec, strategy: str, monkeypatch, tuning: bool):
    assert list(container.command) == list(images.TRAINER_COMMAND)
    assert importlib.util.find_spec(container.command[-1]) is not None
    if tuning:  # Vertex gives each trial its own folder through AIP_MODEL_DIR
        monkeypatch.setenv("AIP_MODEL_DIR", "gs://my-bucket/runs/t1/7/model")
    else:
        monkeypatch.delenv("AIP_MODEL_DIR", raising=False)
    config = parse_config(list(container.args))
    assert config.strategy == strategy and config.data == "gs://my-bucket/out"
    return config


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_round_trips_through_sdk_types_and_the_trainer_parser(layout, command, monkeypatch):
    strategy, hw_flags, image, replicas, accelerator = LAYOUTS[layout]
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
        container = pool.container_spec
        assert not pool.python_package_spec.python_module  # our image, not Google's prebuilt one
        if image.startswith("imagepipe-"):  # the address `make push` pushes to
            assert container.image_uri == f"us-central1-docker.pkg.dev/my-project/imagepipe/{image}" \
                                          f"{images.package_version()}"
        else:
            assert container.image_uri == image
        if accelerator:
            assert (pool.machine_spec.accelerator_type.name, pool.machine_spec.accelerator_count) == accelerator
        else:
            assert pool.machine_spec.accelerator_count == 0 and pool.machine_spec.machine_type == "n1-standard-4"
        config = assert_trainer_accepts(container, strategy, monkeypatch, tuning=command == "tune")
        assert config.num_epochs == 7
        # train names its folder; tune must not, or every trial would resume the previous one's run
        assert config.job_dir == (job_dir if command == "train" else "gs://my-bucket/runs/t1/7/model")
    if strategy == "multi_worker":
        assert config.num_training_examples == 4000  # virtual epochs


def test_the_image_address_is_the_one_make_push_writes_and_image_uri_overrides_it():
    text, _ = dry_run(["train", *BASE, "--job_dir", "gs://my-bucket/r", "--region", "europe-west4",
                       "--repository", "team-images"])
    uri = vertex_specs.spec_from_yaml(text, aip.CustomJobSpec).worker_pool_specs[0].container_spec.image_uri
    assert uri == images.image_uri("train", "my-project", "europe-west4", "team-images")
    assert uri == f"europe-west4-docker.pkg.dev/my-project/team-images/imagepipe-train:{images.package_version()}"
    text, _ = dry_run(["train", *BASE, "--job_dir", "gs://my-bucket/r", "--image_uri", "docker.io/me/trainer:7"])
    assert vertex_specs.spec_from_yaml(text, aip.CustomJobSpec).worker_pool_specs[0].container_spec.image_uri \
        == "docker.io/me/trainer:7"


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "tpu", "--accelerator", "TPU_V3:8"], "tensorflow-tpu"),
    (["--executor_image", "gcr.io/me/img"], "pass your image as --image_uri gcr.io/me/img"),
    (["--local_run"], "choose one"),
    (["--tf_version", "2.17"], "for --python_package"),
])
def test_jobs_that_cannot_run_as_asked_are_refused_with_the_fix(extra, message):
    with pytest.raises(cloud.CloudJobError, match=re.escape(message)):
        cli.run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", *extra], out=io.StringIO())


def test_the_gcloud_command_names_a_config_file_that_holds_the_printed_spec(tmp_path):
    out = io.StringIO()
    cli.run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r"], out=out)
    assert "--config names custom_job.yaml: save the spec above there, or pass --spec_file" in out.getvalue()
    spec_file = tmp_path / "job.yaml"
    text, gcloud = dry_run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", "--spec_file", str(spec_file)])
    assert f"--config={spec_file}" in gcloud and spec_file.read_text().strip() == text.strip()


def test_tuning_trials_need_vertex_to_name_their_folder(monkeypatch):
    text, _ = dry_run(["tune", *BASE, "--job_dir", "gs://my-bucket/runs/t1"])
    args = list(vertex_specs.spec_from_yaml(text, aip.HyperparameterTuningJob)
                .trial_job_spec.worker_pool_specs[0].container_spec.args)
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
    task = vertex_specs.container_task("img", images.TRAINER_COMMAND, ["--data=gs://x"])
    spec = vertex_specs.build_custom_job_spec(hw, task, "gs://x/run")
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
        cli.run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", *extra], out=io.StringIO())


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
        cli.run(argv, out=io.StringIO())


def test_a_tuned_batch_size_range_is_refused_on_several_replicas(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  batch_size: {type: integer, min: 16, max: 64}\n")
    argv = ["tune", *BASE, "--job_dir", "gs://my-bucket/runs/r", "--search_space", str(space),
            "--strategy", "mirrored", "--accelerator", "NVIDIA_TESLA_T4:2"]
    with pytest.raises(cloud.CloudJobError, match=re.escape("batch_size is tuned over a range [16, 64], but with 2")):
        cli.run(argv, out=io.StringIO())


def test_a_metric_the_trainer_does_not_report_is_refused(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("metric: val_loss\ngoal: minimize\nparameters:\n  l2: {type: double, min: 0.0, max: 0.2}\n")
    with pytest.raises(cloud.CloudJobError, match="metric 'val_loss': the trainer reports only 'accuracy'"):
        cli.run(["tune", *BASE, "--job_dir", "gs://my-bucket/runs/t", "--search_space", str(space)],
                  out=io.StringIO())


@pytest.mark.parametrize("budget", [["--max_trials", "0"], ["--parallel_trials", "0"], ["--max_failed_trials", "-1"]])
def test_a_budget_of_zero_is_refused_not_replaced_by_the_spaces(budget):
    with pytest.raises(cloud.CloudJobError, match="must be positive"):
        cli.run(["tune", *BASE, "--job_dir", "gs://my-bucket/runs/t", *budget], out=io.StringIO())


def test_local_paths_are_refused_unless_the_job_runs_here():
    argv = ["train", *BASE, "--job_dir", "runs/r"]
    with pytest.raises(cloud.CloudJobError, match="--job_dir must be on gs://.*local paths work with --local_run"):
        cli.run(argv, out=io.StringIO())


def write_project(root, python_requires: str, tensorflow: str):
    """A one-module project whose sdist declares these pins."""
    (root / "fits").mkdir(parents=True)
    (root / "fits" / "__init__.py").write_text("")
    (root / "setup.py").write_text(
        "import setuptools\nsetuptools.setup(name='fits', version='0.1', packages=['fits'], "
        f"python_requires={python_requires!r}, install_requires={[tensorflow]!r})\n")
    return root


def test_a_package_is_checked_against_the_prebuilt_image_from_its_own_sdist(tmp_path):
    fits = write_project(tmp_path / "fits", ">=3.10", "tensorflow>=2.17,<2.18")
    too_new = write_project(tmp_path / "too_new", ">=3.11,<3.13", "tensorflow>=2.21,<2.22")
    checked = {}
    for project in (fits, too_new):
        python, requires = package_spec.read_sdist_requirements(package_spec.build_sdist(str(project / "dist"), project))
        checked[project.name] = package_spec.image_compatibility_problems(
            python, requires, vertex_specs.PREBUILT_IMAGE_PYTHON, "2.17")
    assert checked["fits"] == []
    [python_problem, tf_problem] = checked["too_new"]
    assert "needs Python >=3.11,<3.13 but the prebuilt image runs Python 3.10" in python_problem
    assert "needs tensorflow<2.22,>=2.21 but the image has TensorFlow 2.17" in tf_problem


def test_a_python_package_that_installs_on_the_prebuilt_image_becomes_a_python_package_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(package_spec, "REPO_ROOT", write_project(tmp_path, ">=3.10", "tensorflow>=2.17,<2.18"))
    text, gcloud = dry_run(["train", *BASE, "--job_dir", "gs://my-bucket/r1", "--python_package"])
    [pool] = vertex_specs.spec_from_yaml(text, aip.CustomJobSpec).worker_pool_specs
    package = pool.python_package_spec
    assert not pool.container_spec.image_uri
    assert package.executor_image_uri == "us-docker.pkg.dev/vertex-ai/training/tf-cpu.2-17.py310:latest"
    assert list(package.package_uris) == ["gs://my-bucket/r1/package/fits-0.1.tar.gz"]
    assert package.python_module == "trainer.train" and "--job_dir=gs://my-bucket/r1" in package.args


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
    name = cli.run([a for a in argv if a != "--dry_run"], out=io.StringIO(), client=client)
    [(kind, parent, job)] = client.calls
    assert parent == "projects/my-project/locations/us-central1" and name.startswith(parent)
    if command == "train":
        assert kind == "custom" and job.display_name == "test-job"
        assert job.job_spec == vertex_specs.spec_from_yaml(text, aip.CustomJobSpec)
    else:
        assert kind == "tune" and job == vertex_specs.spec_from_yaml(text, aip.HyperparameterTuningJob)


def test_submission_is_refused_when_the_package_cannot_install_on_the_image():
    """This project's own sdist (Python 3.11, TF 2.21) against the newest prebuilt image (3.10, 2.17);
    a dry run is refused the same way (the check comes before printing or submitting)."""
    client = FakeJobClient()
    argv = ["train", *[a for a in BASE if a != "--dry_run"], "--job_dir", "gs://my-bucket/r1", "--python_package"]
    with pytest.raises(cloud.CloudJobError) as refused:
        cli.run(argv, out=io.StringIO(), client=client)
    message = str(refused.value)
    assert message.startswith("refusing a PythonPackageSpec: the package needs Python >=3.11")
    assert "prebuilt image runs Python 3.10" in message and "the image has TensorFlow 2.17" in message
    assert "Drop --python_package" in message
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
        cli.run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", *LAYOUTS["mirrored"][1], "--workers", "8",
                   "--strategy", "mirrored"], out=io.StringIO())
    text, _ = dry_run(["train", *BASE, "--job_dir", "gs://my-bucket/runs/r", "--strategy", "multi_worker",
                       "--accelerator", "NVIDIA_TESLA_T4:1", "--num_training_examples", "4000"])
    spec = vertex_specs.spec_from_yaml(text, aip.CustomJobSpec)
    assert [pool.replica_count for pool in spec.worker_pool_specs] == [1, cloud.DEFAULT_WORKERS - 1]


def test_the_cloud_command_loads_no_tensorflow():
    """`python -m trainer.cloud` stays quick: TensorFlow runs only in --local_run's trainers and in
    deploy's serving-copy process, never in the command's own."""
    code = ("import sys, trainer.cloud.cli, trainer.cloud.images\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
