"""Why the trainer uses tf_keras (Keras 2), and the alarm that tells us when to reconsider.

Under TF 2.21, Keras 3 cannot hold a hub.KerasLayer, and its `fit` under
MultiWorkerMirroredStrategy fails (keras-team/keras#20585). If the first test starts failing,
upstream has changed: re-evaluate moving trainer/ to Keras 3 (and delete this alarm).
"""
import pytest

from tests import trainer_fixtures as fx


@pytest.fixture(scope="module")
def hub_module(tmp_path_factory):
    return fx.write_tiny_hub_module(str(tmp_path_factory.mktemp("hub") / "module"))


def test_keras3_still_cannot_hold_a_hub_layer(hub_module):
    keras3 = pytest.importorskip("keras")
    import tensorflow_hub as hub
    import tf_keras

    if not keras3.__version__.startswith("3."):
        pytest.fail(f"`keras` is {keras3.__version__}, not Keras 3: the reason for tf_keras may be gone")
    # The module is fine: tf_keras takes it, so a refusal below is Keras 3's, not the module's.
    tf_keras.Sequential([tf_keras.Input((32, 32, 3)), hub.KerasLayer(hub_module, trainable=False)])
    try:
        keras3.Sequential([keras3.Input((32, 32, 3)), hub.KerasLayer(hub_module, trainable=False)])
    except ValueError as e:
        if "Only instances of `keras.Layer` can be added" in str(e):
            return  # still true: keep tf_keras
        raise  # refused for another reason: read it before deciding anything
    pytest.fail("UPSTREAM CHANGED: a hub.KerasLayer can now be added to a Keras 3 model "
                f"(keras {keras3.__version__}). Reconsider moving trainer/ from tf_keras to Keras 3 "
                "(check keras-team/keras#20585, fit under MultiWorkerMirroredStrategy, too).")


def test_every_keras_object_the_trainer_builds_is_tf_keras(hub_module, tmp_path):
    """A Keras 3 layer called in a tf_keras model can vanish from it without an error (Keras 3's
    flip and colour layers, called at build time with training=None, return their input), so each
    layer the spec asks for is looked for by name, and every layer, the optimiser and every callback
    must be tf_keras's."""
    import tf_keras

    from trainer import callbacks, models

    for kind, own_layers in [("linear", ()), ("dnn", ("hidden",)), ("mobilenet", ("hub_feature_extractor", "hidden"))]:
        # a 64 px input cropped to 32 px, flips and colour distortion: every layer the trainer can add
        spec = models.ModelSpec(kind, num_classes=3, input_size=64, model_size=32, hub_handle=hub_module,
                                with_flip=True, with_color_distort=True)
        model = models.build_model(spec)
        models.compile_model(model, lrate=0.01)
        names = [layer.name for layer in model.layers]
        for name in ("random_crop_or_centre", "random_flip", "random_color_distortion", *own_layers, "probabilities"):
            assert name in names, f"{kind}: no {name!r} layer in {names}"
        not_tf_keras = [type(layer) for layer in model.layers if not isinstance(layer, tf_keras.layers.Layer)]
        assert not not_tf_keras and isinstance(model, tf_keras.Model), f"{kind}: {not_tf_keras}"
        assert isinstance(model.optimizer, tf_keras.optimizers.Optimizer), type(model.optimizer)
    for callback in callbacks.make_callbacks(str(tmp_path), patience=2, is_chief=True, restored_epochs=0):
        assert isinstance(callback, tf_keras.callbacks.Callback), type(callback)
