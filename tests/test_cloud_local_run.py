"""`--local_run`: a Vertex AI job spec run here, one process per replica, with Vertex AI's environment
(trainer.cloud.local_run, local_tune). The two slow tests train for real: a two-process
multi-worker job, and a study of three trials reporting through cloudml-hypertune's file."""
from __future__ import annotations

import io
import json
import os
import re
import sys
import textwrap

import hypertune
import pytest
from google.cloud import aiplatform_v1 as aip

from tests import trainer_fixtures as fx
from trainer import run_folder
from trainer.cloud import cli, images, local_run, local_tune, vertex_specs
from trainer.tuning.search_space import parse_search_space

TIMEOUT = "300"  # seconds for a whole local run; each trainer process takes ~20-40 s on 2 cores


def container(command, args=()) -> aip.ContainerSpec:
    return aip.ContainerSpec(image_uri="img", command=list(command), args=list(args))


def four_pool_spec() -> aip.CustomJobSpec:
    counts = (1, 2, 1, 1)  # chief, workers, parameter server, evaluator
    pools = [aip.WorkerPoolSpec(machine_spec=aip.MachineSpec(machine_type="n1-standard-4"), replica_count=n,
                                container_spec=container(images.TRAINER_COMMAND, ["--data=gs://b/out"]))
             for n in counts]
    return aip.CustomJobSpec(worker_pool_specs=pools,
                             base_output_directory=aip.GcsDestination(output_uri_prefix="gs://b/runs/t"))


def test_each_replica_gets_vertex_ais_cluster_task_and_folders():
    replicas = local_run.plan_replicas(four_pool_spec(), "job-7", "/logs", trial="3", trial_args=["--l2=0.1"],
                                       metric_file="/m/output.metrics")
    assert [r.name for r in replicas] == ["chief-0", "worker-0", "worker-1", "ps-0", "evaluator-0"]
    addresses = [json.loads(r.env["CLUSTER_SPEC"])["cluster"] for r in replicas]
    cluster = addresses[0]
    assert all(a == cluster for a in addresses)  # the same on every replica
    assert [len(cluster[f"workerpool{i}"]) for i in range(4)] == [1, 2, 1, 1]
    hosts = [h for pool in cluster.values() for h in pool]
    assert len(set(hosts)) == 5 and all(re.fullmatch(r"localhost:\d+", h) for h in hosts)
    for r, (pool, index) in zip(replicas, [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0)]):
        cluster_spec, tf_config = json.loads(r.env["CLUSTER_SPEC"]), json.loads(r.env["TF_CONFIG"])
        assert cluster_spec["task"] == {"type": f"workerpool{pool}", "index": index, "trial": "3"}
        assert cluster_spec["environment"] == tf_config["environment"] == "cloud"
        assert tf_config["task"] == {"type": ("chief", "worker", "ps", "evaluator")[pool], "index": index, "trial": "3"}
        # TensorFlow's names for pools 0-2; the evaluator is not part of the training cluster
        assert tf_config["cluster"] == {"chief": cluster["workerpool0"], "worker": cluster["workerpool1"],
                                        "ps": cluster["workerpool2"]}
        assert vertex_specs.spec_from_yaml(json.dumps(tf_config["job"]), aip.CustomJobSpec) == four_pool_spec()
        assert (r.env["AIP_MODEL_DIR"], r.env["AIP_CHECKPOINT_DIR"], r.env["AIP_TENSORBOARD_LOG_DIR"]) == \
            ("gs://b/runs/t/3/model/", "gs://b/runs/t/3/checkpoints/", "gs://b/runs/t/3/logs/")
        assert (r.env["CLOUD_ML_JOB_ID"], r.env["CLOUD_ML_TRIAL_ID"], r.env["CLOUD_ML_HP_METRIC_FILE"]) == \
            ("job-7", "3", "/m/output.metrics")
        assert r.command == (sys.executable, "-m", "trainer.train", "--data=gs://b/out", "--l2=0.1")
        assert r.log_path == f"/logs/{r.name}.log"


def test_a_job_that_is_not_a_trial_has_no_trial_and_its_folders_sit_under_the_base():
    [chief] = local_run.plan_replicas(vertex_specs.build_custom_job_spec(
        vertex_specs.make_hardware("one_device", None, None), container(["python", "-V"]), "runs/r1"), "j", "/logs")
    assert json.loads(chief.env["TF_CONFIG"])["task"] == {"type": "chief", "index": 0}
    assert chief.env["AIP_MODEL_DIR"] == "runs/r1/model/" and "CLOUD_ML_TRIAL_ID" not in chief.env


# Each replica runs this: the worker fails at once, the chief would run for a minute.
FAILING_WORKER = textwrap.dedent("""
    import json, os, sys, time
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    print("pid", os.getpid(), task["type"], flush=True)
    if task["type"] == "worker":
        print("worker failing on purpose", flush=True)
        sys.exit(3)
    time.sleep(60)
""")


def test_a_failing_replica_stops_the_others_and_is_named_with_its_log(tmp_path):
    spec = vertex_specs.build_custom_job_spec(vertex_specs.make_hardware("multi_worker", None, None, workers=2),
                                              container(["python", "-c", FAILING_WORKER]), str(tmp_path / "job"))
    with pytest.raises(local_run.LocalRunError) as failed:
        local_run.run_custom_job(spec, "j", str(tmp_path / "job"), out=io.StringIO(), timeout=120)
    log_dir = tmp_path / "job" / "replicas"
    assert str(failed.value).startswith(f"replica worker-0 failed (exit 3); the others were stopped. "
                                        f"Its log, {log_dir / 'worker-0.log'}, ends:")
    assert "worker failing on purpose" in str(failed.value)
    chief_pid = int((log_dir / "chief-0.log").read_text().split()[1])
    with pytest.raises(ProcessLookupError):  # stopped, and reaped
        os.kill(chief_pid, 0)


# A trial that reports its --score through cloudml-hypertune, or fails for a negative one.
REPORTING_TRIAL = textwrap.dedent("""
    import sys, hypertune
    score = float(sys.argv[1].split("=")[1])
    if score < 0:
        sys.exit("negative score")
    hypertune.HyperTune().report_hyperparameter_tuning_metric("accuracy", score / 2, global_step=1)
    hypertune.HyperTune().report_hyperparameter_tuning_metric("accuracy", score, global_step=2)
""")


def reporting_study(values, parallel: int, max_failed: int = 0, base: str = "runs/t") -> aip.HyperparameterTuningJob:
    space = parse_search_space(f"algorithm: grid\nparameters:\n  score: {{type: discrete, values: {values}}}\n")
    spec = vertex_specs.build_custom_job_spec(vertex_specs.make_hardware("one_device", None, None),
                                              container(["python", "-c", REPORTING_TRIAL]), base)
    return vertex_specs.build_tuning_job("s", space, spec, len(values), parallel, max_failed)


def test_a_study_reads_each_trials_last_report_and_records_failed_trials(tmp_path):
    job = reporting_study([-1.0, 0.25, 0.75], parallel=3, base=str(tmp_path / "study"))
    out = io.StringIO()
    trials = local_tune.run_study(job, "s", str(tmp_path / "study"), out, timeout=120)
    assert [(t.trial, t.state, t.metric, t.parameters) for t in trials] == [
        ("1", "FAILED", None, {"score": "-1.0"}), ("2", "SUCCEEDED", 0.25, {"score": "0.25"}),
        ("3", "SUCCEEDED", 0.75, {"score": "0.75"})]  # the last report, not the first (score / 2)
    assert "replica chief-0 failed (exit 1)" in trials[0].error
    table = out.getvalue().split("trial  state")[1]
    assert re.search(r"\n3 +SUCCEEDED +0\.7500 +0\.75\n", table) and "best: trial 3 (accuracy 0.7500, maximize)" in table
    report = json.loads((tmp_path / "study" / "3" / local_tune.METRIC_FILE).read_text().splitlines()[-1])
    assert report["trial"] == "3"  # CLOUD_ML_TRIAL_ID reached the trial


def test_a_study_stops_at_max_failed_trials(tmp_path):
    job = reporting_study([-3.0, -2.0, 0.5], parallel=1, max_failed=1, base=str(tmp_path / "study"))
    with pytest.raises(local_run.LocalRunError, match="1 trial\\(s\\) failed: the study stops at maxFailedTrialCount 1"):
        local_tune.run_study(job, "s", str(tmp_path / "study"), io.StringIO(), timeout=120)
    assert not (tmp_path / "study" / "3").exists()  # never started


def test_the_metric_is_the_last_value_reported_under_the_studys_tag(tmp_path, monkeypatch):
    path = tmp_path / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(path))
    reporter = hypertune.HyperTune()
    reporter.report_hyperparameter_tuning_metric("accuracy", 0.5, global_step=1)
    reporter.report_hyperparameter_tuning_metric("accuracy", 0.75, global_step=2)
    reporter.report_hyperparameter_tuning_metric("loss", 0.1, global_step=3)
    assert local_tune.read_reported_metric(str(path), "accuracy") == 0.75
    assert local_tune.read_reported_metric(str(path), "val_loss") is None
    assert local_tune.read_reported_metric(str(tmp_path / "missing"), "accuracy") is None


def test_trials_walk_the_grid_or_draw_within_the_space_as_vertex_formats_values():
    grid = vertex_specs.build_study_spec(parse_search_space(
        "algorithm: grid\nparameters:\n  batch_size: {type: discrete, values: [16, 32]}\n"
        "  with_flip: {type: categorical, values: ['true', 'false']}\n"))
    assert local_tune.choose_trials(grid, 3) == [{"batch_size": "16.0", "with_flip": "true"},
                                                 {"batch_size": "16.0", "with_flip": "false"},
                                                 {"batch_size": "32.0", "with_flip": "true"}]
    space = vertex_specs.build_study_spec(parse_search_space(
        "algorithm: random\nparameters:\n  lrate: {type: double, min: 0.0001, max: 0.1, scale: log}\n"
        "  num_hidden: {type: integer, min: 8, max: 12}\n"))
    drawn = local_tune.choose_trials(space, 20, seed=1)
    assert drawn == local_tune.choose_trials(space, 20, seed=1) != local_tune.choose_trials(space, 20, seed=2)
    assert all(0.0001 <= float(t["lrate"]) <= 0.1 and t["num_hidden"] in {"8", "9", "10", "11", "12"} for t in drawn)


@pytest.fixture(scope="module")
def pixels_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pixels"))
    fx.write_dataset(out, fx.make_image_files(str(tmp_path_factory.mktemp("images")), per_class=6), "pixels",
                     shards_per_split={"train": 2, "valid": 1, "test": 1})
    return out


TRAINER_FLAGS = ["--num_epochs", "1", "--batch_size", "4", "--model", "linear", "--image_size", "32",
                 "--crop_ratio", "1.0", "--with_flip", "false", "--with_color_distort", "false"]


@pytest.mark.slow
def test_multi_worker_local_run_trains_with_two_processes_as_vertex_starts_them(tmp_path, pixels_dir):
    job_dir = str(tmp_path / "run")
    out = io.StringIO()
    replicas = cli.run(["train", "--strategy", "multi_worker", "--workers", "2", "--data", pixels_dir,
                        "--job_dir", job_dir, "--project", "p", "--local_run", "--local_run_timeout", TIMEOUT,
                        *TRAINER_FLAGS, "--num_training_examples", "8"], out=out)
    assert [r.name for r in replicas] == ["chief-0", "worker-0"]
    assert os.path.exists(os.path.join(job_dir, run_folder.EXPORT_DIR, "saved_model.pb"))
    assert f"local run finished: export in {job_dir}/export" in out.getvalue()
    chief, worker = (open(r.log_path).read() for r in replicas)
    assert "task chief/0, worker 0 of 2, chief=True" in chief and "task worker/0, worker 1 of 2, chief=False" in worker
    for log in (chief, worker):  # both trained the one epoch of 2 steps (8 virtual examples / 4)
        assert "global batch size 4 = 2 replicas x 2 per replica, 2 worker(s)" in log
        assert re.search(r"\n2/2 - .* - val_accuracy: ", log)
    assert "metrics of the exported weights" in chief and "metrics of the exported weights" not in worker
    assert json.load(open(os.path.join(job_dir, run_folder.CONFIG_FILE)))["resolved"]["num_workers"] == 2


@pytest.mark.slow
def test_tune_local_run_reports_each_trials_metric_through_the_hypertune_file(tmp_path, pixels_dir):
    space = tmp_path / "space.yaml"
    space.write_text("algorithm: grid\nmax_trials: 3\nparallel_trials: 3\nearly_stopping: false\n"
                     "parameters:\n  lrate: {type: discrete, values: [0.001, 0.01, 0.1]}\n")
    job_dir = tmp_path / "tune"
    out = io.StringIO()
    trials = cli.run(["tune", "--search_space", str(space), "--data", pixels_dir, "--job_dir", str(job_dir),
                      "--project", "p", "--local_run", "--local_run_timeout", TIMEOUT, *TRAINER_FLAGS], out=out)
    assert [(t.trial, t.state) for t in trials] == [("1", "SUCCEEDED"), ("2", "SUCCEEDED"), ("3", "SUCCEEDED")]
    for t, lrate in zip(trials, (0.001, 0.01, 0.1)):
        model_dir = job_dir / t.trial / "model"  # AIP_MODEL_DIR: each trial its own run folder
        metrics = json.loads((model_dir / run_folder.METRICS_FILE).read_text())
        assert t.metric == metrics["val_accuracy"]  # read back from the trial's hypertune file
        assert json.loads((model_dir / run_folder.CONFIG_FILE).read_text())["flags"]["lrate"] == lrate
        assert (model_dir / run_folder.EXPORT_DIR / "saved_model.pb").exists()
        assert (job_dir / t.trial / local_tune.METRIC_FILE).exists()
        assert re.search(rf"\n{t.trial} +SUCCEEDED +{t.metric:.4f} +{lrate}\n", out.getvalue())
