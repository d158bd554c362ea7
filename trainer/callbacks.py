"""The Keras callbacks of a run, and the per-epoch log that lets a restarted run pick up its state.

BackupAndRestore brings back the weights, the optimiser and the epoch counter after a crash,
but not the other callbacks' memory: a fresh ModelCheckpoint would overwrite the best
checkpoint with a worse epoch, and a fresh EarlyStopping would forget its patience. Both are
seeded here from `epochs.jsonl`, which the chief appends to after every epoch.
"""
from __future__ import annotations

import json
import logging
import math
import os

import tensorflow as tf
import tf_keras as keras

from trainer import epoch_log
from trainer import hypertune_report
from trainer.run_folder import BACKUP_DIR, BEST_WEIGHTS, EPOCH_LOG_FILE, LOGS_DIR, write_whole

MONITOR = "val_accuracy"
BACKUP_SAVE_FREQ = "epoch"  # BackupAndRestore's: train.restored_epochs reads its checkpoint the same way


def read_epoch_log(job_dir: str) -> list[dict]:
    """Finished epochs in order; a re-run epoch (crash after logging, before the backup) keeps its last entry."""
    path = os.path.join(job_dir, EPOCH_LOG_FILE)
    if not tf.io.gfile.exists(path):
        return []
    by_epoch = {}
    with tf.io.gfile.GFile(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} is not valid JSON at line {number} ({e}); delete that line and rerun "
                                     f"(the epoch is trained again unless the backup holds it)") from None
                by_epoch[entry["epoch"]] = entry
    return [by_epoch[k] for k in sorted(by_epoch)]


def history_from_log(entries: list[dict]) -> dict[str, list[float]]:
    """The shape of Keras's History.history, over every epoch of the run (across restarts)."""
    keys = epoch_log.metric_names(entries[0]) if entries else []
    return {k: [e.get(k) for e in entries] for k in keys}


class EpochLog(keras.callbacks.Callback):
    """Appends each finished epoch's metrics to `epochs.jsonl`; a NaN loss is an error, not a result."""

    def __init__(self, job_dir: str, write: bool):
        super().__init__()
        self.path = os.path.join(job_dir, EPOCH_LOG_FILE)
        self.write = write

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if not math.isfinite(logs.get("loss", 0.0)):
            raise FloatingPointError(f"epoch {epoch + 1}: training loss is {logs['loss']}; "
                                     f"lower --lrate (now {keras.backend.get_value(self.model.optimizer.learning_rate):g})")
        if self.write:
            if MONITOR in logs:  # lets Vertex AI stop an unpromising tuning trial early (no-op elsewhere)
                hypertune_report.report_metric(logs[MONITOR], epoch + 1)
            line = epoch_log.entry_line(epoch, logs)
            # GFile has no append on every filesystem: the small file is written again, whole.
            old = tf.io.gfile.GFile(self.path).read() if tf.io.gfile.exists(self.path) else ""
            write_whole(self.path, old + line)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping on MONITOR whose patience counter survives a restart (seeded from the epoch log)."""

    def __init__(self, patience: int, previous: list[dict]):
        super().__init__(monitor=MONITOR, mode="max", patience=patience, restore_best_weights=False)
        self.previous = previous

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for entry in self.previous:
            value = entry.get(MONITOR)
            if value is None:
                continue
            if self._is_improvement(value, self.best):
                self.best, self.best_epoch, self.wait = value, entry["epoch"], 0
            else:
                self.wait += 1


def best_so_far(previous: list[dict]) -> float | None:
    values = [e[MONITOR] for e in previous if e.get(MONITOR) is not None]
    return max(values) if values else None


def make_callbacks(job_dir: str, patience: int, is_chief: bool, restored_epochs: int,
                   profile_batches: tuple[int, int] | None = None) -> list[keras.callbacks.Callback]:
    """Backup (resume after a crash), best checkpoint, early stopping, TensorBoard, epoch log.

    `restored_epochs`: how many epochs the backup holds (0 for a new run); early stopping and the
    best checkpoint are seeded with those epochs' log lines only. `profile_batches`: the training
    steps (first, last) that TensorBoard's profiler records, or None.

    Under multi-worker, Keras's own callbacks write the non-chief workers' copies to temporary
    folders that it deletes; our epoch log is written by the chief only, and every worker seeds
    its early stopping from it, so that all of them stop after the same epoch.
    """
    # Order matters after a crash: the epoch log is written before the backup, so a crash between
    # the two re-runs that epoch (read_epoch_log keeps its last entry) instead of losing its line;
    # its old line is not replayed, or early stopping would count that epoch twice.
    previous = [e for e in read_epoch_log(job_dir) if e["epoch"] < restored_epochs]
    return [
        keras.callbacks.ModelCheckpoint(os.path.join(job_dir, BEST_WEIGHTS), monitor=MONITOR, mode="max",
                                        save_best_only=True, save_weights_only=True,
                                        initial_value_threshold=best_so_far(previous)),
        ResumableEarlyStopping(patience, previous),
        *make_tensorboard_callback(job_dir, profile_batches),
        EpochLog(job_dir, write=is_chief),
        keras.callbacks.BackupAndRestore(os.path.join(job_dir, BACKUP_DIR), save_freq=BACKUP_SAVE_FREQ),
    ]


def make_tensorboard_callback(job_dir: str, profile_batches: tuple[int, int] | None = None
                              ) -> list[keras.callbacks.Callback]:
    """[TensorBoard(<job_dir>/logs)], or [] with a warning when the tensorboard package is absent
    (TF 2.21 no longer installs it, and tf.summary then fails at the first epoch).

    `profile_batches` (first, last): the profiler traces those training steps, counted from 1 at the
    start of this process's training, into logs/plugins/profile/<time>/*.xplane.pb; TensorBoard's
    Profile tab shows them once `tensorboard-plugin-profile` is installed beside it.
    """
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if profile_batches:
            raise ValueError("--profile_batches writes TensorBoard's profile, and tensorboard is not installed: "
                             "pip install tensorboard, or drop --profile_batches") from None
        logging.warning("tensorboard is not installed: no %s/logs (pip install tensorboard)", job_dir)
        return []
    if profile_batches:
        logging.info("profiling training steps %d to %d into %s", *profile_batches,
                     os.path.join(job_dir, LOGS_DIR, "plugins", "profile"))
    return [keras.callbacks.TensorBoard(os.path.join(job_dir, LOGS_DIR), profile_batch=profile_batches or 0)]
