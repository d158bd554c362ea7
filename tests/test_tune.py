"""Local tuning (trainer.tune): trials are real subprocesses in their own folders, run in
parallel, pruned on per-epoch values, and an interrupted study resumes its trials in place.

Most tests use a fake trainer (written below into tmp_path) that parses its flags with the real
trainer's parser and writes the real trainer's files with the trainer's own names and epoch-log
format (trainer.run_folder, trainer.epoch_log) in ~0.1 s per epoch; the last test runs the real
trainer for two tiny trials.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from trainer.run_folder import EPOCH_LOG_FILE, METRICS_FILE
from trainer.tuning import results as tune_results, tune

pytestmark = pytest.mark.slow  # every test starts trainer subprocesses
REPO = Path(__file__).resolve().parents[1]

# Accuracy is a known function of the flags, so the tests can check what the tuner records.
FAKE_TRAINER = r'''
import json, os, sys, time
from trainer import epoch_log
from trainer.config import parse_config
from trainer.run_folder import EPOCH_LOG_FILE, METRICS_FILE

c = parse_config(sys.argv[1:])
os.makedirs(c.job_dir, exist_ok=True)
log = os.path.join(c.job_dir, EPOCH_LOG_FILE)
done = sum(1 for _ in open(log)) if os.path.exists(log) else 0
peers = None
meet = os.environ.get("FAKE_MEET_DIR")
if meet:  # wait (up to 10 s) until a second trainer has started, then count those still running
    open(os.path.join(meet, f"{os.getpid()}.start"), "w").close()
    deadline = time.time() + 10
    while sum(n.endswith(".start") for n in os.listdir(meet)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    peers = sum(1 for n in os.listdir(meet) if n.endswith(".start") and n != f"{os.getpid()}.start"
                and not os.path.exists(os.path.join(meet, n[:-len(".start")] + ".end")))
with open(os.path.join(c.job_dir, "starts.jsonl"), "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "start": time.time(), "resumed_at_epoch": done, "peers": peers}) + "\n")
if os.environ.get("FAKE_FAIL_BATCH") == str(c.batch_size):
    sys.exit("fake trainer: told to fail")
final = 0.9 - c.l2 - (0.1 if c.batch_size == 16 else 0.0) + (0.02 if c.with_color_distort else 0.0)
bad = c.l2 >= 0.15  # flat, hopeless curve: what the pruner should stop
for epoch in range(done, c.num_epochs):
    time.sleep(float(os.environ.get("FAKE_EPOCH_SECONDS", "0.05")))
    value = 0.1 if bad else final * (epoch + 1) / c.num_epochs
    with open(log, "a") as f:  # the trainer's own line format
        f.write(epoch_log.entry_line(epoch, {"loss": 1.0 - value, "val_accuracy": value}))
metrics = {"val_accuracy": 0.1 if bad else final, "test_accuracy": (0.1 if bad else final) - 0.01}
json.dump(metrics, open(os.path.join(c.job_dir, METRICS_FILE), "w"))
with open(os.path.join(c.job_dir, "starts.jsonl"), "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "end": time.time()}) + "\n")
if meet:
    open(os.path.join(meet, f"{os.getpid()}.end"), "w").close()
'''


def expected_accuracy(params: dict) -> float:
    if params.get("l2", 0.0) >= 0.15:
        return 0.1
    return (0.9 - params.get("l2", 0.0) - (0.1 if params.get("batch_size") == 16 else 0.0)
            + (0.02 if params.get("with_color_distort") == "true" else 0.0))


@pytest.fixture()
def fake_trainer(tmp_path, monkeypatch) -> str:
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(REPO)]))
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.05")
    return "fake_trainer"


def write_space(path: Path, body: str) -> str:
    path.write_text("metric: accuracy\ngoal: maximize\n" + body)
    return str(path)


def tune_argv(job_dir: Path, space: str, module: str, *extra: str) -> list[str]:
    """The fake trainer reads no data, but the tuner checks that --data holds a sidecar."""
    data = job_dir.parent / "data"
    if not (data / "metadata.json").exists():
        data.mkdir(parents=True, exist_ok=True)
        (data / "metadata.json").write_text(SIDECAR)
    return ["--data", str(data), "--job_dir", str(job_dir), "--search_space", space,
            "--trainer_module", module, "--poll_seconds", "0.02", *extra]


def _sidecar() -> str:
    from shared import metadata, schema

    features = schema.record_features("pixels", image_size=32)
    return metadata.DatasetMetadata(schema_version=schema.SCHEMA_VERSION, form="pixels", class_names=("a", "b"),
                                    features=features, preprocessing={}, splits={}).to_json()


SIDECAR = _sidecar()


def load_study(job_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=tune.STUDY_NAME, storage=f"sqlite:///{job_dir / tune.STUDY_FILE}")


def test_bayesian_parallel_trials_record_results_and_best_flags(tmp_path, fake_trainer, monkeypatch):
    space = write_space(tmp_path / "s.yaml", """algorithm: bayesian
early_stopping: false
parameters:
  l2: {type: double, min: 0.0, max: 0.1, scale: linear}
  batch_size: {type: discrete, values: [16, 32, 64]}
  with_color_distort: {type: categorical, values: ["true", "false"]}
""")
    job = tmp_path / "tune"
    (tmp_path / "meet").mkdir()
    monkeypatch.setenv("FAKE_MEET_DIR", str(tmp_path / "meet"))  # each trainer records how many others run
    tune.run(tune_argv(job, space, fake_trainer, "--max_trials", "6", "--parallel_trials", "2",
                       "--num_epochs", "2"))
    study = load_study(job)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    for t in trials:  # the value is the trial's own metrics.json, which depends on its own flags
        assert t.value == pytest.approx(expected_accuracy(t.params))
        assert Path(t.user_attrs["trial_dir"]) == job / "trials" / str(t.number)
        assert (job / "trials" / str(t.number) / METRICS_FILE).exists()
    # The first trainer waits for a second one; run one after the other, it would wait in vain.
    peers = [json.loads(x)["peers"] for t in trials
             for x in (job / "trials" / str(t.number) / "starts.jsonl").read_text().splitlines() if '"start"' in x]
    assert max(peers) >= 1, f"no two trials ran at the same time: {peers}"

    rows = list(csv.DictReader(open(job / tune_results.RESULTS_CSV)))
    assert len(rows) == 6
    assert {r["trial"] for r in rows} == {str(t.number) for t in trials}
    for r in rows:
        assert float(r["val_accuracy"]) == pytest.approx(study.trials[int(r["trial"])].value)
    best = json.loads((job / tune_results.BEST_TRIAL_JSON).read_text())
    assert best["val_accuracy"] == pytest.approx(max(t.value for t in trials))
    # The best flags, given to the trainer's parser, reproduce the best trial's parameters.
    from trainer.config import parse_config
    config = parse_config([*best["trainer_flags"], "--job_dir", "x"])
    assert config.num_epochs == 2
    assert config.batch_size == best["params"]["batch_size"]
    assert config.l2 == pytest.approx(best["params"]["l2"])
    assert (job / tune_results.PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_search_visits_each_point_once_and_stops(tmp_path, fake_trainer, capsys):
    space = write_space(tmp_path / "s.yaml", """algorithm: grid
early_stopping: false
parameters:
  batch_size: {type: discrete, values: [16, 32]}
  with_color_distort: {type: categorical, values: ["true", "false"]}
""")
    job = tmp_path / "grid"
    tune.run(tune_argv(job, space, fake_trainer, "--max_trials", "10", "--parallel_trials", "2",
                       "--num_epochs", "1"))
    trials = load_study(job).get_trials()
    assert sorted((t.params["batch_size"], t.params["with_color_distort"]) for t in trials) == \
        [(16, "false"), (16, "true"), (32, "false"), (32, "true")]
    out = capsys.readouterr().out
    assert "best: trial" in out and "val_accuracy=0.9200" in out  # batch 32 with colour distortion


def test_median_pruner_stops_hopeless_trials_mid_run(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.1")
    space = write_space(tmp_path / "s.yaml", """algorithm: grid
early_stopping: true
parameters:
  l2: {type: discrete, values: [0.0, 0.05, 0.2]}
  batch_size: {type: discrete, values: [16, 32, 64]}
""")
    job = tmp_path / "prune"
    tune.run(tune_argv(job, space, fake_trainer, "--parallel_trials", "1", "--num_epochs", "4"))
    trials = load_study(job).get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert any(t.params["l2"] == 0.2 for t in pruned), [(t.number, t.state, t.params) for t in trials]
    for t in pruned:
        folder = Path(t.user_attrs["trial_dir"])
        assert not (folder / METRICS_FILE).exists(), "a pruned trainer must be stopped before it finishes"
        assert len((folder / EPOCH_LOG_FILE).read_text().splitlines()) < 4
    best_points = [t for t in trials if t.params["l2"] == 0.0 and t.params["batch_size"] != 16]
    assert all(t.state == TrialState.COMPLETE for t in best_points)  # the best curves never trail


# Three trials in a fixed order, without pruning: for tests about individual trials.
THREE_BATCH_SIZES = """algorithm: grid
early_stopping: false
parameters:
  batch_size: {type: discrete, values: [16, 32, 64]}
"""

def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_BATCH", "32")
    space = write_space(tmp_path / "s.yaml", THREE_BATCH_SIZES)
    job = tmp_path / "fail"
    tune.run(tune_argv(job, space, fake_trainer, "--num_epochs", "1", "--parallel_trials", "1"))
    states = {t.params["batch_size"]: t.state for t in load_study(job).get_trials()}
    assert states == {16: TrialState.COMPLETE, 32: TrialState.FAIL, 64: TrialState.COMPLETE}
    assert "told to fail" in (job / "trials").joinpath(
        next(str(t.number) for t in load_study(job).get_trials() if t.state == TrialState.FAIL), "train.log").read_text()


def test_data_without_a_sidecar_fails_before_any_trial(tmp_path, fake_trainer):
    space = write_space(tmp_path / "s.yaml", THREE_BATCH_SIZES)
    argv = tune_argv(tmp_path / "j", space, fake_trainer)
    argv[argv.index("--data") + 1] = str(tmp_path / "no_such_data")
    with pytest.raises(tune.TuneError, match=r"--data: .*no_such_data/metadata.json does not exist"):
        tune.run(argv)
    assert not (tmp_path / "j").exists()


def test_a_study_whose_every_trial_failed_is_an_error(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_BATCH", "32")
    space = write_space(tmp_path / "s.yaml", "algorithm: grid\nparameters:\n  batch_size: {type: discrete, values: [32]}\n")
    with pytest.raises(tune.TuneError, match=r"none of the 1 trials completed: see .*/trials/<n>/train.log"):
        tune.run(tune_argv(tmp_path / "all_fail", space, fake_trainer, "--num_epochs", "1"))


def test_flags_the_trainer_rejects_fail_before_any_trial(tmp_path, fake_trainer):
    space = write_space(tmp_path / "s.yaml", "parameters:\n  dropout: {type: double, min: 0.0, max: 0.5}\n")
    with pytest.raises(Exception, match="'dropout' is not a tunable trainer flag"):
        tune.run(tune_argv(tmp_path / "j", space, fake_trainer))
    assert not (tmp_path / "j").exists()


def test_a_metric_the_trainer_does_not_write_fails_before_any_trial(tmp_path, fake_trainer):
    space = tmp_path / "s.yaml"
    space.write_text("metric: acuracy\nparameters:\n  l2: {type: double, min: 0.0, max: 0.2}\n")
    with pytest.raises(tune.TuneError, match="metric 'acuracy': the trainer writes \\['val_accuracy', 'val_loss'\\]"):
        tune.run(tune_argv(tmp_path / "j", str(space), fake_trainer))
    assert not (tmp_path / "j").exists()


def _start_tuner(job: Path, space: str, module: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer.tune", *tune_argv(job, space, module, *extra)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _epochs_logged(folder: Path) -> int:
    log = folder / EPOCH_LOG_FILE
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_killed_tuner_resumes_the_interrupted_trial_in_its_folder(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.15")
    space = write_space(tmp_path / "s.yaml", THREE_BATCH_SIZES)
    job = tmp_path / "resume"
    args = ("--num_epochs", "5", "--parallel_trials", "1")
    proc = _start_tuner(job, space, fake_trainer, *args)
    try:  # kill the tuner and its trainer (a crash, not a clean stop) in the middle of trial 1
        _wait_for(lambda: _epochs_logged(job / "trials" / "1") >= 2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    interrupted_params = load_study(job).trials[1].params

    tune.run(tune_argv(job, space, fake_trainer, *args))
    trials = load_study(job).get_trials()
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["interrupted"]
    rerun = [t for t in trials if t.user_attrs.get("resumes") == 1]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE
    assert rerun[0].params == interrupted_params
    assert rerun[0].user_attrs["trial_dir"] == str(job / "trials" / "1")
    starts = [json.loads(x) for x in (job / "trials" / "1" / "starts.jsonl").read_text().splitlines() if "start" in x]
    assert len(starts) == 2 and starts[1]["resumed_at_epoch"] >= 2  # the trainer picked up where it stopped
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["batch_size"] for t in complete) == [16, 32, 64]  # budget: 3, none twice


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may be slow to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the death signal is Linux's prctl")
def test_a_tuner_killed_with_sigkill_leaves_no_trainer_running(tmp_path, fake_trainer, monkeypatch):
    # SIGKILL cannot be caught, so only the kernel can stop the trainers: before, the orphan trained
    # on in its trial folder while a resumed tuner started a second trainer there.
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.5")
    space = write_space(tmp_path / "s.yaml", THREE_BATCH_SIZES)
    job = tmp_path / "kill9"
    proc = _start_tuner(job, space, fake_trainer, "--num_epochs", "40", "--parallel_trials", "2")
    try:
        _wait_for(lambda: _epochs_logged(job / "trials" / "0") >= 1 and _epochs_logged(job / "trials" / "1") >= 1)
        pids = [json.loads((job / "trials" / str(n) / "starts.jsonl").read_text().splitlines()[0])["pid"]
                for n in (0, 1)]
        assert all(_running(pid) for pid in pids)
        proc.kill()  # the tuner only
        proc.wait()
        _wait_for(lambda: not any(_running(pid) for pid in pids), timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left in the group is what should happen
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_stops_trainers_and_exits_130_then_resumes(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.3")
    space = write_space(tmp_path / "s.yaml", "algorithm: grid\nearly_stopping: false\nparameters:\n"
                                             "  batch_size: {type: discrete, values: [16, 32]}\n")
    job = tmp_path / "term"
    proc = _start_tuner(job, space, fake_trainer, "--num_epochs", "4", "--parallel_trials", "2")
    try:
        _wait_for(lambda: _epochs_logged(job / "trials" / "0") >= 1 and _epochs_logged(job / "trials" / "1") >= 1)
        proc.send_signal(signal.SIGTERM)  # the tuner only: it must stop its own trainers
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "rerun the same command to resume" in out
    for n in (0, 1):
        pid = json.loads((job / "trials" / str(n) / "starts.jsonl").read_text().splitlines()[0])["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the trainer is gone, not orphaned
    stopped = [t for t in load_study(job).get_trials() if t.state != TrialState.COMPLETE]
    assert stopped and all(t.user_attrs.get("interrupted") for t in stopped)  # (a busy machine may finish one)
    # One at a time now: the grid must not count the interrupted trials' points as done.
    tune.run(tune_argv(job, space, fake_trainer, "--num_epochs", "4", "--parallel_trials", "1"))
    done = [t for t in load_study(job).get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["trial_dir"] for t in done) == [str(job / "trials" / "0"), str(job / "trials" / "1")]


def test_resuming_with_another_search_space_is_refused(tmp_path, fake_trainer):
    job = tmp_path / "j"
    first = write_space(tmp_path / "a.yaml", "algorithm: grid\nearly_stopping: false\nparameters:\n"
                                             "  batch_size: {type: discrete, values: [16]}\n")
    tune.run(tune_argv(job, first, fake_trainer, "--num_epochs", "1"))
    other = write_space(tmp_path / "b.yaml", "algorithm: grid\nearly_stopping: false\nparameters:\n"
                                             "  batch_size: {type: discrete, values: [32]}\n")
    with pytest.raises(tune.TuneError, match="other"):
        tune.run(tune_argv(job, other, fake_trainer, "--num_epochs", "1"))


def test_a_second_tuner_in_the_same_folder_is_refused(tmp_path, fake_trainer):
    # Its resume would fail the first tuner's running trials and start their trainers a second time.
    space = write_space(tmp_path / "s.yaml", THREE_BATCH_SIZES)
    job = tmp_path / "j"
    with tune.only_tuner_in(job):  # what a running tuner holds
        message = f"another trainer.tune (pid {os.getpid()}) is tuning in {job}"
        with pytest.raises(tune.TuneError, match=re.escape(message)):
            tune.run(tune_argv(job, space, fake_trainer, "--num_epochs", "1"))
    assert not (job / tune.STUDY_FILE).exists()


def test_a_results_write_that_fails_part_way_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from trainer.tuning.search_space import parse_search_space

    space = parse_search_space("parameters:\n  batch_size: {type: discrete, values: [16, 32]}\n")
    study = optuna.create_study(direction="maximize")
    for n, batch in enumerate((16, 32)):
        study.add_trial(optuna.trial.create_trial(
            params={"batch_size": batch}, value=0.5 + n / 10, user_attrs={"trial_dir": f"trials/{n}"},
            distributions={"batch_size": optuna.distributions.CategoricalDistribution([16, 32])}))
    tune_results.write_results(study, space, tmp_path, "val_accuracy")
    before = (tmp_path / tune_results.RESULTS_CSV).read_text()

    class FullDisk:  # the CSV writer calls str() on each value as it writes the row
        def __str__(self):
            raise OSError("no space left on device")

    rows = tune_results.trial_rows(study, space, "val_accuracy")
    rows[-1]["trial_dir"] = FullDisk()
    monkeypatch.setattr(tune_results, "trial_rows", lambda *args: rows)
    with pytest.raises(OSError, match="no space left"):
        tune_results.write_results(study, space, tmp_path, "val_accuracy")
    assert (tmp_path / tune_results.RESULTS_CSV).read_text() == before


def test_two_real_trainer_trials_report_epochs_and_export(tmp_path):
    from tests import trainer_fixtures

    data = tmp_path / "data"
    trainer_fixtures.write_dataset(str(data), trainer_fixtures.make_image_files(str(tmp_path / "img"), per_class=10),
                                   "pixels", image_size=32)
    space = write_space(tmp_path / "s.yaml", "algorithm: grid\nearly_stopping: true\nparameters:\n"
                                             "  l2: {type: discrete, values: [0.0, 0.001]}\n")
    job = tmp_path / "real"
    fixed = ["--model", "linear", "--num_epochs", "2", "--batch_size", "8", "--image_size", "32", "--crop_ratio",
             "1.0", "--with_flip", "false", "--with_color_distort", "false", "--strategy", "one_device"]
    tune.run(["--data", str(data), "--job_dir", str(job), "--search_space", space, "--max_trials", "2",
              "--parallel_trials", "2", "--poll_seconds", "0.2", *fixed])
    trials = load_study(job).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [(job / "trials" / str(t.number) / "train.log")
                                                                    .read_text()[-2000:] for t in trials]
    for t in trials:
        folder = Path(t.user_attrs["trial_dir"])
        metrics = json.loads((folder / METRICS_FILE).read_text())
        assert t.value == pytest.approx(metrics["val_accuracy"])  # the exported weights' accuracy
        assert sorted(t.intermediate_values) == [0, 1]  # one report per epoch, read from the trainer's epochs.jsonl
        assert (folder / "export" / "saved_model.pb").exists()
    rows = list(csv.DictReader(open(job / tune_results.RESULTS_CSV)))
    assert all(r["test_accuracy"] not in ("", None) for r in rows)
