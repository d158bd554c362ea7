"""The SavedModel for serving: image bytes or file names in; probability, class index and name out.

Decoding and preprocessing run inside the graph with the shared function the ETL used
(`shared.preprocess.preprocess_batch`, a `tf.map_fn`), so clients send encoded images and
never learn the model's input size. A model trained on the embeddings form gets the
embedding module in front of it, so its clients send images too.

Signatures (both batched, both return the same four outputs):
  serving_default(image_bytes: string [N])  and  predict_filenames(filenames: string [N])
  -> probability float32 [N], class_index int64 [N], class_name string [N], probabilities float32 [N, K]

`write_bytes_only_export` copies an export without `predict_filenames`, for servers that offer
every signature to every client (TF Serving, Vertex AI endpoints).
"""
from __future__ import annotations

import json
import os

import tensorflow as tf
import tf_keras as keras

from shared import metadata, preprocess
from trainer.serving.exported_model import SERVING_SIGNATURE, ExportError, load_exported_model

FILENAMES_SIGNATURE = "predict_filenames"
CLASS_NAMES_FILE = "class_names.txt"  # one name per line, in class_index order
DATASET_METADATA_FILE = "dataset_metadata.json"  # the training data's sidecar, verbatim (provenance)
TRAIN_CONFIG_FILE = "train_config.json"  # how the model was trained, and its metrics
# Ops that read, list or write a path given at run time: none may be left in a bytes-only copy.
# (SaveV2 and RestoreV2 stay: every SavedModel's checkpoint functions hold them, and no signature calls them.)
FILE_ACCESS_OPS = frozenset({"ReadFile", "WriteFile", "MatchingFiles", "TFRecordDataset", "TFRecordDatasetV2",
                             "TextLineDataset", "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2"})


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


def saved_model_op_types(export_dir: str) -> set[str]:
    """Every op type in the SavedModel's graphs and function library (local or gs://)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    types = set()
    for meta_graph in proto.meta_graphs:
        types |= {node.op for node in meta_graph.graph_def.node}
        for fn in meta_graph.graph_def.library.function:
            types |= {node.op for node in fn.node_def}
    return types


def write_bytes_only_export(export_dir: str, output_dir: str) -> str:
    """Copies the export at `export_dir` to `output_dir` with `serving_default` only, and the files
    beside it; returns `output_dir`.

    TF Serving and Vertex AI endpoints offer every signature of a SavedModel, so behind them
    `predict_filenames` lets any client make the server read any path or bucket object it can
    reach. The copy is checked before it is put in place: it holds no op that takes a path
    (FILE_ACCESS_OPS) and its one signature answers a generated JPEG exactly as the original does.
    Raises ExportError naming what is wrong.
    """
    if tf.io.gfile.exists(output_dir):
        raise ExportError(f"{output_dir} already exists; remove it or choose another output folder")
    original = load_exported_model(export_dir)  # ExportError unless it has the contract's serving_default
    loaded = tf.saved_model.load(export_dir)
    # The functions behind the signatures (predict_bytes, predict_filenames) would be saved again as
    # functions: not signatures a server runs, but still in the file. The signature keeps its own.
    for name in [n for n in dir(loaded) if isinstance(getattr(loaded, n, None), tf.types.experimental.GenericFunction)]:
        delattr(loaded, name)
    tmp_dir = output_dir.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp_dir):
        tf.io.gfile.rmtree(tmp_dir)
    tf.saved_model.save(loaded, tmp_dir, signatures={SERVING_SIGNATURE: loaded.signatures[SERVING_SIGNATURE]})
    for name in (CLASS_NAMES_FILE, DATASET_METADATA_FILE, TRAIN_CONFIG_FILE):
        if tf.io.gfile.exists(os.path.join(export_dir, name)):
            tf.io.gfile.copy(os.path.join(export_dir, name), os.path.join(tmp_dir, name))
    copy = load_exported_model(tmp_dir)
    if set(copy.signatures) != {SERVING_SIGNATURE}:
        raise ExportError(f"the copy in {tmp_dir} has the signatures {sorted(copy.signatures)}, not only {SERVING_SIGNATURE!r}")
    # Only the root's functions are deleted above; one on a nested object would still be saved.
    file_ops = sorted(saved_model_op_types(tmp_dir) & FILE_ACCESS_OPS)
    if file_ops:
        raise ExportError(f"the copy in {tmp_dir} still holds the file ops {file_ops}, in a function of an object "
                          f"nested in {export_dir} (a model or embedding module): it is not safe to serve")
    probe = [tf.io.encode_jpeg(tf.fill([40, 30, 3], tf.constant(200, tf.uint8))).numpy()]
    got, want = copy.predict(probe), original.predict(probe)
    if got != want:
        raise ExportError(f"the copy in {tmp_dir} answers {got} where {export_dir} answers {want}")
    tf.io.gfile.rename(tmp_dir, output_dir)
    return output_dir
