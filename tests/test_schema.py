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


def _library_example(features, values) -> tf.train.Example:
    """The record built with the protobuf library, field by field (the reference for the hand-written bytes)."""
    feature = {}
    for f in features:
        v = values[f.name]
        if f.encoding == "int64":
            feature[f.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
        elif f.encoding == "utf8":
            feature[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8")]))
        elif f.encoding == "jpeg":
            feature[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        else:
            feature[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[np.asarray(v, "<f4").tobytes()]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


@pytest.mark.parametrize("form", schema.FORMS)
@pytest.mark.parametrize("extremes", [False, True])
def test_hand_written_bytes_are_the_protobuf_message(form, extremes):
    """`example_pieces` writes the wire format itself (so that a 600 KB payload is never copied):
    the bytes must parse to exactly the message the protobuf library builds, in the library's length."""
    rng = np.random.default_rng(1)
    features = schema.record_features(form, image_size=8, embedding_size=16)
    values = _values(form, rng)
    if extremes:  # 10-byte varints, multi-byte lengths, empty strings
        values |= {"label": -(2 ** 63), "height": 2 ** 63 - 1, "width": 0, "label_name": "", "uri": "é" * 5000}
    pieces = schema.example_pieces(features, values)
    serialized = schema.encode_example(features, values)
    expected = _library_example(features, values)
    assert b"".join(pieces) == serialized
    assert tf.train.Example.FromString(serialized) == expected
    assert len(serialized) == len(expected.SerializeToString())
    if form != "jpeg":  # a large payload given as bytes is one of the pieces, not a copy
        large = schema.record_features(form, image_size=64, embedding_size=2048)
        raw = rng.random(int(np.prod(large[0].shape)), dtype=np.float32).tobytes()
        assert any(p is raw for p in schema.example_pieces(large, values | {large[0].name: raw}))


def test_an_int_out_of_int64_is_named():
    features = schema.record_features("jpeg")
    with pytest.raises(schema.SchemaError, match="'height'.*does not fit in int64"):
        schema.encode_example(features, COMMON | {"image": b"x", "height": 2 ** 63})
