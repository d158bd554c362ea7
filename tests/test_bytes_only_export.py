"""trainer.bytes_only_export: a copy of an export that TF Serving can offer to any client, since
it cannot read the paths a client sends."""
import os

import pytest
import tensorflow as tf

from tests.image_factory import encode, make_image
from tests.serving_fixtures import marker_path, write_test_export
from trainer.serving import bytes_only_export, contract
from trainer.serving.exported_model import ExportError, load_exported_model


@pytest.fixture()
def original(tmp_path) -> str:
    path = write_test_export(str(tmp_path / "run" / "export"))
    for name in (contract.CLASS_NAMES_FILE, contract.TRAIN_CONFIG_FILE):  # what the trainer writes beside it
        (tmp_path / "run" / "export" / name).write_text(f"{name}\n")
    return path


def test_the_copy_has_serving_default_only_answers_alike_and_cannot_read_files(original, tmp_path):
    copy_dir = str(tmp_path / "run" / "export_bytes_only")
    assert bytes_only_export.run(["--model", original, "--output", copy_dir]) == 0
    assert "ReadFile" in bytes_only_export.saved_model_op_types(original)  # predict_filenames reads client paths in the graph...
    assert "ReadFile" not in bytes_only_export.saved_model_op_types(copy_dir)  # ...and nothing in the copy can
    loaded = tf.saved_model.load(copy_dir)
    assert list(loaded.signatures) == ["serving_default"]
    assert not [n for n in dir(loaded) if isinstance(getattr(loaded, n), tf.types.experimental.GenericFunction)]
    images = [encode(make_image(c, seed=c)) for c in range(3)] + [encode(make_image(1, seed=9), "PNG")]
    assert load_exported_model(copy_dir).predict(images) == load_exported_model(original).predict(images)
    for name in (contract.CLASS_NAMES_FILE, contract.TRAIN_CONFIG_FILE):
        assert open(os.path.join(copy_dir, name)).read() == f"{name}\n"
    assert not os.path.exists(copy_dir + ".tmp")
    assert not os.path.exists(marker_path(original))


def test_an_existing_output_or_a_folder_that_is_no_export_is_refused(original, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"{taken} already exists"):
        bytes_only_export.write_bytes_only_export(original, str(taken))
    assert os.listdir(taken) == ["keep.txt"]
    assert bytes_only_export.run(["--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")]) == 2
    assert "is not a loadable SavedModel" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_a_file_reading_function_on_a_nested_object_is_refused(original, tmp_path):
    # Only the root's functions are deleted; one a nested object holds is saved with the copy.
    class Reader(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def read(self, paths):
            return tf.map_fn(tf.io.read_file, paths)

    loaded = tf.saved_model.load(original)
    loaded.nested = tf.Module()
    loaded.nested.reader = Reader()
    nested_export = str(tmp_path / "nested" / "export")
    tf.saved_model.save(loaded, nested_export, signatures=dict(loaded.signatures))
    copy_dir = str(tmp_path / "nested" / "export_bytes_only")
    with pytest.raises(ExportError, match=r"still holds the file ops \['ReadFile'\]"):
        bytes_only_export.write_bytes_only_export(nested_export, copy_dir)
    assert not os.path.exists(copy_dir)
