"""The SavedModel for serving: image bytes or file names in; probability, class index and name out.

Decoding and preprocessing run inside the graph with the shared function the ETL used
(`shared.preprocess.preprocess_batch`, a `tf.map_fn`), so clients send encoded images and
never learn the model's input size. A model trained on the embeddings form gets the
embedding module in front of it, so its clients send images too.

Signatures (both batched, both return the same four outputs):
  serving_default(image_bytes: string [N])  and  predict_filenames(filenames: string [N])
  -> probability float32 [N], class_index int64 [N], class_name string [N], probabilities float32 [N, K]
"""
from __future__ import annotations

import json
import os

import tensorflow as tf
import tf_keras as keras

from shared import metadata, preprocess

CLASS_NAMES_FILE = "class_names.txt"  # one name per line, in class_index order
DATASET_METADATA_FILE = "dataset_metadata.json"  # the training data's sidecar, verbatim (provenance)
TRAIN_CONFIG_FILE = "train_config.json"  # how the model was trained, and its metrics


class ServingModule(tf.Module):
    """Holds the trained model (and the embedding module, if any) and the class names."""

    def __init__(self, model: keras.Model, class_names: tuple[str, ...], image_size: int, embedder=None):
        super().__init__(name="serving")
        self.model = model
        self.embedder = embedder
        self.image_size = int(image_size)  # the size preprocess_image resizes to
        self.class_names = tf.constant(list(class_names))

    def _outputs(self, image_bytes):
        images = preprocess.preprocess_batch(image_bytes, self.image_size)
        x = self.embedder(images) if self.embedder is not None else images
        probabilities = self.model(x, training=False)
        class_index = tf.math.argmax(probabilities, axis=1)
        return {
            "probability": tf.math.reduce_max(probabilities, axis=1),
            "class_index": class_index,
            "class_name": tf.gather(self.class_names, class_index),
            "probabilities": probabilities,
        }

    # The Python argument names become the signatures' input names.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def predict_bytes(self, image_bytes):
        return self._outputs(image_bytes)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def predict_filenames(self, filenames):
        return self._outputs(tf.map_fn(tf.io.read_file, filenames))


def serving_image_size(meta: metadata.DatasetMetadata, input_size: int | None) -> int:
    """The size serving resizes images to: the model's input size, or the embedding module's."""
    if meta.form == "embeddings":
        return int(meta.preprocessing["input_size"])
    return int(input_size)


def load_embedder(meta: metadata.DatasetMetadata):
    """The embedding module the ETL used, as a frozen Keras layer (so it is saved with the export)."""
    from trainer import models

    handle = meta.preprocessing.get("module")
    if not handle:
        raise metadata.DatasetError(f"the embeddings sidecar has no preprocessing.module: {dict(meta.preprocessing)}")
    return models.load_hub_layer(handle, name="embedding_module")


def export_model(model: keras.Model, meta: metadata.DatasetMetadata, export_dir: str, *, input_size: int | None,
                 dataset_sidecar_json: str, train_info: dict) -> str:
    """Writes the SavedModel and, next to its files, the class names, the data's sidecar and `train_info`."""
    embedder = load_embedder(meta) if meta.form == "embeddings" else None
    module = ServingModule(model, meta.class_names, serving_image_size(meta, input_size), embedder)
    signatures = {
        "serving_default": module.predict_bytes.get_concrete_function(),
        "predict_filenames": module.predict_filenames.get_concrete_function(),
    }
    tmp_dir = export_dir.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    tf.saved_model.save(module, tmp_dir, signatures=signatures)
    with tf.io.gfile.GFile(os.path.join(tmp_dir, CLASS_NAMES_FILE), "w") as f:
        f.write("".join(name + "\n" for name in meta.class_names))
    with tf.io.gfile.GFile(os.path.join(tmp_dir, DATASET_METADATA_FILE), "w") as f:
        f.write(dataset_sidecar_json)
    with tf.io.gfile.GFile(os.path.join(tmp_dir, TRAIN_CONFIG_FILE), "w") as f:
        f.write(json.dumps(train_info, indent=2) + "\n")
    # Rename last, so an export folder is always complete (a crash leaves only `export.tmp`).
    if tf.io.gfile.exists(export_dir):
        tf.io.gfile.rmtree(export_dir)
    tf.io.gfile.rename(tmp_dir, export_dir)
    return export_dir
