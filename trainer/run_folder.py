"""The names inside a training run's folder (`--job_dir`), defined once.

The trainer writes them; a rerun, `trainer.tune` and `trainer.cloud` read them. This module
imports nothing, so the tuner and cloud tools can use it without loading TensorFlow.

  config.json        the flags and what was derived from them and the data
  epochs.jsonl       one line per finished epoch (survives restarts); history.json at the end
  checkpoints/best   the best weights by val_accuracy      backup/   BackupAndRestore's state
  logs/              TensorBoard                           training_curves.png
  trained.json       training finished (evaluation and export may not have)
  metrics.json       validation and test accuracy of the exported weights
  export/            the SavedModel (trainer.export; its files: trainer.serving.contract)
"""
CONFIG_FILE = "config.json"
EPOCH_LOG_FILE = "epochs.jsonl"  # one JSON object per finished epoch: {"epoch", "pid", metrics...}
HISTORY_FILE = "history.json"
BEST_WEIGHTS = "checkpoints/best"  # TF checkpoint format: best.index + best.data-*
BACKUP_DIR = "backup"
LOGS_DIR = "logs"
CURVES_FILE = "training_curves.png"
TRAINED_FILE = "trained.json"  # written when fit returns: a rerun goes straight to evaluation and export
METRICS_FILE = "metrics.json"  # written last: with the export, it marks a finished run
EXPORT_DIR = "export"
