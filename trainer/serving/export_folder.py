"""Putting an export folder in place on any tf.io.gfile filesystem (local, gs://, ram://).

Folders differ between filesystems: a local rename of a folder is atomic; GCS has no folders, so
TensorFlow's rename there copies and deletes each object; ram:// renames only the folder's own
entry and leaves its files behind. `exists` is no guard for a folder either: on ram:// it is true
for any string prefix of a stored name (`run/export` "exists" while `run/export.tmp` does).
"""
from __future__ import annotations

from shared.paths import is_remote

SAVED_MODEL_FILE = "saved_model.pb"  # TensorFlow writes it last: its presence marks a complete SavedModel


def remove_folder(path: str) -> None:
    """Removes `path` and everything in it; a folder that is not there is not an error."""
    import tensorflow as tf

    try:
        tf.io.gfile.rmtree(path)
    except tf.errors.NotFoundError:
        pass


def move_folder_into_place(tmp_dir: str, final_dir: str) -> None:
    """Moves the finished folder `tmp_dir` to `final_dir`, which must not exist.

    Local: one rename, so `final_dir` is complete or absent at every instant. Elsewhere: each file is
    copied (saved_model.pb last, so a reader that checks for it sees a complete SavedModel), then
    `tmp_dir` is removed; on GCS that is what a folder rename does anyway, one object at a time.
    """
    import tensorflow as tf

    if not is_remote(tmp_dir) and not is_remote(final_dir):
        tf.io.gfile.rename(tmp_dir, final_dir)
        return
    tmp_dir, final_dir = tmp_dir.rstrip("/"), final_dir.rstrip("/")
    last = []
    for folder, _, files in tf.io.gfile.walk(tmp_dir):
        folder = folder.rstrip("/")  # a "folder/" listed by GCS would otherwise give "a//b" object names
        target = final_dir + folder[len(tmp_dir):]
        tf.io.gfile.makedirs(target)
        for name in files:
            pair = (folder + "/" + name, target + "/" + name)
            if name == SAVED_MODEL_FILE and folder == tmp_dir:
                last.append(pair)
            else:
                tf.io.gfile.copy(*pair, overwrite=True)
    for source, target in last:
        tf.io.gfile.copy(source, target, overwrite=True)
    remove_folder(tmp_dir)
