"""The SavedModel for serving: image bytes or file names in; probability, class index and name out.

Decoding and preprocessing run inside the graph with the shared function the ETL used
(`shared.preprocess.preprocess_batch`), so clients send encoded images and
never learn the model's input size. A model trained on the embeddings form gets the
embedding module in front of it, so its clients send images too.

Its signatures, tensor names and the files beside it are defined in trainer.serving.contract.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf
import tf_keras as keras

from shared import metadata, preprocess
from trainer.serving.contract import (CLASS_NAMES_FILE, DATASET_METADATA_FILE, FILENAMES_SIGNATURE,
                                      SERVING_SIGNATURE, TRAIN_CONFIG_FILE)
from trainer.serving.export_folder import move_folder_into_place, remove_folder


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
    # --hub_handle is the mobilenet model's, and a run folder refuses a changed flag: it cannot help here.
    return models.load_hub_layer(handle, name="embedding_module", advice=(
        "the export puts the module the ETL used (the sidecar's preprocessing.module) in front of the model, so it "
        "must load where the trainer runs: a relative path is taken from the current folder, so run from the folder "
        "the ETL ran in, or re-run the ETL with an --embedding_module this machine can load"))


def export_model(model: keras.Model, meta: metadata.DatasetMetadata, export_dir: str, *, input_size: int | None,
                 dataset_sidecar_json: str, train_info: dict, embedder=None) -> str:
    """Writes the SavedModel and, next to its files, the class names, the data's sidecar and `train_info`.
    `embedder`: the embeddings form's module as `load_embedder` returns it, if the caller has loaded it."""
    if embedder is None and meta.form == "embeddings":
        embedder = load_embedder(meta)
    module = ServingModule(model, meta.class_names, serving_image_size(meta, input_size), embedder)
    signatures = {
        SERVING_SIGNATURE: module.predict_bytes.get_concrete_function(),
        FILENAMES_SIGNATURE: module.predict_filenames.get_concrete_function(),
    }
    tmp_dir = export_dir.rstrip("/") + ".tmp"
    remove_folder(tmp_dir)
    tf.saved_model.save(module, tmp_dir, signatures=signatures)
    with tf.io.gfile.GFile(os.path.join(tmp_dir, CLASS_NAMES_FILE), "w") as f:
        f.write("".join(name + "\n" for name in meta.class_names))
    with tf.io.gfile.GFile(os.path.join(tmp_dir, DATASET_METADATA_FILE), "w") as f:
        f.write(dataset_sidecar_json)
    with tf.io.gfile.GFile(os.path.join(tmp_dir, TRAIN_CONFIG_FILE), "w") as f:
        f.write(json.dumps(train_info, indent=2) + "\n")
    # Moved last, so an export folder is complete (a crash leaves `export.tmp`, or on gs:// an export
    # without saved_model.pb).
    remove_folder(export_dir)
    move_folder_into_place(tmp_dir, export_dir)
    return export_dir
