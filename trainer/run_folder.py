"""The names inside a training run's folder (`--job_dir`), defined once.

The trainer writes them; a rerun, `trainer.tune` and `trainer.cloud` read them. This module
loads TensorFlow only inside its file functions, so the tuner and cloud tools can import it.

  config.json        the flags and what was derived from them and the data
  epochs.jsonl       one line per finished epoch (survives restarts); history.json at the end
  checkpoints/best   the best weights by val_accuracy      backup/   BackupAndRestore's state
  logs/              TensorBoard                           training_curves.png
  trained.json       training finished (evaluation and export may not have)
  metrics.json       validation and test accuracy of the exported weights
  export/            the SavedModel (trainer.export; its files: trainer.serving.contract)
  head/              --fine_tune_layers: the head-only first stage, a run folder of its own
"""
from __future__ import annotations

import json

CONFIG_FILE = "config.json"
EPOCH_LOG_FILE = "epochs.jsonl"  # one JSON object per finished epoch; its format: trainer.epoch_log
HISTORY_FILE = "history.json"
BEST_WEIGHTS = "checkpoints/best"  # TF checkpoint format: best.index + best.data-*
BACKUP_DIR = "backup"
LOGS_DIR = "logs"
CURVES_FILE = "training_curves.png"
TRAINED_FILE = "trained.json"  # written when fit returns: a rerun goes straight to evaluation and export
METRICS_FILE = "metrics.json"  # written last: with the export, it marks a finished run
EXPORT_DIR = "export"
HEAD_STAGE_DIR = "head"  # trainer.fine_tune: the first stage warm-starts the run from here


def write_whole(path: str, text: str) -> None:
    """Writes `text` to `path` (local, gs://, ram://) as a temporary file renamed over it, so a kill
    mid-write leaves the old file or none, never part of one (a GCS upload is whole by itself)."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        f.write(text)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def write_json(path: str, body) -> None:
    write_whole(path, json.dumps(body, indent=2) + "\n")


def read_json(path: str, if_unreadable: str):
    """The JSON value in `path`; ValueError naming the file and what to do (`if_unreadable`) when it
    does not parse (a kill mid-write by an older version, or an edit)."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {if_unreadable}") from None
