"""--warm_start: a run on the digits that starts from an earlier run's best weights learns faster than
one from scratch; its model flags come from that run; a changed class list keeps the shared classes'
weights only when asked; a model that does not fit is refused naming the difference; and a rerun
resumes the new run's own state without reading the earlier run again."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import tf_keras

from tests import trainer_fixtures as fx
from trainer import callbacks, config as config_lib, ingest, models, run_folder, train, warm_start

pytestmark = pytest.mark.slow
DIGITS = tuple(str(d) for d in range(10))
# A virtual epoch of 5 steps: from scratch the dnn is still far from the ~0.8 the earlier run reached.
SHORT_EPOCH = dict(num_epochs=1, num_training_examples=160, batch_size=32, lrate=0.001)


def _argv(data, job, **flags):
    return fx.trainer_argv(data, job, **{"model": "dnn", "num_hidden": 128, **flags})


def _resolved(job):
    return json.load(open(os.path.join(job, run_folder.CONFIG_FILE)))["resolved"]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, digits_pixels_dir):
    """3 epochs on half the train shards (--pattern): the run a user would continue on more data."""
    job = str(tmp_path_factory.mktemp("earlier") / "run")
    assert train.main(_argv(digits_pixels_dir, job, num_epochs=3, batch_size=32, lrate=0.001,
                            pattern="-00000-*")) == 0
    return job


@pytest.fixture(scope="module")
def digit_items(digits_pixels_dir):
    root = os.path.dirname(digits_pixels_dir)
    rows = list(csv.reader(open(os.path.join(root, "digits", "all_data.csv"))))[:60]
    return [(os.path.join(root, "digits", path), int(label)) for path, label in rows]


def test_a_warm_started_epoch_beats_the_same_epoch_from_scratch(tmp_path, digits_pixels_dir, earlier_run):
    warm_job, scratch_job = str(tmp_path / "warm"), str(tmp_path / "scratch")
    # Only --warm_start and the epoch flags: the model flags (dnn, 128 hidden, ...) come from the earlier run.
    assert train.main(["--data", digits_pixels_dir, "--job_dir", warm_job, "--warm_start", earlier_run,
                       "--strategy", "one_device", *[f"--{k}={v}" for k, v in SHORT_EPOCH.items()]]) == 0
    assert train.main(_argv(digits_pixels_dir, scratch_job, **SHORT_EPOCH)) == 0
    warm, scratch = (json.load(open(os.path.join(j, run_folder.METRICS_FILE)))["val_accuracy"]
                     for j in (warm_job, scratch_job))
    assert warm >= scratch + 0.2, f"warm start {warm:.3f} vs from scratch {scratch:.3f}"
    flags = json.load(open(os.path.join(warm_job, run_folder.CONFIG_FILE)))["flags"]
    assert (flags["model"], flags["num_hidden"], flags["warm_start"]) == ("dnn", 128, earlier_run)
    start = _resolved(warm_job)["warm_start"]
    assert start["run"] == earlier_run and start["weights"] == os.path.join(earlier_run, run_folder.BEST_WEIGHTS)
    assert (start["classes_kept"], start["classes_new"], start["classes_dropped"]) == (10, [], [])
    assert start["source_best_val_accuracy"] == callbacks.best_so_far(callbacks.read_epoch_log(earlier_run))
    assert "warm_start" not in _resolved(scratch_job)


def test_an_interrupted_warm_started_run_resumes_its_own_backup_without_the_earlier_run(
        tmp_path, monkeypatch, digits_pixels_dir, earlier_run):
    job = str(tmp_path / "run")
    argv = ["--data", digits_pixels_dir, "--job_dir", job, "--warm_start", earlier_run, "--strategy", "one_device",
            "--num_epochs", "2", "--num_training_examples", "64", "--patience", "5"]

    class StopAtEpoch2(tf_keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt  # after epoch 1's backup, as a crash would

    make = callbacks.make_callbacks
    monkeypatch.setattr(callbacks, "make_callbacks", lambda *a, **k: [*make(*a, **k), StopAtEpoch2()])
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(callbacks, "make_callbacks", make)
    recorded = _resolved(job)["warm_start"]
    moved = earlier_run + ".moved"
    shutil.move(earlier_run, moved)  # the rerun cannot read the earlier run, nor start from it again
    try:
        assert train.main(argv) == 0
    finally:
        shutil.move(moved, earlier_run)
    assert [e["epoch"] for e in callbacks.read_epoch_log(job)] == [0, 1]
    assert _resolved(job)["warm_start"] == recorded and recorded["run"] == earlier_run
    assert json.load(open(os.path.join(job, run_folder.METRICS_FILE)))["epochs_run"] == 2


def test_a_changed_class_list_is_refused_unless_allowed_then_keeps_the_shared_classes_rows(
        tmp_path, capsys, digit_items, earlier_run):
    # The 9s renamed "nine": 9 classes shared, "nine" new, "9" dropped.
    renamed = DIGITS[:9] + ("nine",)
    data = str(tmp_path / "renamed")
    fx.write_dataset(data, digit_items, "pixels", class_names=renamed)
    job = str(tmp_path / "run")
    argv = ["--data", data, "--job_dir", job, "--warm_start", earlier_run, "--strategy", "one_device",
            "--num_epochs", "1", "--num_training_examples", "32", "--batch_size", "16"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "classes differ from this data's: new ['nine'], missing ['9']; --allow_class_change true keeps" in err
    assert not os.path.exists(job)

    # The weights as loaded, before any training: every layer as the earlier run left it, except the
    # output columns of the new class.
    config = warm_start.with_model_flags_of_run(config_lib.parse_config([*argv, "--allow_class_change", "true"]),
                                                config_lib.given_flags(argv))
    meta = ingest.load_dataset_metadata(data)
    spec = train.resolve_model_spec(config, meta)
    start = warm_start.plan(config, spec, meta, {"form": "pixels", "model": "dnn", "input_size": 32,
                                                 "model_size": 32, "embedding_size": None}, earlier_run)
    model, earlier = models.build_model(spec), models.build_model(start.source_spec)
    fresh_kernel = model.get_layer("probabilities").get_weights()[0].copy()
    warm_start.load_weights(model, start)
    earlier.load_weights(os.path.join(earlier_run, run_folder.BEST_WEIGHTS)).expect_partial()
    np.testing.assert_array_equal(model.get_layer("hidden").get_weights()[0], earlier.get_layer("hidden").get_weights()[0])
    kernel, bias = model.get_layer("probabilities").get_weights()
    old_kernel, old_bias = earlier.get_layer("probabilities").get_weights()
    np.testing.assert_array_equal(kernel[:, :9], old_kernel[:, :9])
    np.testing.assert_array_equal(bias[:9], old_bias[:9])
    np.testing.assert_array_equal(kernel[:, 9], fresh_kernel[:, 9])  # "nine" starts from its initialisation

    described = start.describe()  # what the run's config.json records
    assert (described["classes_kept"], described["classes_new"], described["classes_dropped"]) == (9, ["nine"], ["9"])


def test_a_reordered_class_list_needs_no_flag_and_keeps_every_class(tmp_path, digit_items, earlier_run):
    data = str(tmp_path / "reversed")
    fx.write_dataset(data, digit_items, "pixels", class_names=DIGITS[::-1])
    argv = ["--data", data, "--job_dir", str(tmp_path / "run"), "--warm_start", earlier_run]
    config = warm_start.with_model_flags_of_run(config_lib.parse_config(argv), config_lib.given_flags(argv))
    meta = ingest.load_dataset_metadata(data)
    spec = train.resolve_model_spec(config, meta)
    start = warm_start.plan(config, spec, meta, {"form": "pixels", "model": "dnn", "input_size": 32, "model_size": 32,
                                                 "embedding_size": None}, earlier_run)
    model, earlier = models.build_model(spec), models.build_model(start.source_spec)
    warm_start.load_weights(model, start)
    earlier.load_weights(os.path.join(earlier_run, run_folder.BEST_WEIGHTS)).expect_partial()
    np.testing.assert_array_equal(model.get_layer("probabilities").get_weights()[0],
                                  earlier.get_layer("probabilities").get_weights()[0][:, ::-1])


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, digit_items):
    """The same digits as 24 px pixels and as the jpeg form: data the earlier run's weights do not fit."""
    root = tmp_path_factory.mktemp("other")
    fx.write_dataset(str(root / "pixels24"), digit_items, "pixels", image_size=24, class_names=DIGITS)
    fx.write_dataset(str(root / "jpeg"), digit_items, "jpeg", class_names=DIGITS)
    return {"pixels24": str(root / "pixels24"), "jpeg": str(root / "jpeg")}


@pytest.mark.parametrize("data, flags, message", [
    ("pixels24", [], "differs in input_size (that run 32, this run 24); model_size (that run 32, this run 24)"),
    ("jpeg", [], "differs in form (that run 'pixels', this run 'jpeg')"),
    ("same", ["--model", "linear"], "differs in model (that run 'dnn', this run 'linear')"),
    ("same", ["--num_hidden", "64"], "differs in num_hidden (that run 128, this run 64)"),
    ("same", ["--grayscale", "true"], "differs in grayscale (that run False, this run True)"),
])
def test_a_model_the_weights_do_not_fit_is_refused_naming_the_difference(
        tmp_path, capsys, digits_pixels_dir, other_data, earlier_run, data, flags, message):
    data_dir = digits_pixels_dir if data == "same" else other_data[data]
    job = str(tmp_path / "run")
    assert train.main(["--data", data_dir, "--job_dir", job, "--warm_start", earlier_run, *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "a warm start needs the same form, input size and architecture" in err
    assert not os.path.exists(job)


def test_a_warm_start_from_no_run_or_from_itself_is_refused(tmp_path, capsys, digits_pixels_dir):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    assert train.main(["--data", digits_pixels_dir, "--job_dir", str(tmp_path / "r"), "--warm_start", str(not_a_run)]) == 1
    assert f"--warm_start {not_a_run}: {not_a_run / run_folder.CONFIG_FILE} does not exist" in capsys.readouterr().err
    (not_a_run / run_folder.CONFIG_FILE).write_text(json.dumps({"flags": {}, "resolved": {}}))
    assert train.main(["--data", digits_pixels_dir, "--job_dir", str(tmp_path / "r"), "--warm_start", str(not_a_run)]) == 1
    assert "checkpoints/best.index does not exist (no epoch of that run finished" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--data", "d", "--job_dir", "runs/a/", "--warm_start", "runs/a"])
    assert "--warm_start runs/a is the --job_dir itself" in capsys.readouterr().err


def test_given_flags_are_the_ones_on_the_command_line_in_any_spelling():
    given = config_lib.given_flags(["--data", "d", "--job-dir", "r", "--num_hidden=64", "--model", "dnn",
                                    "--pattern", "-00000-*", "--cache"])
    assert given == {"data", "job_dir", "num_hidden", "model", "pattern", "cache"}
    assert config_lib.parse_config(["--data", "d", "--job_dir", "r", "--pattern", "-00000-*"]).pattern == "-00000-*"
