"""Local hyperparameter search with optuna: each trial is a real `python -m trainer.train` run.

    python -m trainer.tune --data out/ --job_dir runs/t1 [--search_space search.yaml] \\
        [--max_trials 20] [--parallel_trials 2] [fixed trainer flags, e.g. --num_epochs 5]

The search space is the same YAML file `trainer.cloud tune` sends to Vertex AI (default: the
book's). Algorithms: bayesian (optuna's TPE), grid, random. With `early_stopping: true`, a
median pruner stops a trial whose per-epoch val_accuracy (read from the trainer's epochs.jsonl)
trails the median of earlier trials at the same epoch.

The job dir holds:
  study.db, tuner.lock    the optuna study and the running tuner's lock (see trainer.tuning.study)
  trials/<n>/             trial n's own trainer job dir (and train.log, its output)
  results.csv, best_trial.json, accuracy_vs_params.png   (see trainer.tuning.results)

Rerunning the same command resumes the study, interrupted trials included, each in its own folder.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import optuna
from optuna.trial import TrialState

from trainer import epoch_log
from trainer.run_folder import EPOCH_LOG_FILE, METRICS_FILE
from trainer.tuning import results as tune_results
from trainer.tuning.study import STUDY_FILE, STUDY_NAME  # noqa: F401 - where scripts load the study from
from trainer.tuning.study import TuneError, only_tuner_in, open_study, retry_interrupted, trials_spent
from trainer.tuning.search_space import (SearchSpace, SearchSpaceError, check_against_trainer, join_flag_values,
                                  load_search_space, to_trial_flags)

TRIALS_DIR = "trials"
TRAINER_LOG = "train.log"
USAGE_ERROR = 2  # argparse's exit code: the flags are wrong, so every trial would fail the same way
# What a trial can be judged on: the trainer writes these each epoch (for the pruner) and for the
# exported weights (metrics.json); `accuracy`, Vertex AI's tag, stands for val_accuracy.
LOCAL_METRICS = ("val_accuracy", "val_loss")


# Looked up once here: the child calls it between fork and exec, where it should do as little as it can.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _dies_with(parent_pid: int):
    """A preexec_fn for a trainer (Linux; None elsewhere): SIGTERM when the tuner's thread that
    started it dies, kill -9 and the OOM killer included, so no orphan trains on in a trial folder."""
    if _PRCTL is None:
        return None

    def set_death_signal():
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the tuner died before the signal was set
            os._exit(1)
    return set_death_signal


class TuneInterrupted(TuneError):
    """Stopped by a signal; the results so far are written and a rerun resumes."""


class TrialFailed(RuntimeError):
    """One trial's trainer failed; the study records it and goes on."""


class TrialInterrupted(RuntimeError):
    """The tuner is stopping (Ctrl-C, SIGTERM); the trial is run again, in its folder, on resume."""


def make_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.tune", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag is passed unchanged to every trial's trainer.")
    p.add_argument("--data", required=True, help="ETL output folder")
    p.add_argument("--job_dir", "--job-dir", dest="job_dir", required=True, help="tuning folder; rerun to resume")
    p.add_argument("--search_space", default=None, help="YAML search space; default: the book's")
    p.add_argument("--max_trials", type=int, default=None, help="total budget; default: the search space's")
    p.add_argument("--parallel_trials", type=int, default=None, help="trainer processes at once; default: the space's")
    p.add_argument("--algorithm", choices=("bayesian", "grid", "random"), default=None,
                   help="default: the search space's")
    p.add_argument("--sampler_seed", type=int, default=0, help="seed of the sampler (the trainer has its own --seed)")
    p.add_argument("--trainer_module", default="trainer.train", help=argparse.SUPPRESS)  # tests use a fake
    p.add_argument("--poll_seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def metric_key(space: SearchSpace) -> str:
    """The metrics.json / epochs.jsonl key that stands for the space's metric locally."""
    return "val_accuracy" if space.metric == "accuracy" else space.metric


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict:
    params = {}
    for p in space.parameters:
        if p.type == "double":
            params[p.name] = trial.suggest_float(p.name, p.min, p.max, log=p.scale == "log")
        elif p.type == "integer":
            params[p.name] = trial.suggest_int(p.name, int(p.min), int(p.max), log=p.scale == "log")
        else:
            params[p.name] = trial.suggest_categorical(p.name, list(p.values))
    return params


def read_epoch_values(trial_dir: Path, key: str) -> list[tuple[int, float]]:
    """(epoch, value) pairs the trainer has logged so far."""
    path = trial_dir / EPOCH_LOG_FILE
    return epoch_log.metric_by_epoch(path.read_text(), key) if path.exists() else []


class TrialRunner:
    """The optuna objective: runs the trainer in its own folder, reports epochs, prunes, reads metrics."""

    def __init__(self, job_dir: Path, data: str, space: SearchSpace, fixed_flags: list[str],
                 trainer_module: str, poll_seconds: float):
        self.job_dir, self.data, self.space, self.fixed_flags = job_dir, data, space, fixed_flags
        self.trainer_module, self.poll_seconds = trainer_module, poll_seconds
        self.key = metric_key(space)
        self.usage_error: str | None = None
        self.stop = threading.Event()  # set by the signal handler; every trial then winds down
        self._lock = threading.Lock()

    def command(self, trial_dir: Path, params: dict) -> list[str]:
        return [sys.executable, "-m", self.trainer_module, f"--data={self.data}", f"--job_dir={trial_dir}",
                *self.fixed_flags, *to_trial_flags(params)]

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.space)
        trial_dir = Path(trial.user_attrs.get("trial_dir") or self.job_dir / TRIALS_DIR / str(trial.number))
        trial.set_user_attr("trial_dir", str(trial_dir))
        # Until the trainer ends on its own: a signal or a dead tuner leaves it set, and the trial is retried.
        trial.set_user_attr("interrupted", True)
        try:
            value = self._run_trainer(trial, trial_dir, params)
        except (TrialInterrupted, KeyboardInterrupt):
            raise
        except BaseException:  # failed or pruned: a result, not an interruption
            trial.set_user_attr("interrupted", False)
            raise
        trial.set_user_attr("interrupted", False)
        return value

    def _run_trainer(self, trial: optuna.Trial, trial_dir: Path, params: dict) -> float:
        trial_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(trial_dir, params)
        trial.set_user_attr("command", cmd[1:])
        with open(trial_dir / TRAINER_LOG, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                    preexec_fn=_dies_with(os.getpid()))
            try:
                reported = self._watch(trial, proc, trial_dir)
            except BaseException:
                if proc.poll() is None:  # pruned, or the tuner is being interrupted
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                raise
        if proc.returncode != 0 and self.stop.is_set():  # Ctrl-C reaches the trainer too
            raise TrialInterrupted(f"trial {trial.number} interrupted")
        if proc.returncode != 0:
            tail = (trial_dir / TRAINER_LOG).read_text(errors="replace").splitlines()[-15:]
            if proc.returncode == USAGE_ERROR:
                with self._lock:
                    self.usage_error = "\n".join(tail)
            raise TrialFailed(f"trial {trial.number}: trainer exited with {proc.returncode}; "
                              f"see {trial_dir / TRAINER_LOG}:\n" + "\n".join(tail))
        metrics_path = trial_dir / METRICS_FILE
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrialFailed(f"trial {trial.number}: no readable {metrics_path}: {e}") from e
        if self.key not in metrics:
            raise TrialFailed(f"trial {trial.number}: {metrics_path} has no {self.key!r}: {sorted(metrics)}")
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                trial.set_user_attr(f"metric_{name}", value)
        trial.set_user_attr("epochs_reported", reported)
        return float(metrics[self.key])

    def _watch(self, trial: optuna.Trial, proc: subprocess.Popen, trial_dir: Path) -> int:
        """Relays each new epoch's value to optuna until the trainer exits; prunes when told to."""
        reported = set()
        while True:
            if self.stop.is_set():
                raise TrialInterrupted(f"trial {trial.number} interrupted")
            finished = proc.poll() is not None
            for epoch, value in read_epoch_values(trial_dir, self.key):
                if epoch not in reported:
                    trial.report(value, epoch)
                    reported.add(epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"trial {trial.number}: {self.key} {value:.4f} at epoch "
                                                 f"{epoch + 1} trails the median")
            if finished:
                return len(reported)
            time.sleep(self.poll_seconds)


def run(argv: Sequence[str] | None = None) -> optuna.Study:
    """Runs (or resumes) the search; writes the results; returns the study."""
    ns, trainer_flags = make_arg_parser().parse_known_args(argv)
    fixed_flags = join_flag_values(trainer_flags)
    space = load_search_space(ns.search_space)
    if ns.algorithm:
        space = dataclasses.replace(space, algorithm=ns.algorithm)
    max_trials = ns.max_trials if ns.max_trials is not None else space.max_trials
    parallel = ns.parallel_trials if ns.parallel_trials is not None else space.parallel_trials
    if max_trials <= 0 or parallel <= 0:
        raise TuneError(f"--max_trials and --parallel_trials must be positive, got {max_trials}, {parallel}")
    if space.algorithm == "grid":
        max_trials = min(max_trials, space.grid_size())  # a grid has no more points to try
    if metric_key(space) not in LOCAL_METRICS:  # else every trial trains to the end, then fails
        raise TuneError(f"metric {space.metric!r}: the trainer writes {list(LOCAL_METRICS)} per epoch and for "
                        f"the exported weights (`accuracy` stands for val_accuracy), not {metric_key(space)!r}")
    check_against_trainer(space, fixed_flags)
    from trainer.config import parse_config
    try:
        parse_config([f"--data={ns.data}", f"--job_dir={ns.job_dir}", *fixed_flags])
    except SystemExit:
        raise TuneError(f"the trainer rejects the fixed flags {fixed_flags} (see above)") from None
    from shared import metadata
    try:  # once here, rather than once per trial in every trainer's log
        metadata.read_metadata(ns.data)
    except metadata.DatasetError as e:
        raise TuneError(f"--data: {e}") from None

    job_dir = Path(ns.job_dir)
    with only_tuner_in(job_dir):
        study = open_study(job_dir, space, fixed_flags, ns.data, ns.sampler_seed, parallel)
        retried = retry_interrupted(study)
        spent = trials_spent(study)
        remaining = max(0, max_trials - spent)
        print(f"tune: {spent} trial(s) done, {remaining} to run ({parallel} at a time)"
              + (f"; resuming interrupted trial(s) {retried}" if retried else ""), flush=True)
        runner = TrialRunner(job_dir, ns.data, space, fixed_flags, ns.trainer_module, ns.poll_seconds)
        while remaining and not (runner.stop.is_set() or runner.usage_error):
            run_trials(study, runner, remaining, parallel)
            # GridSampler stops the study once every point has been tried, counting an interrupted
            # trial's point as tried: its retry may still be waiting.
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            remaining = max(0, max_trials - trials_spent(study)) if waiting else 0
        if runner.usage_error:
            raise TuneError(f"the trainer rejected its flags; stopped tuning:\n{runner.usage_error}")
        tune_results.write_results(study, space, job_dir, runner.key)
    if runner.stop.is_set():
        raise TuneInterrupted(f"interrupted; rerun the same command to resume the study in {job_dir}")
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        raise TuneError(f"none of the {len(study.trials)} trials completed: see {job_dir}/trials/<n>/{TRAINER_LOG}")
    return study


def run_trials(study: optuna.Study, runner: TrialRunner, n_trials: int, parallel: int) -> None:
    """Runs n_trials trials, `parallel` at a time; Ctrl-C or SIGTERM stops them all (resumable)."""

    def stop_if_asked(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if runner.usage_error or runner.stop.is_set():
            study_.stop()

    def print_trial(study_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        print(f"tune: trial {trial.number} {trial.state.name.lower()} {runner.key}={value} {trial.params}",
              flush=True)

    def request_stop(signum, frame) -> None:
        print(f"tune: signal {signum}: stopping the running trials; rerun the same command to resume",
              file=sys.stderr, flush=True)
        runner.stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    try:
        study.optimize(runner, n_trials=n_trials, n_jobs=parallel, catch=(TrialFailed, TrialInterrupted),
                       callbacks=[stop_if_asked, print_trial], gc_after_trial=False)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed instead
    try:
        run()
    except TuneInterrupted as e:
        print(f"trainer.tune: {e}", file=sys.stderr)
        sys.exit(130)  # the shell's code for Ctrl-C
    except (TuneError, SearchSpaceError) as e:
        print(f"trainer.tune: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
