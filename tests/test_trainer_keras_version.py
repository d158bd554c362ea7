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

    if not keras3.__version__.startswith("3."):
        pytest.fail(f"`keras` is {keras3.__version__}, not Keras 3: the reason for tf_keras may be gone")
    try:
        keras3.Sequential([keras3.Input((32, 32, 3)), hub.KerasLayer(hub_module, trainable=False)])
    except (ValueError, TypeError):
        return  # still true: keep tf_keras
    pytest.fail("UPSTREAM CHANGED: a hub.KerasLayer can now be added to a Keras 3 model "
                f"(keras {keras3.__version__}). Reconsider moving trainer/ from tf_keras to Keras 3 "
                "(check keras-team/keras#20585, fit under MultiWorkerMirroredStrategy, too).")


def test_models_are_built_with_tf_keras(hub_module):
    import tf_keras

    from trainer import models

    for kind in ("linear", "dnn", "mobilenet"):
        spec = models.ModelSpec(kind, num_classes=3, input_size=32, model_size=32, hub_handle=hub_module)
        model = models.build_model(spec)
        assert isinstance(model, tf_keras.Model), f"{kind}: {type(model).__mro__}"
        assert type(model).__module__.startswith("tf_keras"), type(model).__module__
