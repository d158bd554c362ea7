"""The trainer, predict and the bytes-only copy on a filesystem that is not local: TensorFlow's ram://.

ram:// goes through tf.io.gfile like gs:// (no POSIX: `open`, `os.path` and `shutil` do not see it),
so a local-only call on --data, --job_dir, --model or an export fails here as it would on Vertex AI.
Its folder semantics differ from GCS's in ways the code must not depend on: `exists` and `isdir`
are true for any string prefix of a stored name, and a folder rename moves only the folder's name.
"""
import json
import logging
import os
import uuid

import pytest
import tensorflow as tf
import tf_keras

from tests import trainer_fixtures as fx
from trainer import callbacks, config as config_lib, run_folder, train
from trainer.serving import bytes_only_export, contract, predict
from trainer.serving.exported_model import load_exported_model


class Interrupted(Exception):
    """Stands in for a preemption: raised after the first epoch's log line and backup are written."""


class InterruptAfterFirstEpoch(tf_keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise Interrupted


def _copy_to(local_folder: str, remote_folder: str) -> list[str]:
    """Copies the files of a local folder (not its sub-folders) with tf.io.gfile; returns the copies' paths."""
    tf.io.gfile.makedirs(remote_folder)
    copies = []
    for name in sorted(os.listdir(local_folder)):
        if os.path.isfile(os.path.join(local_folder, name)):
            copies.append(remote_folder + "/" + name)
            tf.io.gfile.copy(os.path.join(local_folder, name), copies[-1])
    return copies


def _truncate_checkpoint_indexes_on_ram(monkeypatch):
    """ram:// appends to a file opened for writing instead of replacing it (TF's RamFileSystem keeps the
    old bytes), so a checkpoint saved twice to one prefix, as ModelCheckpoint does with the best
    weights, has a corrupt index there. GCS and local disks replace the file; so does this shim."""
    save_weights = tf_keras.Model.save_weights

    def save_weights_replacing(self, filepath, *args, **kwargs):
        if str(filepath).startswith("ram://") and tf.io.gfile.exists(filepath + ".index"):
            tf.io.gfile.remove(filepath + ".index")
        return save_weights(self, filepath, *args, **kwargs)

    monkeypatch.setattr(tf_keras.Model, "save_weights", save_weights_replacing)


@pytest.fixture()
def ram_root():
    root = f"ram://{uuid.uuid4().hex}"  # ram:// is one namespace per process
    yield root
    tf.io.gfile.rmtree(root)


def test_train_resume_export_predict_and_bytes_only_copy_with_every_path_on_ram(tmp_path, ram_root, monkeypatch,
                                                                                capsys, caplog):
    images = fx.make_image_files(str(tmp_path / "images"), per_class=6)
    fx.write_dataset(str(tmp_path / "pixels"), images, "pixels")
    data, job = ram_root + "/data", ram_root + "/run"
    _copy_to(str(tmp_path / "pixels"), data)
    ram_images = _copy_to(str(tmp_path / "images"), ram_root + "/images")[:4]
    config = config_lib.parse_config(fx.trainer_argv(data, job, num_epochs=2))
    _truncate_checkpoint_indexes_on_ram(monkeypatch)

    make_callbacks = callbacks.make_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(callbacks, "make_callbacks", lambda *a, **k: [*make_callbacks(*a, **k), InterruptAfterFirstEpoch()])
        with pytest.raises(Interrupted):
            train.train_and_export(config)
    assert [e["epoch"] for e in callbacks.read_epoch_log(job)] == [0]
    assert train.restored_epochs(job, steps_per_epoch=1) == 1

    caplog.set_level(logging.INFO)
    metrics = train.train_and_export(config)
    assert "backup holds 1 epoch(s): resuming the interrupted run" in caplog.text
    entries = callbacks.read_epoch_log(job)
    assert [e["epoch"] for e in entries] == [0, 1] and metrics["epochs_run"] == 2
    export_dir = job + "/" + run_folder.EXPORT_DIR
    for name in ("saved_model.pb", contract.CLASS_NAMES_FILE, contract.DATASET_METADATA_FILE, contract.TRAIN_CONFIG_FILE):
        assert tf.io.gfile.exists(export_dir + "/" + name), name
    names = {name.rstrip("/") for name in tf.io.gfile.listdir(job)}
    assert {run_folder.CONFIG_FILE, run_folder.EPOCH_LOG_FILE, run_folder.TRAINED_FILE, run_folder.HISTORY_FILE,
            run_folder.CURVES_FILE, run_folder.METRICS_FILE, run_folder.EXPORT_DIR} <= names
    assert not [name for name in names if "tmp" in name], names  # no temporary file or folder left behind
    assert train.train_and_export(config) == metrics  # a finished run on ram:// is recognised and read back

    grid = ram_root + "/grid.png"
    capsys.readouterr()  # Keras's progress lines
    assert predict.run(["--model", export_dir, "--grid", grid, *ram_images]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == ram_images
    assert all(line["class_name"] in fx.CLASS_NAMES for line in lines), lines
    assert tf.io.gfile.GFile(grid, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    copy_dir = ram_root + "/bytes_only"
    assert bytes_only_export.run(["--model", export_dir, "--output", copy_dir]) == 0
    image_bytes = [tf.io.gfile.GFile(path, "rb").read() for path in ram_images]
    copy = load_exported_model(copy_dir)
    assert set(copy.signatures) == {contract.SERVING_SIGNATURE}
    assert copy.predict(image_bytes) == load_exported_model(export_dir).predict(image_bytes)
    assert tf.io.gfile.GFile(copy_dir + "/" + contract.CLASS_NAMES_FILE).read().split() == list(fx.CLASS_NAMES)
