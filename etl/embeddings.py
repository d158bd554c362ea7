"""The embeddings form: a TF Hub feature-vector module, loaded once per worker, run on batches."""
from __future__ import annotations

import dataclasses

from etl.errors import EtlError


class EmbeddingModuleError(EtlError):
    """The module cannot be loaded or is not a feature-vector module."""


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    handle: str
    input_size: int  # square input side the module expects
    output_size: int  # length of its feature vector


def load_module(handle: str):
    """hub.load(handle) for a URL or a local SavedModel path, with an error that says what to do offline."""
    import tensorflow_hub as hub

    try:
        return hub.load(handle)
    except Exception as e:
        raise EmbeddingModuleError(
            f"cannot load the embedding module {handle!r} ({type(e).__name__}: {str(e)[:300]}). "
            "Without network access, pass a local copy: --embedding_module /path/to/saved_model "
            "(a TF2 SavedModel mapping float32 [N, S, S, 3] in [0, 1] to [N, D])") from None


def _static_input_size(module) -> int | None:
    """The square size from the module's call signature, when it is static (MobileNet: 224)."""
    try:
        for concrete in module.__call__.concrete_functions:
            spec = concrete.structured_input_signature[0][0]
            if spec.shape.rank == 4 and spec.shape[1] and spec.shape[1] == spec.shape[2]:
                return int(spec.shape[1])
    except (AttributeError, IndexError, TypeError):
        pass
    return None


def describe_module(handle: str, fallback_size: int) -> ModuleInfo:
    """Loads the module in the driver, so a bad handle fails before any input is read."""
    import tensorflow as tf

    module = load_module(handle)
    size = _static_input_size(module) or fallback_size
    try:
        output = module(tf.zeros([1, size, size, 3], tf.float32))
    except Exception as e:
        raise EmbeddingModuleError(f"the embedding module {handle!r} does not accept float32 [1, {size}, {size}, 3]: "
                                   f"{type(e).__name__}: {str(e)[:300]}") from None
    if output.shape.rank != 2:
        raise EmbeddingModuleError(f"the embedding module {handle!r} returns shape {output.shape}; "
                                   "a feature-vector module returns [batch, dim]")
    return ModuleInfo(handle, size, int(output.shape[1]))


def make_embedding_fn(handle: str, input_size: int):
    """A function: list of encoded images -> float32 [n, dim], preprocessing with the shared function."""
    import tensorflow as tf

    from shared import preprocess

    module = load_module(handle)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def batch_fn(image_bytes):
        return module(preprocess.preprocess_batch(image_bytes, input_size))

    return lambda images: batch_fn(tf.constant(images)).numpy()


def save_random_mobilenet(path: str, size: int = 224, alpha: float = 1.0) -> str:
    """Saves MobileNetV2's architecture with random weights as a feature-vector module at `path`.

    For tests and benchmarks without network: it has the default module's interface (float32
    [N, size, size, 3] in [0, 1] -> [N, 1280]) and, at size 224 and alpha 1.0, its cost.
    """
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    backbone = tf_keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, include_top=False,
                                                 weights=None, pooling="avg")

    class FeatureVector(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def __call__(self, images):
            return self.model(images * 2.0 - 1.0, training=False)  # MobileNet expects [-1, 1]

    tf.saved_model.save(FeatureVector(backbone), path)
    return path
