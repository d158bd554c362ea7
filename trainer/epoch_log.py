"""The line format of a run's per-epoch log (`run_folder.EPOCH_LOG_FILE`), defined once.

The trainer writes one line per finished epoch (callbacks.EpochLog) and resumes from them;
trainer.tune reads them to prune trials. TensorFlow-free, so the tuner (and its tests' fake
trainer) use this code without loading TF.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

EPOCH = "epoch"  # 0-based, as Keras counts
PID = "pid"  # the process that wrote the line: a restart shows as a new pid


def entry_line(epoch: int, metrics: Mapping[str, float]) -> str:
    """One line of the log: the epoch, this process's pid, then Keras's logs (loss, val_accuracy, ...)."""
    return json.dumps({EPOCH: epoch, PID: os.getpid(), **metrics}) + "\n"


def metric_names(entry: Mapping) -> list[str]:
    """The metrics an entry holds, in its order."""
    return [k for k in entry if k not in (EPOCH, PID)]


def metric_by_epoch(text: str, key: str) -> list[tuple[int, float]]:
    """(epoch, value of `key`) in epoch order; a re-run epoch keeps its last value, and a line that
    does not parse (a copy caught mid-write) is skipped."""
    out = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in entry and EPOCH in entry:
            out[int(entry[EPOCH])] = float(entry[key])
    return sorted(out.items())
