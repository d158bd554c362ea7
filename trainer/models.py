"""The classifiers: [grayscale,] augmentation layers, then linear / dnn / TF Hub feature extractor, then softmax.

Keras here is `tf_keras` (Keras 2), not Keras 3: under TF 2.21 with Keras 3, `fit` under
MultiWorkerMirroredStrategy fails ("Attempt to convert a value (PerReplica...)",
keras-team/keras#20585) and `hub.KerasLayer` cannot be added to a Keras 3 model.
tests/test_trainer_keras_version.py fails loudly when either stops being true.
"""
from __future__ import annotations

import dataclasses

import tf_keras as keras

from trainer import augment, grayscale

EMBEDDINGS_HEAD = "embeddings_head"  # the model name recorded for the embeddings form


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What `build_model` needs; resolved from the flags and the sidecar by `trainer.train`."""
    kind: str  # "linear" | "dnn" | "mobilenet" | EMBEDDINGS_HEAD
    num_classes: int
    input_size: int | None  # side of the images entering the model (None: embeddings)
    model_size: int | None  # side after the crop
    embedding_size: int | None = None
    num_hidden: int = 16
    l1: float = 0.0
    l2: float = 0.0
    with_flip: bool = True
    with_color_distort: bool = True
    hub_handle: str = ""
    grayscale: bool = False  # trainer.grayscale.Grayscale right after the input
    fine_tune_layers: int = 0  # mobilenet: the module's top layers that train (trainer.fine_tune)


def _regularizer(spec: ModelSpec):
    return keras.regularizers.L1L2(l1=spec.l1, l2=spec.l2) if (spec.l1 or spec.l2) else None


def load_hub_layer(handle: str, name: str = "hub_feature_extractor",
                   advice: str = "without network access pass a local SavedModel path with --hub_handle",
                   fine_tune_layers: int = 0):
    """A frozen `hub.KerasLayer` (with `fine_tune_layers`, one whose top layers train: trainer.fine_tune);
    a handle that does not load is a ValueError that ends with `advice`."""
    import tensorflow_hub as hub

    from trainer import fine_tune

    try:
        if fine_tune_layers:
            return fine_tune.FineTunedHubLayer(handle, fine_tune_layers, name=name)
        return hub.KerasLayer(handle, trainable=False, name=name)
    except fine_tune.FineTuneError:
        raise  # names the module's layers already
    except Exception as e:
        raise ValueError(f"cannot load the TF Hub module {handle!r} ({type(e).__name__}: {str(e)[:300]}); "
                         f"{advice}") from None


def build_model(spec: ModelSpec) -> keras.Model:
    """An uncompiled Keras model: float32 [N, S, S, 3] in [0, 1] (or [N, D] embeddings) -> class probabilities."""
    reg = _regularizer(spec)
    if spec.kind == EMBEDDINGS_HEAD:
        inputs = keras.Input(shape=(spec.embedding_size,), name="embedding")
        x = keras.layers.Dense(spec.num_hidden, activation="relu", kernel_regularizer=reg, name="hidden")(inputs)
    else:
        inputs = keras.Input(shape=(spec.input_size, spec.input_size, 3), name="image")
        x = grayscale.Grayscale(name="grayscale")(inputs) if spec.grayscale else inputs
        for layer in augment.make_augmentation_layers(spec.input_size, spec.model_size, spec.with_flip,
                                                      spec.with_color_distort):
            x = layer(x)
        if spec.kind == "linear":
            x = keras.layers.Flatten(name="flatten")(x)
        elif spec.kind == "dnn":
            x = keras.layers.Flatten(name="flatten")(x)
            x = keras.layers.Dense(spec.num_hidden, activation="relu", kernel_regularizer=reg, name="hidden")(x)
        elif spec.kind == "mobilenet":
            hub_layer = load_hub_layer(spec.hub_handle, fine_tune_layers=spec.fine_tune_layers)
            if spec.grayscale:  # the module takes RGB: the gray channel three times
                x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
            try:
                x = hub_layer(x)
            except (TypeError, ValueError) as e:  # a module with a static input size (MobileNet: 224) refuses others
                raise ValueError(
                    f"the TF Hub module {spec.hub_handle!r} does not take the model's {spec.model_size} px images "
                    f"({type(e).__name__}: {str(e)[:300]}); the model's size is --image_size for the jpeg form "
                    f"(224 for MobileNet) and the ETL's --image_size times --crop_ratio for the pixels form") from None
            x = keras.layers.Dense(spec.num_hidden, activation="relu", kernel_regularizer=reg, name="hidden")(x)
        else:
            raise ValueError(f"unknown model {spec.kind!r}; choose linear, dnn or mobilenet")
    outputs = keras.layers.Dense(spec.num_classes, activation="softmax", kernel_regularizer=reg, name="probabilities")(x)
    return keras.Model(inputs, outputs, name=spec.kind)


def compile_model(model: keras.Model, lrate: float, steps_per_execution: int = 1) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lrate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
