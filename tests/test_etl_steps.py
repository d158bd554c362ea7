"""The ETL's steps one at a time, in Beam's style: `beam.Create` (or a tiny CSV) in, `assert_that` out.

A whole run on disk (test_etl_pipeline) shows that the steps fit together; these show what each
step does with each kind of input, so that a broken step fails its own test."""
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from etl import inputs, records
from shared import schema
from tests import image_factory


def as_tuples(rows):
    return [(r.uri, r.label) for r in rows]


def reasons_by_source(reject):
    return reject["source"], reject["reason"]


def test_read_labelled_rows_parses_the_csv_and_settles_duplicates(tmp_path):
    lines = ["path,label",  # a header: no row
             '"a, b.jpg",cat',  # a quoted comma in the path
             "",  # blank lines are no rows
             " c.jpg , dog ",  # spaces around fields dropped
             "d.jpg,owl,extra",  # three fields: malformed
             "e.jpg,",  # no label: malformed
             "f.jpg,cat", "f.jpg,cat",  # the same row twice: one kept, one duplicate
             "g.jpg,cat", "g.jpg,dog",  # one uri, two labels: neither kept
             "h.jpg,zebra", "h.jpg,owl"]  # a label the class names file lacks loses to one it has
    (tmp_path / "rows.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    here = str(tmp_path)
    with TestPipeline() as p:
        read = p | inputs.ReadLabelledRows(str(tmp_path / "rows.csv"), None, ["cat", "dog", "owl"])
        assert_that(read["rows"] | beam.Map(lambda r: (r.uri, r.label, r.key)), equal_to([
            (f"{here}/a, b.jpg", "cat", "a, b.jpg"), (f"{here}/c.jpg", "dog", "c.jpg"),
            (f"{here}/f.jpg", "cat", "f.jpg"), (f"{here}/h.jpg", "owl", "h.jpg")]), label="Rows")
        assert_that(read["rejects"] | beam.Map(reasons_by_source), equal_to([
            ("d.jpg,owl,extra", "malformed_row"), ("e.jpg,", "malformed_row"), ("f.jpg,cat", "duplicate"),
            ("g.jpg,cat", "conflicting_labels"), ("g.jpg,dog", "conflicting_labels"),
            ("h.jpg,zebra", "duplicate")]), label="Rejects")
        assert_that(read["num_rows"], equal_to([10]), label="RowCount")  # rows + rejects: what the run accounts


def test_a_header_beside_a_folder_of_its_name_is_a_header(tmp_path):
    """`images,label` next to an `images/` folder: a folder is no image, so the line names columns."""
    (tmp_path / "images").mkdir()
    image_factory.make_image(0, 1).save(tmp_path / "images" / "a.jpg", format="JPEG")
    (tmp_path / "rows.csv").write_text("images,label\nimages/a.jpg,cat\n")
    with TestPipeline() as p:
        read = p | inputs.ReadLabelledRows(str(tmp_path / "rows.csv"))
        assert_that(read["rows"] | beam.Map(lambda r: (r.uri, r.label)),
                    equal_to([(str(tmp_path / "images" / "a.jpg"), "cat")]), label="Rows")
        assert_that(read["rejects"], equal_to([]), label="Rejects")
        assert_that(read["num_rows"], equal_to([1]), label="RowCount")


@pytest.fixture(scope="module")
def loadable_files(tmp_path_factory):
    """One file per outcome of LoadImage, named for it."""
    folder = tmp_path_factory.mktemp("load")
    picture = image_factory.make_image(0, 3, size=(60, 40))
    jpeg = image_factory.encode(picture, "JPEG")
    files = {
        "rgb.jpg": jpeg,
        "rgb.png": image_factory.encode(picture, "PNG"),
        "text.jpg": b"hello, I am not a picture",
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": image_factory.png_with_claimed_size(30000, 30000),
        "big.jpg": jpeg + b"\0" * 100_000,  # over the 50 KB limit of the test below
        "unknown_label.jpg": jpeg,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "folder.jpg").mkdir()
    os.mkfifo(folder / "pipe.jpg")
    return folder, files


def test_load_image_rejects_each_bad_input_with_its_reason(loadable_files):
    folder, files = loadable_files
    names = sorted(files) + ["folder.jpg", "pipe.jpg", "missing.jpg"]
    rows = [inputs.Row(str(folder / name), "zebra" if name == "unknown_label.jpg" else "cat", name, name)
            for name in names]
    max_bytes = 50_000
    assert max(len(data) for name, data in files.items() if name != "big.jpg") < max_bytes
    with TestPipeline() as p:
        class_index = p | "Classes" >> beam.Create([{"cat": 0, "dog": 1}])
        loaded = (p | beam.Create(rows)
                  | beam.ParDo(records.LoadImage("jpeg", (80, 10, 10), 1_000_000, max_bytes, 95),
                               beam.pvalue.AsSingleton(class_index)).with_outputs("rejects", main="images"))
        assert_that(loaded.rejects | beam.Map(lambda r: (r["source"], r["reason"])), equal_to([
            ("text.jpg", "not_an_image"), ("empty.jpg", "not_an_image"), ("truncated.jpg", "corrupt"),
            ("bomb.png", "too_large"), ("big.jpg", "too_large"), ("unknown_label.jpg", "unknown_label"),
            ("folder.jpg", "read_error"), ("pipe.jpg", "read_error"), ("missing.jpg", "missing_file")]),
            label="Rejects")

        def check_images(images):
            by_name = {item.row.source: item for item in images}
            assert sorted(by_name) == ["rgb.jpg", "rgb.png"]
            assert by_name["rgb.jpg"].image_bytes == files["rgb.jpg"], "an RGB JPEG keeps its bytes"
            assert by_name["rgb.png"].image_bytes[:2] == b"\xff\xd8", "other images become JPEG"
            for name, item in by_name.items():
                assert (item.label_index, item.height, item.width) == (0, 40, 60), name
                assert item.split == records.split_for(name, (80, 10, 10))
                assert item.example_id == records.example_id_for(name)
                assert item.sort_key == records.sort_key_for(item.example_id)

        assert_that(loaded.images, check_images, label="Images")


def loaded(name: str, image_bytes: bytes, label_index: int = 1) -> records.Loaded:
    row = inputs.Row(f"/data/{name}", ["cat", "dog"][label_index], name, name)
    example_id = records.example_id_for(name)
    return records.Loaded(row, label_index, "valid", example_id, records.sort_key_for(example_id), 40, 48, image_bytes)


def test_encode_jpeg_writes_the_bytes_and_the_fields_the_schema_names():
    features = schema.record_features("jpeg")
    items = [loaded("a.jpg", b"\xff\xd8first"), loaded("b.jpg", b"\xff\xd8second", label_index=0)]

    def check(encoded):
        assert sorted((e.split, e.sort_key) for e in encoded) == sorted(("valid", i.sort_key) for i in items)
        got = {schema.decode_example(features, e.serialized)["uri"]: schema.decode_example(features, e.serialized)
               for e in encoded}
        for item in items:
            assert got[item.row.uri] == {"image": item.image_bytes, "label": item.label_index,
                                         "label_name": item.row.label, "uri": item.row.uri,
                                         "example_id": item.example_id, "height": 40, "width": 48}

    with TestPipeline() as p:
        assert_that(p | beam.Create(items) | beam.ParDo(records.EncodeJpeg(features)), check)


def test_encode_tensor_preprocesses_a_batch_and_rejects_only_the_image_tensorflow_cannot_decode():
    import tensorflow as tf

    from shared import preprocess

    features = schema.record_features("pixels", image_size=8)
    good = [image_factory.encode(image_factory.make_image(i, i), "JPEG") for i in range(2)]
    batch = [loaded("a.jpg", good[0]), loaded("bad.jpg", b"\xff\xd8 not a JPEG after all"), loaded("c.jpg", good[1])]
    expected = {uri: preprocess.preprocess_image(tf.constant(data), 8).numpy()
                for uri, data in (("/data/a.jpg", good[0]), ("/data/c.jpg", good[1]))}

    def check(encoded):
        got = {schema.decode_example(features, e.serialized)["uri"]: schema.decode_example(features, e.serialized)
               for e in encoded}
        assert sorted(got) == sorted(expected)
        for uri, record in got.items():
            np.testing.assert_array_equal(record["image"], expected[uri])
            assert record["label"] == 1 and record["height"] == 40

    with TestPipeline() as p:
        out = (p | beam.Create([batch])
               | beam.ParDo(records.EncodeTensor(features, lambda: records.make_pixels_fn(8))).with_outputs(
                   "rejects", main="records"))
        assert_that(out.records, check, label="Records")
        assert_that(out.rejects | beam.Map(lambda r: (r["uri"], r["reason"])),
                    equal_to([("/data/bad.jpg", "corrupt")]), label="Rejects")
