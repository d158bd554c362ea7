"""Chapter 7's run options on the digits: --grayscale (in the model, so the export converts too),
--pattern (the smoke test on matching shards) and --profile_batches (TensorBoard's profiler)."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from shared import metadata
from tests import trainer_fixtures as fx
from trainer import config as config_lib, grayscale, ingest, run_folder, shard_pattern, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory, digits_pixels_dir):
    """2 epochs of a grayscale dnn on the first train and valid shards, profiling steps 2 to 3."""
    job = str(tmp_path_factory.mktemp("gray") / "run")
    argv = fx.trainer_argv(digits_pixels_dir, job, model="dnn", num_hidden=64, num_epochs=2, batch_size=32,
                           lrate=0.001, grayscale="true", pattern="-00000-*", profile_batches="2,3")
    assert train.main(argv) == 0
    return config_lib.parse_config(argv)


def test_grayscale_export_on_bytes_gives_the_keras_models_answer_on_the_records_pixels(gray_run):
    config = gray_run
    meta = shard_pattern.select_shards(ingest.load_dataset_metadata(config.data), config.pattern, config.data)
    serialized, records = fx.read_split_records(meta, config.data, "test")
    spec = train.resolve_model_spec(config, meta)
    model, _ = train.evaluate_best(spec, meta, config, spec.input_size)
    assert isinstance(model.get_layer("grayscale"), grayscale.Grayscale) and model.layers[1].name == "grayscale"
    pixels = np.stack([r["image"] for r in records])
    trained = model.predict(pixels, batch_size=len(pixels), verbose=0)
    export = tf.saved_model.load(os.path.join(config.job_dir, run_folder.EXPORT_DIR))
    served = export.signatures["serving_default"](image_bytes=tf.constant([open(r["uri"], "rb").read() for r in records]))
    np.testing.assert_allclose(served["probabilities"].numpy(), trained, atol=1e-5, rtol=0)
    assert np.ptp(trained, axis=0).max() > 1e-3, "the model gives every image the same answer: the check is void"


def test_grayscale_layer_is_the_books_formula_and_keeps_one_channel():
    rgb = np.array([[[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.002, 0.003, 0.001], [0.9, 0.2, 0.4]]]], np.float32)
    gray = grayscale.Grayscale()(rgb).numpy()
    assert gray.shape == (1, 1, 4, 1)
    c = rgb @ np.array(grayscale.LUMINANCE_WEIGHTS, np.float32)
    expected = np.where(c > 0.0031308, 1.055 * np.power(c, 1 / 2.4) - 0.055, 12.92 * c)
    np.testing.assert_allclose(gray[..., 0], expected, atol=1e-6)


def test_pattern_trains_and_counts_on_the_matching_shards_only(gray_run):
    config = gray_run
    full = ingest.load_dataset_metadata(config.data)
    first = {split: full.splits[split].shards[0].num_examples for split in ("train", "valid", "test")}
    resolved = json.load(open(os.path.join(config.job_dir, run_folder.CONFIG_FILE)))["resolved"]
    assert resolved["pattern_shards_and_examples"] == {split: [1, n] for split, n in first.items()}
    assert resolved["train_examples_in_data"] == first["train"] < full.splits["train"].num_examples
    assert resolved["steps_per_epoch"] == first["train"] // 32  # the virtual epoch follows the matched shard
    metrics = json.load(open(os.path.join(config.job_dir, run_folder.METRICS_FILE)))
    assert (metrics["val_examples"], metrics["test_examples"]) == (first["valid"], first["test"])


def test_pattern_matches_the_sidecars_file_names_whatever_they_are():
    for name in ("train-00000-of-00004.tfrecord", "train-g7-00000-of-00004.tfrecord", "sub/valid-00000-of-00002.tfrecord"):
        assert shard_pattern.matches(name, "-00000-*"), name
    assert not shard_pattern.matches("train-00001-of-00004.tfrecord", "-00000-*")
    assert shard_pattern.matches("train-00001-of-00004.tfrecord", "train-0000[01]-*")
    assert not shard_pattern.matches("test-00001-of-00004.tfrecord", "train-*")


def test_a_pattern_matching_no_train_or_valid_shard_is_an_error(capsys, tmp_path, digits_pixels_dir):
    assert train.main(fx.trainer_argv(digits_pixels_dir, str(tmp_path / "run"), pattern="-00009-*")) == 1
    assert "--pattern '-00009-*' matches no train shard" in capsys.readouterr().err
    meta = ingest.load_dataset_metadata(digits_pixels_dir)
    with pytest.raises(metadata.DatasetError, match="matches no valid shard"):
        shard_pattern.select_shards(meta, "train-*", digits_pixels_dir)
    assert not (tmp_path / "run").exists()


def test_profile_batches_writes_a_profile_of_the_run(gray_run):
    profiles = glob.glob(os.path.join(gray_run.job_dir, run_folder.LOGS_DIR, "plugins", "profile", "*", "*.xplane.pb"))
    assert len(profiles) == 1 and os.path.getsize(profiles[0]) > 0


@pytest.mark.parametrize("steps", [None, (2, 3)])
def test_the_tensorboard_callback_profiles_only_when_asked(tmp_path, steps):
    import tf_keras

    from trainer import callbacks

    model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    model.fit(np.zeros((8, 3)), np.zeros((8, 2)), batch_size=2, verbose=0,
              callbacks=callbacks.make_tensorboard_callback(str(tmp_path), steps))
    profiles = glob.glob(str(tmp_path / run_folder.LOGS_DIR / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(profiles) == (1 if steps else 0)
    assert config_lib.parse_config(["--data", "d", "--job_dir", "r"]).profile_batches == ""  # off by default


@pytest.mark.parametrize("text, expected", [("10,20", "10,20"), (" 5 ", "5,5"), ("", "")])
def test_profile_batches_takes_a_range_of_steps(text, expected):
    assert config_lib.parse_config(["--data", "d", "--job_dir", "r", "--profile_batches", text]).profile_batches == expected


@pytest.mark.parametrize("text", ["0,3", "5,2", "a,b", "1,2,3"])
def test_profile_batches_refuses_what_is_not_a_range_of_steps(capsys, text):
    with pytest.raises(SystemExit):
        config_lib.parse_config(["--data", "d", "--job_dir", "r", "--profile_batches", text])
    assert "expected steps A,B with 1 <= A <= B" in capsys.readouterr().err


def test_a_run_folder_from_before_a_flag_existed_is_still_the_same_run(tmp_path, digits_pixels_dir):
    import dataclasses

    job = tmp_path / "run"
    (job / run_folder.EXPORT_DIR).mkdir(parents=True)  # what a finished run leaves: export, metrics and config
    (job / run_folder.EXPORT_DIR / "saved_model.pb").write_bytes(b"")
    (job / run_folder.METRICS_FILE).write_text(json.dumps({"test_accuracy": 0.5}))
    config = config_lib.parse_config(fx.trainer_argv(digits_pixels_dir, str(job)))
    older = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("grayscale", "pattern", "profile_batches")}
    (job / run_folder.CONFIG_FILE).write_text(json.dumps({"flags": older}))
    assert train.train_and_export(config) == {"test_accuracy": 0.5}
    with pytest.raises(ValueError, match=r"other flags .*'grayscale': \(False, True\)"):
        train.train_and_export(dataclasses.replace(config, grayscale=True))
