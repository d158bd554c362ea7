"""The trainer's `export/` as Python sees it: load, check the signature, predict a batch of image bytes.

Used by `trainer.predict` (files on the command line) and `trainer.serving.app` (REST requests).
Both hand the model encoded image bytes only: the `predict_filenames` signature, which reads
paths inside the graph, is never called here, so no caller-supplied path reaches TensorFlow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from shared import image_check
from trainer.serving.contract import INPUT_NAME, REQUIRED_OUTPUTS, SERVING_SIGNATURE


class ExportError(RuntimeError):
    """The folder is not an export this code can serve; the message names the folder and what is wrong."""


class BatchDecodeError(ValueError):
    """The model could not decode one image of a batch; `index` is its position in the batch."""

    def __init__(self, index: int, detail: str):
        super().__init__(f"image {index}: {detail}")
        self.index = index
        self.detail = detail


def prepare_image_bytes(data: bytes, header: image_check.ImageHeader, verify: bool = True) -> bytes:
    """Untrusted bytes whose header passed `image_check.read_header` -> bytes the serving
    signature can decode, or ImageRejected('corrupt').

    What the graph decodes itself (JPEG, PNG, still WebP, plain BMP) reaches it as sent; the rest
    (GIF, animated WebP, TIFF, other BMPs) becomes PNG of its first frame
    (`image_check.to_tf_decodable`), as in the ETL. `verify` decodes the whole image
    with PIL first, so a corrupt file is named before the batched call: `predict` does; the
    server does not (~0.4 ms per 320x240 image, a third of its batch-32 throughput), since TF
    refuses the same files and `ExportedModel.predict` then names the image one call at a time.
    """
    if verify:
        image_check.verify_decodes(data, header)
    return image_check.to_tf_decodable(data, header)


@dataclasses.dataclass(frozen=True)
class TensorDescription:
    dtype: str  # TF's enum name, as TF Serving's metadata spells it: "DT_STRING", "DT_FLOAT", ...
    shape: tuple[int | None, ...] | None  # None = unknown rank


class ExportedModel:
    """A loaded `export/`; `predict` is safe to call from several threads at once."""

    def __init__(self, path: str):
        import tensorflow as tf

        self.path = path
        try:
            self._loaded = tf.saved_model.load(path)
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ExportError(f"{path} is not a loadable SavedModel ({type(e).__name__}: {e}); "
                              f"pass the `export` folder a training run wrote") from e
        signatures = dict(self._loaded.signatures)
        if SERVING_SIGNATURE not in signatures:
            raise ExportError(f"{path} has no {SERVING_SIGNATURE!r} signature; it has {sorted(signatures)}")
        self._serve = signatures[SERVING_SIGNATURE]
        self.signatures = {name: _describe(fn) for name, fn in signatures.items()}
        inputs, outputs = self.signatures[SERVING_SIGNATURE]
        if INPUT_NAME not in inputs or inputs[INPUT_NAME].dtype != "DT_STRING":
            raise ExportError(f"{path}: {SERVING_SIGNATURE} must take a string tensor {INPUT_NAME!r}; it takes {inputs}")
        missing = [name for name in REQUIRED_OUTPUTS if name not in outputs]
        if missing:
            raise ExportError(f"{path}: {SERVING_SIGNATURE} lacks the outputs {missing}; it has {sorted(outputs)}")

    def predict(self, images: Sequence[bytes]) -> list[dict[str, Any]]:
        """One call to `serving_default` for the whole batch -> one dict of outputs per image.

        Strings come back as str, numbers as Python numbers, vectors as lists (JSON-ready).
        Raises BatchDecodeError naming the image when TensorFlow refuses one that passed the checks.
        """
        import tensorflow as tf

        if not images:
            return []
        try:
            outputs = self._serve(**{INPUT_NAME: tf.constant(list(images), dtype=tf.string)})
        except tf.errors.InvalidArgumentError as e:
            # A corrupt image (the server does not decode with PIL first): find which, one call each.
            for index, image in enumerate(images):
                try:
                    self._serve(**{INPUT_NAME: tf.constant([image], dtype=tf.string)})
                except tf.errors.InvalidArgumentError as single:
                    raise BatchDecodeError(index, f"the image does not decode (corrupt or truncated: "
                                                  f"{image_check.decode_error_cause(single.message)})") from None
            raise BatchDecodeError(-1, f"the batch failed but every image alone succeeded: {e.message}") from e
        # tolist() converts a whole column in C (0.7 ms -> 0.05 ms for 32 rows of the four outputs).
        columns = {name: _to_json_column(tensor.numpy()) for name, tensor in outputs.items()}
        return [{name: column[i] for name, column in columns.items()} for i in range(len(images))]


def _describe(fn) -> tuple[dict[str, TensorDescription], dict[str, TensorDescription]]:
    """(inputs, outputs) of a concrete function, by name."""
    _, input_specs = fn.structured_input_signature
    return ({name: _tensor_description(spec) for name, spec in input_specs.items()},
            {name: _tensor_description(spec) for name, spec in fn.structured_outputs.items()})


def _tensor_description(spec) -> TensorDescription:
    from tensorflow.core.framework import types_pb2

    shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    return TensorDescription(types_pb2.DataType.Name(spec.dtype.as_datatype_enum), shape)


def _to_json_column(column: np.ndarray) -> list[Any]:
    """A batch-major output -> one JSON-ready value per row: str for strings, Python numbers, nested lists."""
    if column.dtype.kind in ("O", "S"):  # TF strings arrive as bytes objects
        return np.vectorize(lambda b: b.decode("utf-8", errors="replace"), otypes=[object])(column).tolist()
    return column.tolist()


def disable_thread_spinning() -> None:
    """Makes TensorFlow's two thread pools (inter-op and intra-op) sleep as soon as they run out of
    work, instead of spinning on the cores first. Call before TensorFlow's runtime starts (before
    the first op or model load): RuntimeError otherwise, since the pools exist by then.

    Why: between a server's model calls, spinning pools hold the cores the event loop and the
    parser need (docs/serving.md has the measurements). TF2 has no public switch, so this is the one
    place that sets ConfigProto's experimental.disable_thread_spinning on the eager context's private
    `_config`; tests/test_serve.py checks that it still arrives.
    """
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    runtime = context.context()
    if runtime._initialized:
        raise RuntimeError("TensorFlow's runtime has already started, so its thread pools cannot change; "
                           "call disable_thread_spinning() before loading a model or running an op")
    config = config_pb2.ConfigProto()
    if runtime._config is not None:
        config.CopyFrom(runtime._config)
    config.experimental.disable_thread_spinning = True
    runtime._config = config


def load_exported_model(path: str) -> ExportedModel:
    """Loads `export/` and checks it has the contract's `serving_default`; raises ExportError otherwise."""
    return ExportedModel(path)
