"""Reports the tuning metric to Vertex AI the way it reads it: the `cloudml-hypertune` package.

Vertex AI's tuning service reads the file that `hypertune` writes (CLOUD_ML_HP_METRIC_FILE,
default /tmp/hypertune/output.metrics) and takes the last value reported under the tag named in
the study spec (`metric` in the search space; `accuracy` by default). Outside a Vertex trial
this is a no-op, so local runs leave no stray files in /tmp.
"""
from __future__ import annotations

import os
from typing import Mapping

METRIC_TAG = "accuracy"  # the search space's default `metric`; Vertex matches it by name
# Vertex sets these in every hyperparameter-tuning trial (and only there).
VERTEX_TRIAL_ENV = ("CLOUD_ML_HP_METRIC_FILE", "CLOUD_ML_TRIAL_ID")


def running_in_vertex_trial(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return any(environ.get(name) for name in VERTEX_TRIAL_ENV)


def report_metric(accuracy: float, step: int, tag: str = METRIC_TAG) -> bool:
    """Reports `accuracy` at `step` (an epoch count) to a Vertex AI trial; returns whether it did.

    Call it once after export with the exported weights' validation accuracy (the final value is
    the trial's result); per-epoch calls before that let Vertex stop unpromising trials early.
    """
    if not running_in_vertex_trial():
        return False
    accuracy = float(accuracy)
    if accuracy != accuracy:  # NaN: Vertex would record it as the trial's result
        raise ValueError(f"refusing to report a NaN {tag} at step {step}")
    _reporter().report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag=tag, metric_value=accuracy, global_step=int(step))
    return True


_REPORTERS: dict = {}


def _reporter():
    """One HyperTune per metric file: each instance rewrites the file from its own queue, so a
    fresh one per call would keep only the last report."""
    import hypertune  # the cloudml-hypertune package; only needed inside a trial

    path = os.environ.get("CLOUD_ML_HP_METRIC_FILE", "")
    if path not in _REPORTERS:
        _REPORTERS[path] = hypertune.HyperTune()
    return _REPORTERS[path]
