"""Saving state: kill -9 mid-run and rerun the same command -> it resumes; state survives the restart."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
import tf_keras

from tests import trainer_fixtures as fx
from trainer import callbacks, config as config_lib, run_folder, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pixels_dir(tmp_path_factory):
    images = fx.make_image_files(str(tmp_path_factory.mktemp("images")), per_class=10)
    out = str(tmp_path_factory.mktemp("pixels"))
    fx.write_dataset(out, images, "pixels")
    return out


@pytest.mark.slow
def test_kill_9_during_epoch_2_then_rerun_resumes_and_finishes(tmp_path, pixels_dir):
    job = str(tmp_path / "run")
    # Virtual epochs of 1,200 steps (~3-6 s each) give the kill time to land inside epoch 2.
    argv = fx.trainer_argv(pixels_dir, job, model="dnn", num_epochs=4, num_training_examples=9600, patience=10,
                           lrate=0.001)
    command = [sys.executable, "-m", "trainer.train", *argv]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and first.poll() is None:
            if len(callbacks.read_epoch_log(job)) >= 1 and train._backup_exists(job):
                break  # epoch 1 is logged and its backup complete: we are in epoch 2
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert len(callbacks.read_epoch_log(job)) == 1, "the kill did not land in epoch 2"
    assert not os.path.exists(os.path.join(job, run_folder.EXPORT_DIR))

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    # a new stream and new augmentation draws, not epoch 1's again
    assert "holds 1 epoch(s): resuming the interrupted run, input and augmentation seeded with 43" in second.stderr
    assert "Epoch 1/4" not in second.stdout and "Epoch 2/4" in second.stdout, second.stdout[-2000:]
    entries = callbacks.read_epoch_log(job)
    assert [e["epoch"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["pid"] == first.pid and {e["pid"] for e in entries[1:]} == {entries[1]["pid"]} != {first.pid}
    metrics = json.load(open(os.path.join(job, run_folder.METRICS_FILE)))
    assert metrics["epochs_run"] == 4
    assert len(json.load(open(os.path.join(job, run_folder.HISTORY_FILE)))["loss"]) == 4
    assert os.path.exists(os.path.join(job, run_folder.EXPORT_DIR, "saved_model.pb"))


def test_resuming_with_other_flags_is_refused(tmp_path, pixels_dir):
    job = tmp_path / "run"
    (job / "backup" / "chief").mkdir(parents=True)  # what an interrupted run leaves: a checkpoint
    import tensorflow as tf

    tf.train.Checkpoint(v=tf.Variable(1)).save(str(job / "backup" / "chief" / "ckpt"))
    old = config_lib.parse_config(fx.trainer_argv(pixels_dir, str(job)))
    (job / run_folder.CONFIG_FILE).write_text(json.dumps({"flags": json.loads(old.to_json())}))
    new = config_lib.parse_config(fx.trainer_argv(pixels_dir, str(job), lrate=0.5))
    with pytest.raises(ValueError, match=r"other flags .*'lrate': \(0.01, 0.5\)"):
        train.train_and_export(new)


def test_early_stopping_and_best_checkpoint_remember_the_epochs_before_a_restart():
    previous = [{"epoch": 0, "val_accuracy": 0.5}, {"epoch": 1, "val_accuracy": 0.8},
                {"epoch": 2, "val_accuracy": 0.7}]
    stopper = callbacks.ResumableEarlyStopping(patience=2, previous=previous)
    stopper.on_train_begin()
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (0.8, 1, 1)
    assert callbacks.best_so_far(previous) == 0.8  # ModelCheckpoint's threshold: a worse epoch cannot overwrite


def test_a_re_run_epoch_is_not_counted_twice_by_early_stopping_or_the_best_checkpoint(tmp_path):
    """A crash after epoch 1's log line but before its backup: the backup holds 1 epoch, so epoch 1
    runs again; its old line must not seed the callbacks (wait would start at 1, not 0)."""
    lines = [{"epoch": 0, "pid": 1, "val_accuracy": 0.90}, {"epoch": 1, "pid": 1, "val_accuracy": 0.95}]
    (tmp_path / run_folder.EPOCH_LOG_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    stopper, checkpoint = None, None
    for cb in callbacks.make_callbacks(str(tmp_path), patience=2, is_chief=False, restored_epochs=1):
        if isinstance(cb, callbacks.ResumableEarlyStopping):
            stopper = cb
        elif isinstance(cb, tf_keras.callbacks.ModelCheckpoint):
            checkpoint = cb
    stopper.on_train_begin()
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (0.90, 0, 0)
    assert checkpoint.best == 0.90  # the threshold a re-run epoch 1 must beat


class _StopAtEpoch3(tf_keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt


class _WhereTrainingStarts(tf_keras.callbacks.Callback):
    """Records the first (epoch, batch) a fit runs."""

    def __init__(self):
        super().__init__()
        self.epoch = self.batch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch if self.epoch is None else self.epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.batch = batch if self.batch is None else self.batch


# (BackupAndRestore's save_freq, fit's verbose): verbose=1's progress bar turns on batch hooks, so the
# backup records the batch running; a save every 3 of 4 batches resumes mid-epoch, every 4 at the next.
@pytest.mark.parametrize("save_freq, verbose, resumes_at", [("epoch", 0, (2, 0)), ("epoch", 1, (2, 0)),
                                                              (3, 0, (1, 2)), (4, 1, (2, 0))])
def test_restored_epochs_is_where_backup_and_restore_resumes(tmp_path, save_freq, verbose, resumes_at):
    """Stopped at the start of epoch 3: restored_epochs must be the epoch tf_keras's own resume starts at."""
    import numpy as np

    x, y, steps_per_epoch = np.zeros((8, 3)), np.zeros((8, 2)), 4  # batch_size 2
    backup = str(tmp_path / run_folder.BACKUP_DIR)
    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
    model.compile("sgd", "mse")
    assert train.restored_epochs(str(tmp_path), steps_per_epoch, save_freq) == 0
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=2, epochs=4, verbose=verbose,
                  callbacks=[tf_keras.callbacks.BackupAndRestore(backup, save_freq=save_freq), _StopAtEpoch3()])
    restored = train.restored_epochs(str(tmp_path), steps_per_epoch, save_freq)

    start = _WhereTrainingStarts()
    model.fit(x, y, batch_size=2, epochs=4, verbose=0,
              callbacks=[tf_keras.callbacks.BackupAndRestore(backup, save_freq=save_freq), start])
    assert (start.epoch, start.batch) == resumes_at  # each case is the one it claims to be
    assert restored == start.epoch  # the epochs before it are whole; the seeds and the callbacks' memory use it


def test_flags_accept_hyphenated_job_dir_and_true_false_values(tmp_path):
    config = config_lib.parse_config(["--data", "d", "--job-dir", str(tmp_path), "--with_flip", "false",
                                      "--with_color_distort", "True", "--cache"])
    assert (config.job_dir, config.with_flip, config.with_color_distort, config.cache) == (str(tmp_path), False, True, True)


def test_help_shows_every_flags_default():
    text = config_lib.make_arg_parser().format_help()
    flags = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]  # one block per flag, wrapped lines included
    silent = [f.split()[0] for f in flags if "(default:" not in f and not f.startswith(("-h", "--data", "--job_dir"))]
    assert not silent, f"--help gives no default for {silent}"
    words = " ".join(text.split())
    assert "(default: auto)" in words and "(default: 0.001)" in words


@pytest.mark.parametrize("strategy, message", [("tpu", "no TPU resolves"), ("multi_worker", "needs TF_CONFIG")])
def test_an_unusable_strategy_is_a_one_line_error(tmp_path, capsys, monkeypatch, strategy, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = train.main(["--data", str(tmp_path / "none"), "--job_dir", str(tmp_path / "run"), "--strategy", strategy])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_int_flags_take_vertex_discrete_floats_and_refuse_fractions_and_bad_seeds(capsys):
    config = config_lib.parse_config(["--data", "d", "--job_dir", "r", "--batch_size=16.0", "--num_hidden", "128"])
    assert (config.batch_size, config.num_hidden) == (16, 128) and isinstance(config.batch_size, int)
    for flags, message in [(["--batch_size", "16.5"], "'16.5' is not a whole number"),
                           (["--seed", "-1"], "--seed must be in [0, 2**32), got -1")]:
        with pytest.raises(SystemExit):
            config_lib.parse_config(["--data", "d", "--job_dir", "r", *flags])
        assert message in capsys.readouterr().err


def test_auto_falls_back_from_a_tpu_hint_without_a_tpu_and_tpu_names_an_unreachable_one(monkeypatch):
    import urllib.error

    from trainer import strategy as strategy_lib

    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v3-8")  # what a TPU VM sets; no TPU is reachable here
    assert strategy_lib.get_strategy("auto").name == "one_device"

    def unreachable(*args, **kwargs):  # what the resolver raises when GCE's metadata server is not there
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", unreachable)
    with pytest.raises(ValueError, match=r"--strategy tpu: no TPU resolves \(URLError: .*Name or service"):
        strategy_lib.get_strategy("tpu")


def test_a_run_at_chance_is_flagged_and_an_ignored_image_size_is_said(caplog):
    import logging

    assert "about chance (1/10 classes = 0.100)" in train.chance_warning(0.0597, 10)
    assert train.chance_warning(0.31, 10) is None and train.chance_warning(None, 10) is None
    from shared import metadata, schema

    meta = metadata.DatasetMetadata(schema.SCHEMA_VERSION, "pixels", ("a", "b"), schema.record_features("pixels", 32),
                                    {}, {})
    caplog.set_level(logging.WARNING)
    config = config_lib.parse_config(["--data", "d", "--job_dir", "r", "--image_size", "224", "--crop_ratio", "0.5"])
    spec = train.resolve_model_spec(config, meta)
    assert (spec.input_size, spec.model_size) == (32, 16)
    assert "--image_size 224 ignored: the pixels form's images are 32 px" in caplog.text


def test_a_hub_module_of_another_input_size_is_a_one_line_error(tmp_path, capsys, pixels_dir):
    # The module takes 32 px; the pixels are 32 px and --crop_ratio 0.5 gives the model 16 px crops.
    hub_module = fx.write_tiny_hub_module(str(tmp_path / "module"), input_size=32)
    code = train.main(fx.trainer_argv(pixels_dir, str(tmp_path / "run"), model="mobilenet", hub_handle=hub_module,
                                      crop_ratio=0.5))
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: the TF Hub module {hub_module!r} does not take the model's 16 px images" in err
    assert "--image_size times --crop_ratio" in err


@pytest.mark.parametrize("flags, message", [(["--lrate", "nan"], "--lrate must be a positive number, got nan"),
                                            (["--lrate", "inf"], "--lrate must be a positive number, got inf"),
                                            (["--l2", "nan"], "--l1 and --l2 must be numbers >= 0, got 0.0, nan")])
def test_float_flags_refuse_nan_and_infinity(capsys, flags, message):
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--data", "d", "--job_dir", "r", *flags])
    assert message in capsys.readouterr().err


def test_a_rerun_whose_folders_end_in_a_slash_is_the_same_run(tmp_path, pixels_dir):
    job = tmp_path / "run"
    (job / run_folder.EXPORT_DIR).mkdir(parents=True)  # what a finished run leaves: export, metrics and config
    (job / run_folder.EXPORT_DIR / "saved_model.pb").write_bytes(b"")
    (job / run_folder.METRICS_FILE).write_text(json.dumps({"test_accuracy": 0.9}))
    old = config_lib.parse_config(fx.trainer_argv(pixels_dir, str(job)))
    (job / run_folder.CONFIG_FILE).write_text(json.dumps({"flags": json.loads(old.to_json())}))
    # as shell completion types them
    new = config_lib.parse_config(fx.trainer_argv(pixels_dir + "/", str(job) + "/"))
    assert train.train_and_export(new) == {"test_accuracy": 0.9}
    with pytest.raises(ValueError, match=r"other flags .*'lrate': \(0.01, 0.5\)"):
        train.train_and_export(config_lib.parse_config(fx.trainer_argv(pixels_dir + "/", str(job) + "/", lrate=0.5)))


def test_an_embedding_module_that_does_not_load_stops_the_run_before_training(tmp_path, capsys):
    module = fx.write_tiny_hub_module(str(tmp_path / "module"), input_size=32)
    images = fx.make_image_files(str(tmp_path / "images"), per_class=5)
    data = str(tmp_path / "embeddings")
    fx.write_dataset(data, images, "embeddings", module_handle=module)
    os.rename(module, str(tmp_path / "moved"))  # as a relative path from another folder, or a URL offline
    job = tmp_path / "run"
    code = train.main(fx.trainer_argv(data, str(job)))
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot load the TF Hub module {module!r}" in err and "the sidecar's preprocessing.module" in err
    assert "--hub_handle" not in err  # the mobilenet model's flag: a trained run refuses it, and it is not used
    assert not (job / run_folder.TRAINED_FILE).exists() and not (job / run_folder.EPOCH_LOG_FILE).exists()


def test_config_json_is_never_seen_half_written_while_the_chief_rewrites_it(tmp_path, pixels_dir, monkeypatch):
    # A resuming chief rewrites config.json while the other workers read it to compare flags; a torn
    # read is a JSON error on that worker (and the chief then waits for it forever).
    job = tmp_path / "run"
    job.mkdir()
    config = config_lib.parse_config(fx.trainer_argv(pixels_dir, str(job)))
    (job / run_folder.CONFIG_FILE).write_text(json.dumps({"flags": json.loads(config.to_json()), "resolved": {"old": 1}}))
    seen = []

    class ReadDuringWrite(tf.io.gfile.GFile):
        def write(self, data):
            super().write(data)
            seen.append((job / run_folder.CONFIG_FILE).read_text())  # what another worker would read now

    monkeypatch.setattr(tf.io.gfile, "GFile", ReadDuringWrite)
    train._prepare_job_dir(config, {"new": 2}, resuming=True, is_chief=True)
    assert seen and all(json.loads(text)["resolved"] == {"old": 1} for text in seen), seen
    assert json.loads((job / run_folder.CONFIG_FILE).read_text())["resolved"] == {"new": 2}


def test_the_training_curves_take_a_data_folder_named_with_dollar_signs(tmp_path):
    # The title holds the --data folder's name; as mathtext, 'px$_$1' failed every rerun after training.
    from trainer import plots

    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}
    plots.plot_training_curves(history, str(tmp_path / "curves.png"), title="dnn on pixels (px$_$1)")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_job_dir_that_tensorflow_would_read_as_a_glob_pattern_is_refused(capsys):
    # runs/lr[1] trained, then failed to find runs/lr[1]/checkpoints/best; a rerun lost the epoch log.
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--data", "d", "--job_dir", "runs/lr[1]"])
    assert "--job_dir 'runs/lr[1]' holds '[': TensorFlow reads checkpoint paths as glob patterns" in capsys.readouterr().err


RUN_JSON_FILES = (run_folder.CONFIG_FILE, run_folder.TRAINED_FILE, run_folder.HISTORY_FILE, run_folder.METRICS_FILE)


def _torn_run_files(job) -> list[str]:
    """The run-folder files a kill at this instant would leave unreadable."""
    torn = [name for name in RUN_JSON_FILES if (job / name).exists() and not _parses((job / name).read_text())]
    log = job / run_folder.EPOCH_LOG_FILE
    if log.exists() and not all(_parses(line) for line in log.read_text().splitlines()):
        torn.append(run_folder.EPOCH_LOG_FILE)
    return torn


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_a_kill_at_any_write_of_a_run_leaves_every_json_file_whole(tmp_path, pixels_dir, monkeypatch):
    # GFile buffers: right after write() the file holds nothing or part of the text until close, which
    # is what a kill then leaves.
    job = tmp_path / "run"
    torn_at_writes = []

    class CheckAtEveryWrite(tf.io.gfile.GFile):
        def write(self, data):
            super().write(data)
            torn_at_writes.append(_torn_run_files(job))

    monkeypatch.setattr(tf.io.gfile, "GFile", CheckAtEveryWrite)
    train.train_and_export(config_lib.parse_config(fx.trainer_argv(pixels_dir, str(job), num_epochs=2)))
    assert len(torn_at_writes) > 5 and not any(torn_at_writes), torn_at_writes
    assert all((job / name).exists() for name in RUN_JSON_FILES)


def _finished_run(job, pixels_dir) -> config_lib.TrainConfig:
    """What a finished run leaves for a rerun to read: config, trained, metrics, epoch log and export."""
    config = config_lib.parse_config(fx.trainer_argv(pixels_dir, str(job)))
    (job / run_folder.EXPORT_DIR).mkdir(parents=True)
    (job / run_folder.EXPORT_DIR / "saved_model.pb").write_bytes(b"")
    (job / run_folder.CONFIG_FILE).write_text(json.dumps({"flags": json.loads(config.to_json())}))
    (job / run_folder.TRAINED_FILE).write_text(json.dumps({"seconds": 1.0}))
    (job / run_folder.METRICS_FILE).write_text(json.dumps({"test_accuracy": 0.9}))
    (job / run_folder.EPOCH_LOG_FILE).write_text('{"epoch": 0, "val_accuracy": 0.5}\n{"epoch": 1, "val_accuracy": 0.7}\n')
    return config


@pytest.mark.parametrize("name, removed, message", [
    (run_folder.CONFIG_FILE, (), "delete it and rerun"),
    (run_folder.METRICS_FILE, (), "delete it and rerun: the run's best weights are evaluated and exported again"),
    (run_folder.TRAINED_FILE, (run_folder.METRICS_FILE,), "replace it with {} to evaluate and export"),
    (run_folder.EPOCH_LOG_FILE, (run_folder.METRICS_FILE,), "line 2"),
])
def test_a_run_file_cut_short_is_named_in_the_error(tmp_path, pixels_dir, capsys, name, removed, message):
    job = tmp_path / "run"
    config = _finished_run(job, pixels_dir)
    for other in removed:  # so that the rerun gets as far as reading `name`
        (job / other).unlink()
    text = (job / name).read_text()
    (job / name).write_text(text[:len(text) - 8])  # a kill mid-write
    assert train.main(fx.trainer_argv(config.data, config.job_dir)) == 1
    err = capsys.readouterr().err
    assert f"error: {job / name}" in err and "is not valid JSON" in err and message in err, err
