"""--fine_tune_layers: the head trains first with the module frozen (its own run folder), then the
module's top layers train at --fine_tune_lrate with batch-norm statistics frozen; exported as any run."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests import trainer_fixtures as fx
from trainer import config as config_lib, fine_tune, ingest, models, run_folder, train

pytestmark = pytest.mark.slow


def write_reusable_module(path: str, size: int = 32) -> str:
    """A feature extractor saved from Keras with tf.saved_model.save, which gives it what TF Hub's TF2
    MobileNet has and the project's other test modules lack: `trainable_variables` in layer order, a
    `training` argument, and batch norms. Two conv + BN layers: 4 layers with trainable variables."""
    tf_keras.utils.set_random_seed(3)
    net = tf_keras.Sequential([
        tf_keras.Input((size, size, 3)),
        tf_keras.layers.Conv2D(8, 3, strides=2, name="conv1"), tf_keras.layers.BatchNormalization(name="bn1"),
        tf_keras.layers.ReLU(),
        tf_keras.layers.Conv2D(16, 3, strides=2, name="conv2"), tf_keras.layers.BatchNormalization(name="bn2"),
        tf_keras.layers.ReLU(), tf_keras.layers.GlobalAveragePooling2D(),
    ])
    tf.saved_model.save(net, path)
    return path


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    return write_reusable_module(str(tmp_path_factory.mktemp("module") / "reusable"))


@pytest.fixture(scope="module")
def pixels_dir(tmp_path_factory):
    images = fx.make_image_files(str(tmp_path_factory.mktemp("images")), per_class=8)
    out = str(tmp_path_factory.mktemp("pixels"))
    fx.write_dataset(out, images, "pixels")
    return out


def _argv(data, job, module, **flags):
    return fx.trainer_argv(data, job, model="mobilenet", hub_handle=module, num_epochs=1, fine_tune_epochs=1,
                           lrate=0.01, fine_tune_lrate=0.001, **flags)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, pixels_dir, module_dir):
    job = str(tmp_path_factory.mktemp("fine_tune") / "run")
    argv = _argv(pixels_dir, job, module_dir, fine_tune_layers=2)
    assert train.main(argv) == 0
    return config_lib.parse_config(argv)


def _module_weights(config, job_dir):
    """The module's variables by name, as the run's best checkpoint holds them."""
    meta = ingest.load_dataset_metadata(config.data)
    model = models.build_model(train.resolve_model_spec(config, meta))
    model.load_weights(os.path.join(job_dir, run_folder.BEST_WEIGHTS)).expect_partial()
    return {w.name: w.numpy() for w in model.get_layer("hub_feature_extractor").weights}


def test_only_the_top_layers_train_and_batch_norm_statistics_stay(fine_tuned):
    head_dir = os.path.join(fine_tuned.job_dir, run_folder.HEAD_STAGE_DIR)
    before, after = _module_weights(fine_tuned, head_dir), _module_weights(fine_tuned, fine_tuned.job_dir)
    assert sorted(before) == sorted(after) and len(before) == 12
    unchanged = [n for n in before if np.array_equal(before[n], after[n])]
    assert sorted(unchanged) == sorted(["conv1/kernel:0", "conv1/bias:0", "bn1/gamma:0", "bn1/beta:0",
                                        "bn1/moving_mean:0", "bn1/moving_variance:0",
                                        "bn2/moving_mean:0", "bn2/moving_variance:0"])


def test_the_run_records_both_stages_and_the_fine_tuning_schedule(fine_tuned):
    head_dir = os.path.join(fine_tuned.job_dir, run_folder.HEAD_STAGE_DIR)
    head = json.load(open(os.path.join(head_dir, run_folder.CONFIG_FILE)))
    assert head["flags"]["fine_tune_layers"] == 0 and head["resolved"]["lrate"] == 0.01
    assert os.path.exists(os.path.join(head_dir, run_folder.METRICS_FILE))
    resolved = json.load(open(os.path.join(fine_tuned.job_dir, run_folder.CONFIG_FILE)))["resolved"]
    assert (resolved["lrate"], resolved["num_epochs"], resolved["warm_start"]["run"]) == (0.001, 1, head_dir)
    metrics = json.load(open(os.path.join(fine_tuned.job_dir, run_folder.METRICS_FILE)))
    assert train.main(_argv(fine_tuned.data, fine_tuned.job_dir, fine_tuned.hub_handle, fine_tune_layers=2)) == 0
    assert json.load(open(os.path.join(fine_tuned.job_dir, run_folder.METRICS_FILE))) == metrics  # a finished run


def test_the_fine_tuned_export_answers_as_the_trained_model(fine_tuned):
    meta = ingest.load_dataset_metadata(fine_tuned.data)
    _, records = fx.read_split_records(meta, fine_tuned.data, "test")
    spec = train.resolve_model_spec(fine_tuned, meta)
    model, _ = train.evaluate_best(spec, meta, fine_tuned, spec.input_size)
    pixels = np.stack([r["image"] for r in records])
    trained = model.predict(pixels, batch_size=len(pixels), verbose=0)
    export = tf.saved_model.load(os.path.join(fine_tuned.job_dir, run_folder.EXPORT_DIR))
    served = export.signatures["serving_default"](image_bytes=tf.constant([open(r["uri"], "rb").read() for r in records]))
    np.testing.assert_allclose(served["probabilities"].numpy(), trained, atol=1e-5, rtol=0)


def test_the_layer_reports_the_top_layers_variables_as_its_trainable_weights(module_dir):
    layer = fine_tune.FineTunedHubLayer(module_dir, 3)
    assert [w.name for w in layer.trainable_weights] == ["bn1/gamma:0", "bn1/beta:0", "conv2/kernel:0",
                                                          "conv2/bias:0", "bn2/gamma:0", "bn2/beta:0"]
    assert {w.name for w in layer.non_trainable_weights} == {"conv1/kernel:0", "conv1/bias:0", "bn1/moving_mean:0",
                                                             "bn1/moving_variance:0", "bn2/moving_mean:0",
                                                             "bn2/moving_variance:0"}


@pytest.mark.parametrize("case, message", [
    ("no_variables", "lists no trainable_variables, so no layer of it can be unfrozen"),
    ("too_many", "--fine_tune_layers 9: the TF Hub module"),
    ("not_mobilenet", "this run's model is 'dnn': use --model mobilenet"),
])
def test_fine_tuning_that_cannot_apply_is_refused_before_training(tmp_path, capsys, pixels_dir, module_dir, case,
                                                                  message):
    module = fx.write_tiny_hub_module(str(tmp_path / "plain")) if case == "no_variables" else module_dir
    flags = {"fine_tune_layers": 9 if case == "too_many" else 2}
    argv = _argv(pixels_dir, str(tmp_path / "run"), module, **flags)
    if case == "not_mobilenet":
        argv += ["--model", "dnn"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    if case == "too_many":
        assert "has 4 layers with trainable variables (first 'conv1', last 'bn2')" in err
    assert not (tmp_path / "run").exists()
