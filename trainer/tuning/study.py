"""The optuna study of a tuning folder: where it is stored, who may run it, what is left to run.

    study.db     the study (SQLite): trials, their parameters, values and attributes
    tuner.lock   held by the running tuner (flock; the kernel drops it when the process dies)

A rerun reopens the study. Trials a stopped tuner left unfinished (Ctrl-C, SIGTERM, kill -9) are
marked failed and queued again with the same parameters, grid point and trial folder, so the
trainer resumes them from its backup; they do not count against the budget.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None
import optuna
from optuna.trial import TrialState

from trainer.tuning.search_space import SearchSpace

STUDY_FILE = "study.db"
STUDY_NAME = "tune"
LOCK_FILE = "tuner.lock"  # holds the running tuner's pid
PRUNER_STARTUP_TRIALS = 4  # finished trials before any pruning: a median of fewer is noise
PRUNER_WARMUP_EPOCHS = 1  # never judge a trial on its first epoch alone


class TuneError(RuntimeError):
    """Tuning cannot start or continue; the message names the file, flag or trial."""


def make_sampler(space: SearchSpace, seed: int, parallel: int) -> optuna.samplers.BaseSampler:
    if space.algorithm == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if space.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: running trials count as bad guesses, so parallel workers do not pick the same point
    return optuna.samplers.TPESampler(seed=seed, constant_liar=parallel > 1)


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    if not space.early_stopping:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS)


class _SqliteStorage(optuna.storages.RDBStorage):
    """optuna starts a queued trial with a read-then-write that SQLite does not lock (it ignores
    SELECT ... FOR UPDATE), so two parallel workers could both start, and run, the same resumed
    trial. One lock per process makes that step atomic; all workers live in this process."""

    _state_lock = threading.Lock()

    def set_trial_state_values(self, trial_id, state, values=None):
        with self._state_lock:
            return super().set_trial_state_values(trial_id, state, values)


@contextlib.contextmanager
def only_tuner_in(job_dir: Path) -> Iterator[None]:
    """Holds job_dir's lock while tuning, so that trials left RUNNING are certainly a dead tuner's.
    The kernel drops the lock when the process dies, kill -9 included."""
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / LOCK_FILE, "a+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise TuneError(f"another trainer.tune (pid {f.read().strip() or '?'}) is tuning in {job_dir}; "
                                f"wait for it to end or use another --job_dir") from None
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
        yield


def open_study(job_dir: Path, space: SearchSpace, fixed_flags: list[str], data: str, seed: int,
               parallel: int) -> optuna.Study:
    """Creates or reopens the study; refuses to mix a different space or fixed flags into it."""
    job_dir.mkdir(parents=True, exist_ok=True)
    storage = _SqliteStorage(f"sqlite:///{job_dir / STUDY_FILE}", engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True,
                                direction="maximize" if space.goal == "maximize" else "minimize",
                                sampler=make_sampler(space, seed, parallel), pruner=make_pruner(space))
    if study.trials:  # resuming: a fresh seed, or a random search would replay the points it already ran
        study.sampler = make_sampler(space, seed + len(study.trials), parallel)
    identity = {"parameters": space.to_dict()["parameters"], "metric": space.metric,
                "algorithm": space.algorithm, "fixed_flags": fixed_flags, "data": data}
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    elif stored != identity:
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        raise TuneError(f"{job_dir} holds a study with other {changed} (stored {[stored.get(k) for k in changed]}, "
                        f"now {[identity[k] for k in changed]}); rerun with the same ones or use a new --job_dir")
    return study


def retry_interrupted(study: optuna.Study) -> list[int]:
    """Fails the trials a dead tuner left RUNNING, and queues every interrupted trial again with its
    parameters, grid point and folder, so the trainer resumes it from its backup; returns the
    numbers queued. Call it holding the job dir's lock, so that no live tuner runs those trials."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        # GridSampler.after_trial may call study.stop(), which optuna refuses outside optimize().
        sampler, study.sampler = study.sampler, optuna.samplers.RandomSampler()
        try:
            for t in running:
                study.tell(t.number, state=TrialState.FAIL)
        finally:
            study.sampler = sampler
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("resumes") for t in trials}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()  # copies params and grid point
    queued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            again = copy.deepcopy(t)
            folder = {"trial_dir": t.user_attrs["trial_dir"]} if "trial_dir" in t.user_attrs else {}
            again.user_attrs = {"resumes": t.number, **folder}
            retry(study, again)
            queued.append(t.number)
    return queued


def trials_spent(study: optuna.Study) -> int:
    """Finished trials that count against the budget (an interrupted one is run again instead)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                      TrialState.FAIL))
               if not t.user_attrs.get("interrupted"))
