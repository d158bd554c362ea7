"""The record schema round-trips for every form, in Python and in-graph, and refuses bad values."""
import os

import numpy as np
import pytest
import tensorflow as tf

from etl import tfrecord_io
from shared import metadata, schema

COMMON = {"label": 2, "label_name": "daisy ü", "uri": "gs://b/x, y.jpg", "example_id": "abc", "height": 40, "width": 48}


def _values(form, rng):
    if form == "jpeg":
        return COMMON | {"image": b"\xff\xd8 not decoded here"}
    if form == "pixels":
        return COMMON | {"image": rng.random((8, 8, 3), dtype=np.float32)}
    return COMMON | {"embedding": rng.random(16, dtype=np.float32)}


@pytest.mark.parametrize("form", schema.FORMS)
def test_round_trip_per_form(form):
    rng = np.random.default_rng(0)
    features = schema.record_features(form, image_size=8, embedding_size=16)
    values = [_values(form, rng) for _ in range(3)]
    serialized = [schema.encode_example(features, v) for v in values]

    decoded = schema.decode_example(features, serialized[1])
    parsed = schema.parse_batch(features, tf.constant(serialized))
    payload = schema.payload_feature(features).name
    for name, expected in values[1].items():
        got_py, got_tf = decoded[name], parsed[name][1].numpy()
        if isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(got_py, expected)
            np.testing.assert_array_equal(got_tf, expected)
        elif isinstance(expected, str):
            assert got_py == expected and got_tf.decode("utf-8") == expected
        else:
            assert got_py == expected and got_tf == expected
    assert parsed[payload].shape[0] == 3


def test_features_survive_the_sidecar():
    features = schema.record_features("pixels", image_size=32)
    assert schema.features_from_json(schema.features_to_json(features)) == features


def test_missing_field_is_named():
    features = schema.record_features("embeddings", embedding_size=4)
    with pytest.raises(schema.SchemaError, match="'embedding'"):
        schema.encode_example(features, COMMON)


def test_wrong_float_count_is_named():
    features = schema.record_features("pixels", image_size=4)
    with pytest.raises(schema.SchemaError, match="'image'.*48 floats"):
        schema.encode_example(features, COMMON | {"image": np.zeros(10, np.float32)})


def test_unknown_form_is_refused():
    with pytest.raises(schema.SchemaError, match="unknown form 'png'"):
        schema.record_features("png")


def test_framing_matches_tensorflow_reader(tmp_path):
    records = [b"a", b"", b"x" * 1000]
    path = tmp_path / "f.tfrecord"
    path.write_bytes(b"".join(tfrecord_io.frame_record(r) for r in records))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
    assert list(tfrecord_io.read_framed_records(path.read_bytes())) == records


def test_other_schema_version_is_refused():
    body = {"schema_version": schema.SCHEMA_VERSION + 1, "form": "jpeg", "class_names": [], "features": [],
            "preprocessing": {}, "splits": {}}
    with pytest.raises(metadata.DatasetError, match="schema_version"):
        metadata.metadata_from_dict(body, source="x/metadata.json")


def test_the_same_record_has_the_same_bytes_in_every_process():
    """Shard sha256s in the sidecar are only useful if equal inputs give equal bytes; a protobuf
    map serialises in an order that differs between processes unless asked to be deterministic."""
    import subprocess
    import sys

    code = ("import hashlib; from shared import schema; f = schema.record_features('pixels', image_size=2); "
            "print(hashlib.sha256(schema.encode_example(f, {'image': [0.5] * 12, 'label': 1, 'label_name': 'b', "
            "'uri': 'x.jpg', 'example_id': 'e', 'height': 2, 'width': 2})).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed), "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout
               for seed in range(3)}
    assert len(digests) == 1, digests
