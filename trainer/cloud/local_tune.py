"""Runs a Vertex AI HyperparameterTuningJob on this machine, trial by trial, as the tuning service would.

Each trial is the trial job spec run by trainer.cloud.local_run with the service's environment: its
id (CLOUD_ML_TRIAL_ID, and "trial" in TF_CONFIG and CLUSTER_SPEC, numbered from 1), its own
AIP_MODEL_DIR (<baseOutputDirectory>/<trial>/model/), a hypertune metric file
(CLOUD_ML_HP_METRIC_FILE, here <job_dir>/<trial>/hypertune/output.metrics), and its parameter
values appended to the command as `--name=value` (DISCRETE values as floats, "16.0", as Vertex passes
them). Up to parallelTrialCount trials run at once. A trial's result is read back as the service
reads it: the last value reported under the study's metric tag in that file (cloudml-hypertune's
JSON lines).

The search is not Vertex AI's: GRID_SEARCH walks the grid in order; every other algorithm
(Bayesian included) draws values at random (seeded), so a local study shows that trials run and
report, not which values Vertex would try.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import threading
from typing import TextIO

from google.cloud import aiplatform_v1 as aip

from trainer.cloud import local_run

METRIC_FILE = "hypertune/output.metrics"  # cloudml-hypertune's default file name (/tmp/hypertune/output.metrics)


@dataclasses.dataclass
class TrialResult:
    trial: str
    parameters: dict[str, str]
    state: str = "ACTIVE"  # SUCCEEDED, FAILED, INFEASIBLE (no metric reported) or STOPPED, as Vertex AI names them
    metric: float | None = None
    error: str | None = None


def value_kind(spec: aip.StudySpec.ParameterSpec) -> str:
    """double_value_spec, integer_value_spec, categorical_value_spec or discrete_value_spec."""
    return type(spec).pb(spec).WhichOneof("parameter_value_spec")


def format_value(spec: aip.StudySpec.ParameterSpec, value) -> str:
    """A parameter value as Vertex AI writes it on the command line."""
    kind = value_kind(spec)
    if kind == "integer_value_spec":
        return str(int(value))
    if kind == "categorical_value_spec":
        return str(value)
    return repr(float(value))  # double, and discrete ("16.0")


def _grid_values(spec: aip.StudySpec.ParameterSpec) -> list:
    kind = value_kind(spec)
    if kind == "discrete_value_spec":
        return list(spec.discrete_value_spec.values)
    if kind == "categorical_value_spec":
        return list(spec.categorical_value_spec.values)
    if kind == "integer_value_spec":
        return list(range(spec.integer_value_spec.min_value, spec.integer_value_spec.max_value + 1))
    raise local_run.LocalRunError(f"parameter {spec.parameter_id}: a grid needs listed values, not a double range")


def _draw(spec: aip.StudySpec.ParameterSpec, rng: random.Random):
    kind = value_kind(spec)
    log = spec.scale_type == aip.StudySpec.ParameterSpec.ScaleType.UNIT_LOG_SCALE
    if kind in ("discrete_value_spec", "categorical_value_spec"):
        return rng.choice(list(getattr(spec, kind).values))
    if kind == "integer_value_spec":
        lo, hi = spec.integer_value_spec.min_value, spec.integer_value_spec.max_value
        return round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if log else rng.randint(lo, hi)
    lo, hi = spec.double_value_spec.min_value, spec.double_value_spec.max_value
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) if log else rng.uniform(lo, hi)


def choose_trials(study: aip.StudySpec, max_trials: int, seed: int = 0) -> list[dict[str, str]]:
    """Each trial's parameter values, formatted: the grid in order for GRID_SEARCH, else random draws."""
    params = list(study.parameters)
    if study.algorithm == aip.StudySpec.Algorithm.GRID_SEARCH:
        grid = itertools.product(*(_grid_values(p) for p in params))
        return [{p.parameter_id: format_value(p, v) for p, v in zip(params, point)}
                for point in itertools.islice(grid, max_trials)]
    rng = random.Random(seed)
    return [{p.parameter_id: format_value(p, _draw(p, rng)) for p in params} for _ in range(max_trials)]


def read_reported_metric(path: str, tag: str) -> float | None:
    """The last value reported under `tag` in a cloudml-hypertune metric file; None if none was."""
    value = None
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    if tag in entry:
                        value = float(entry[tag])
    except FileNotFoundError:
        return None
    return value


class _LockedWriter:
    """Trials run in threads; their lines must not interleave mid-line."""

    def __init__(self, out: TextIO):
        self.out, self.lock = out, threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.out.write(text)

    def flush(self) -> None:
        with self.lock:
            self.out.flush()


def run_trial(job: aip.HyperparameterTuningJob, result: TrialResult, job_id: str, job_dir: str, out,
              timeout: float | None, stop: threading.Event) -> TrialResult:
    log_dir = local_run.replica_log_dir(job_dir, result.trial)
    metric_file = os.path.join(os.path.dirname(log_dir), METRIC_FILE)
    if os.path.exists(metric_file):
        os.remove(metric_file)  # a previous local run's reports are not this trial's
    tag = job.study_spec.metrics[0].metric_id
    replicas = local_run.plan_replicas(job.trial_job_spec, job_id, log_dir, trial=result.trial,
                                       trial_args=[f"--{k}={v}" for k, v in result.parameters.items()],
                                       metric_file=os.path.abspath(metric_file))
    try:
        local_run.run_replicas(replicas, out, timeout, stop, label=f"trial {result.trial}: ")
    except local_run.LocalRunError as e:
        result.state, result.error = ("STOPPED" if stop.is_set() else "FAILED"), str(e).splitlines()[0]
        return result
    result.metric = read_reported_metric(metric_file, tag)
    if result.metric is None:
        result.state, result.error = "INFEASIBLE", f"no {tag!r} reported in {metric_file}"
    else:
        result.state = "SUCCEEDED"
    return result


def run_study(job: aip.HyperparameterTuningJob, job_id: str, job_dir: str, out: TextIO = sys.stdout,
              seed: int = 0, timeout: float | None = None) -> list[TrialResult]:
    """Runs up to maxTrialCount trials, parallelTrialCount at a time; prints a table of them.
    LocalRunError if every trial failed, or as many as maxFailedTrialCount (when it is not 0)."""
    out = _LockedWriter(out)
    trials = [TrialResult(str(i), params) for i, params in
              enumerate(choose_trials(job.study_spec, job.max_trial_count, seed), start=1)]
    out.write(f"# local study {job_id}: {len(trials)} trial(s), {job.parallel_trial_count} at a time; "
              f"parameters {'from the grid' if job.study_spec.algorithm.name == 'GRID_SEARCH' else 'drawn at random'}"
              f" (Vertex AI's own search is not run here)\n")
    stop = threading.Event()
    failed = 0
    waiting = iter(trials)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, job.parallel_trial_count)) as pool:
        def start_next() -> set:
            trial = next(waiting, None)
            return set() if trial is None else {pool.submit(run_trial, job, trial, job_id, job_dir, out, timeout, stop)}

        running = set().union(*(start_next() for _ in range(max(1, job.parallel_trial_count))))
        try:
            while running:
                done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    out.write(f"trial {result.trial}: {result.state}"
                              f"{'' if result.metric is None else f' {result.metric:.4f}'}"
                              f"{'' if result.error is None else f' ({result.error})'}\n")
                    failed += result.state in ("FAILED", "INFEASIBLE")
                    if job.max_failed_trial_count and failed >= job.max_failed_trial_count:
                        stop.set()  # Vertex AI fails the job and stops the trials still running
                    elif not stop.is_set():
                        running |= start_next()
        except BaseException:
            stop.set()
            raise
    for t in trials:
        if t.state == "ACTIVE":
            t.state = "STOPPED"  # never started
    out.write(format_trials_table(job, trials))
    if job.max_failed_trial_count and failed >= job.max_failed_trial_count:
        raise local_run.LocalRunError(f"{failed} trial(s) failed: the study stops at maxFailedTrialCount "
                                      f"{job.max_failed_trial_count}, as Vertex AI's would")
    if not any(t.state == "SUCCEEDED" for t in trials):
        raise local_run.LocalRunError(f"no trial succeeded; the replicas' logs are under {job_dir}/<trial>/replicas")
    return trials


def format_trials_table(job: aip.HyperparameterTuningJob, trials: list[TrialResult]) -> str:
    """The trials as columns: id, state, the metric, then each parameter; and the best trial."""
    metric = job.study_spec.metrics[0]
    names = [p.parameter_id for p in job.study_spec.parameters]
    header = ["trial", "state", metric.metric_id, *names]
    rows = [[t.trial, t.state, "" if t.metric is None else f"{t.metric:.4f}", *(t.parameters.get(n, "") for n in names)]
            for t in trials]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    done = [t for t in trials if t.metric is not None]
    if done:
        maximize = metric.goal == aip.StudySpec.MetricSpec.GoalType.MAXIMIZE
        best = (max if maximize else min)(done, key=lambda t: t.metric)
        lines.append(f"best: trial {best.trial} ({metric.metric_id} {best.metric:.4f}, "
                     f"{'maximize' if maximize else 'minimize'})")
    return "\n".join(lines) + "\n"
