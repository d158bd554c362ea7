"""A copy of a training run's export with `serving_default` only, for TF Serving or a Vertex AI endpoint:

    python -m trainer.bytes_only_export --model runs/r1/export --output runs/r1/export_bytes_only

Those servers offer every signature of a SavedModel to every client, and the export's
`predict_filenames` reads the paths a client sends inside the graph: any file or bucket object the
server can reach. (`trainer.serve` runs `serving_default` only, and reads `filenames` instances
itself, under --allow_root.)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from shared import native_log
from trainer.serving.contract import CLASS_NAMES_FILE, DATASET_METADATA_FILE, SERVING_SIGNATURE, TRAIN_CONFIG_FILE
from trainer.serving.export_folder import move_folder_into_place, remove_folder
from trainer.serving.exported_model import ExportError, load_exported_model

# Ops that read, list or write a path given at run time: none may be left in a bytes-only copy.
# (SaveV2 and RestoreV2 stay: every SavedModel's checkpoint functions hold them, and no signature calls them.)
FILE_ACCESS_OPS = frozenset({"ReadFile", "WriteFile", "MatchingFiles", "TFRecordDataset", "TFRecordDatasetV2",
                             "TextLineDataset", "FixedLengthRecordDataset", "FixedLengthRecordDatasetV2"})


def saved_model_op_types(export_dir: str) -> set[str]:
    """Every op type in the SavedModel's graphs and function library (local or gs://)."""
    import tensorflow as tf
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
    import tensorflow as tf

    if tf.io.gfile.exists(output_dir):
        raise ExportError(f"{output_dir} already exists; remove it or choose another output folder")
    original = load_exported_model(export_dir)  # ExportError unless it has the contract's serving_default
    loaded = tf.saved_model.load(export_dir)
    # The functions behind the signatures (predict_bytes, predict_filenames) would be saved again as
    # functions: not signatures a server runs, but still in the file. The signature keeps its own.
    for name in [n for n in dir(loaded) if isinstance(getattr(loaded, n, None), tf.types.experimental.GenericFunction)]:
        delattr(loaded, name)
    tmp_dir = output_dir.rstrip("/") + ".tmp"
    remove_folder(tmp_dir)
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
    move_folder_into_place(tmp_dir, output_dir)
    return output_dir


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.bytes_only_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="the export folder a training run wrote (runs/<run>/export)")
    p.add_argument("--output", required=True, help="a new folder for the copy (local or gs://)")
    args = p.parse_args(argv)
    native_log.load_tensorflow()
    try:
        write_bytes_only_export(args.model, args.output)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {args.model} with serving_default only")
    return 0


if __name__ == "__main__":
    sys.exit(run())
