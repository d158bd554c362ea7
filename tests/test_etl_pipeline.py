"""The ETL on generated images, for each form: what lands on disk is what the sidecar says."""
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from etl import pipeline, publish
from etl import records as records_lib
from shared import layout, metadata, preprocess, schema
from tests import image_factory


def read_records(out_dir, meta, split=None):
    """All records of a dataset (or one split), decoded with the schema, keyed by uri."""
    out = {}
    for s in ([split] if split else layout.SPLITS):
        for path in meta.shard_paths(out_dir, s):
            for raw in tf.data.TFRecordDataset(path):
                record = schema.decode_example(meta.features, raw.numpy())
                record["split"] = s
                out[record["uri"]] = record
    return out


def run_etl(input_path, out_dir, *flags):
    return pipeline.run(["--input", input_path, "--output", str(out_dir), *flags])


def test_jpeg_form_keeps_rgb_jpeg_bytes_and_reencodes_the_rest(tmp_path):
    root = tmp_path / "in"
    rows = image_factory.write_class_folders(str(root), classes=("a", "b"), per_class=4)
    picture = image_factory.make_image(0, seed=7)
    others = {
        "png": image_factory.encode(picture, "PNG"),
        "gif": image_factory.encode(picture.convert("P"), "GIF"),
        "bmp": image_factory.encode(picture, "BMP"),
        "gray.jpg": image_factory.encode(picture.convert("L"), "JPEG"),
        "cmyk.jpg": image_factory.encode(picture.convert("CMYK"), "JPEG"),
    }
    for name, data in others.items():
        path = root / "a" / f"other.{name}"
        path.write_bytes(data)
        rows.append((str(path), "a"))
    csv_path = image_factory.write_csv(str(tmp_path / "all.csv"), rows)

    meta = run_etl(csv_path, tmp_path / "out", "--form", "jpeg")
    records = read_records(str(tmp_path / "out"), meta)
    assert len(records) == len(rows)
    for uri, record in records.items():
        source = open(uri, "rb").read()
        image = Image.open(io.BytesIO(record["image"]))
        assert image.format == "JPEG" and image.mode == "RGB", uri
        if uri.endswith("0.jpg") or "/00" in uri:
            assert record["image"] == source, "an RGB JPEG must keep its original bytes"
        else:
            assert record["image"] != source
        decoded = preprocess.decode_image(record["image"]).numpy()
        assert decoded.shape == (40, 48, 3)
        assert (record["height"], record["width"]) == (40, 48)
        assert meta.class_names[record["label"]] == record["label_name"]


def test_pixels_form_is_the_shared_preprocessing_of_the_file(tmp_path, class_folder_dataset):
    meta = run_etl(class_folder_dataset, tmp_path / "out", "--form", "pixels", "--image_size", "16")
    assert meta.form == "pixels" and meta.payload.shape == (16, 16, 3)
    assert meta.class_names == ("cat", "dog", "owl")  # sorted sub-folder names; README, dict.txt ignored
    records = read_records(str(tmp_path / "out"), meta)
    assert len(records) == 24
    for uri, record in list(records.items())[:6]:
        expected = preprocess.preprocess_image(tf.io.read_file(uri), 16).numpy()
        np.testing.assert_array_equal(record["image"], expected)
        assert record["label_name"] == os.path.basename(os.path.dirname(uri))
        assert meta.class_names[record["label"]] == record["label_name"]


def test_embeddings_form_runs_the_module_once_per_image(tmp_path, class_folder_dataset, embedding_module_dir):
    meta = run_etl(class_folder_dataset, tmp_path / "out", "--form", "embeddings",
                   "--embedding_module", embedding_module_dir, "--embedding_batch_size", "5")
    assert meta.payload.name == "embedding" and meta.payload.shape == (1280,)
    assert meta.preprocessing["module"] == embedding_module_dir and meta.preprocessing["input_size"] == 32
    records = read_records(str(tmp_path / "out"), meta)
    uri, record = next(iter(records.items()))
    module = tf.saved_model.load(embedding_module_dir)
    expected = module(preprocess.preprocess_image(tf.io.read_file(uri), 32)[None])[0].numpy()
    # The random module's features are ~1e-11: an absolute tolerance must scale with them.
    np.testing.assert_allclose(record["embedding"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert len({r["embedding"].tobytes() for r in records.values()}) == len(records)


def test_default_module_without_network_fails_before_reading_input(tmp_path, class_folder_dataset):
    with pytest.raises(Exception, match="--embedding_module"):
        run_etl(class_folder_dataset, tmp_path / "out", "--form", "embeddings")
    assert not (tmp_path / "out").exists(), "nothing may be created before the module loads"


def test_sidecar_describes_the_files(tmp_path, class_folder_dataset):
    out = tmp_path / "out"
    meta = run_etl(class_folder_dataset, out, "--form", "jpeg", "--split", "50,25,25")
    body = json.loads((out / layout.METADATA_FILE).read_text())
    for key in ("schema_version", "form", "class_names", "features", "preprocessing", "splits", "rejected",
                "input", "command_line", "versions", "created"):
        assert key in body, key
    assert body["versions"]["apache-beam"] and body["versions"]["tensorflow"]
    total = 0
    for split, info in meta.splits.items():
        assert info.num_examples == sum(s.num_examples for s in info.shards)
        total += info.num_examples
        for shard in info.shards:
            data = (out / shard.file).read_bytes()
            assert len(data) == shard.num_bytes
            assert hashlib.sha256(data).hexdigest() == shard.sha256
            assert sum(1 for _ in tf.data.TFRecordDataset(str(out / shard.file))) == shard.num_examples
    assert total == 24
    metadata.check_shards(metadata.read_metadata(str(out)), str(out))
    assert sorted(os.listdir(out)) == sorted([layout.METADATA_FILE, layout.REJECTS_FILE] +
                                             [s.file for i in meta.splits.values() for s in i.shards])


def test_split_is_a_function_of_the_path_under_the_input_root(tmp_path, class_folder_dataset):
    first = run_etl(class_folder_dataset, tmp_path / "a", "--form", "jpeg")
    second = run_etl(class_folder_dataset, tmp_path / "b", "--form", "jpeg", "--shard_mb", "0.002",
                     "--direct_num_workers", "2", "--direct_running_mode", "multi_threading")
    split_a = {u: r["split"] for u, r in read_records(str(tmp_path / "a"), first).items()}
    split_b = {u: r["split"] for u, r in read_records(str(tmp_path / "b"), second).items()}
    assert split_a == split_b
    assert split_a == {u: records_lib.split_for(os.path.relpath(u, class_folder_dataset), (80, 10, 10)) for u in split_a}
    ids = {u: r["example_id"] for u, r in read_records(str(tmp_path / "a"), first).items()}
    assert len(set(ids.values())) == len(ids)


def test_shards_are_sized_by_bytes(tmp_path):
    root = tmp_path / "in"
    image_factory.write_class_folders(str(root), classes=("a", "b", "c"), per_class=40)
    target_mb = 0.02  # ~20 KB shards of ~1.1 KB records: about 18 records each
    meta = run_etl(str(root), tmp_path / "out", "--form", "jpeg", "--shard_mb", str(target_mb), "--split", "100,0,0")
    shards = meta.splits["train"].shards
    target = target_mb * 2 ** 20
    assert len(shards) >= 4
    outside = [s for s in shards if not 0.8 * target <= s.num_bytes <= 1.2 * target]
    assert len(outside) <= 1, [s.num_bytes for s in shards]
    generation = layout.parse_shard_file_name(shards[0].file).generation  # the run's id: see test_etl_overwrite
    assert generation and [s.file for s in shards] == [layout.shard_file_name("train", i, len(shards), generation)
                                                       for i in range(len(shards))]
    assert meta.splits["valid"].num_examples == 0 and meta.splits["valid"].shards == ()
    # The sort key mixes classes: no shard holds a single class.
    records = read_records(str(tmp_path / "out"), meta, "train")
    by_shard = {}
    for s in shards:
        labels = {schema.decode_example(meta.features, r.numpy())["label"]
                  for r in tf.data.TFRecordDataset(str(tmp_path / "out" / s.file))}
        by_shard[s.file] = labels
    assert all(len(labels) > 1 for labels in by_shard.values()), by_shard
    assert len(records) == 120


def test_min_shards_is_a_floor(tmp_path, class_folder_dataset):
    meta = run_etl(class_folder_dataset, tmp_path / "out", "--form", "jpeg", "--min_shards", "3", "--split", "100,0,0")
    assert len(meta.splits["train"].shards) == 3
    assert all(s.num_examples == 8 for s in meta.splits["train"].shards)


def test_output_must_be_empty_unless_overwrite(tmp_path, class_folder_dataset):
    out = tmp_path / "out"
    run_etl(class_folder_dataset, out, "--form", "jpeg")
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    with pytest.raises(publish.OutputNotEmptyError, match="--overwrite"):
        run_etl(class_folder_dataset, out, "--form", "jpeg")
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before, "a refused run must change nothing"
    meta = run_etl(class_folder_dataset, out, "--form", "pixels", "--image_size", "8", "--overwrite")
    assert metadata.read_metadata(str(out)).form == "pixels" and meta.form == "pixels"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(publish.OutputNotEmptyError, match="notes.txt"):
        run_etl(class_folder_dataset, out, "--form", "jpeg", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and (out / layout.METADATA_FILE).exists()


def test_a_failed_overwrite_leaves_the_previous_dataset_whole(tmp_path, class_folder_dataset):
    """--overwrite replaces the old output only when the new one is ready: a mistyped --input or a
    run with too many rejects must not cost the dataset that was there (`make etl` always passes it)."""
    out = tmp_path / "out"
    run_etl(class_folder_dataset, out, "--form", "jpeg")
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    with pytest.raises(Exception, match="typo.csv"):
        run_etl(str(tmp_path / "typo.csv"), out, "--form", "jpeg", "--overwrite")
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    junk = tmp_path / "junk"
    image_factory.write_csv(str(tmp_path / "junk.csv"), [(str(junk / f"{i}.jpg"), "a") for i in range(5)])
    with pytest.raises(publish.TooManyRejectsError):
        run_etl(str(tmp_path / "junk.csv"), out, "--form", "jpeg", "--overwrite")
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert metadata.read_metadata(str(out)).form == "jpeg"


def test_an_output_that_is_the_root_or_a_file_is_refused(tmp_path, class_folder_dataset):
    # prepare_output alone, not a run: a regression must not write a dataset into / (an unset $OUT/)
    try:
        staging, _ = publish.prepare_output("/", overwrite=False)
    except publish.OutputNotEmptyError as e:
        assert "the file system's root" in str(e)
    else:
        publish.discard(staging)
        pytest.fail(f"--output / was accepted (staging {staging})")
    (tmp_path / "file").write_text("x")
    with pytest.raises(publish.OutputNotEmptyError, match="is a file"):
        run_etl(class_folder_dataset, tmp_path / "file", "--form", "jpeg")


def test_split_hash_follows_the_weights():
    uris = [f"gs://bucket/images/{i:06d}.jpg" for i in range(20_000)]
    counts = {s: 0 for s in layout.SPLITS}
    for u in uris:
        counts[records_lib.split_for(u, (80, 10, 10))] += 1
    assert abs(counts["train"] / len(uris) - 0.8) < 0.01
    assert abs(counts["valid"] / len(uris) - 0.1) < 0.01 and abs(counts["test"] / len(uris) - 0.1) < 0.01
    assert {records_lib.split_for(u, (1, 0, 0)) for u in uris[:500]} == {"train"}


def test_relative_input_and_output_paths(tmp_path, class_folder_dataset, monkeypatch):
    monkeypatch.chdir(tmp_path)  # class_folder_dataset is tmp_path/images
    meta = pipeline.run(["--input", "images", "--output", "out", "--form", "jpeg"])
    assert sum(meta.splits[s].num_examples for s in layout.SPLITS) == 24
    assert meta.extra["rejected"]["count"] == 0


def test_moving_the_data_keeps_every_image_in_its_split(tmp_path, class_folder_dataset):
    """Splits hash the path relative to the input's root, not the absolute path: an ETL of a copy
    elsewhere (another checkout, a bucket) must not move test images into train. Both input kinds:
    a class folder, and a CSV of paths relative to its own folder."""
    def splits_by_relative_path(input_path, root, out):
        meta = run_etl(input_path, out, "--form", "jpeg", "--split", "50,25,25")
        return {os.path.relpath(uri, root): (r["split"], r["example_id"]) for uri, r in read_records(str(out), meta).items()}

    tree = tmp_path / "tree"
    shutil.copytree(class_folder_dataset, tree / "images")
    rows = [(f"images/{label}/{name}", label) for label in ("cat", "dog", "owl")
            for name in sorted(os.listdir(tree / "images" / label))]
    image_factory.write_csv(str(tree / "rows.csv"), rows)
    moved = tmp_path / "elsewhere" / "deeper" / "tree"
    shutil.copytree(tree, moved)
    for kind, input_here, input_there in [("folder", tree / "images", moved / "images"),
                                          ("csv", tree / "rows.csv", moved / "rows.csv")]:
        here = splits_by_relative_path(str(input_here), str(tree), tmp_path / f"{kind}_here")
        there = splits_by_relative_path(str(input_there), str(moved), tmp_path / f"{kind}_there")
        assert here == there, kind
        assert len(here) == 24 and len({split for split, _ in here.values()}) == 3  # all splits in use


def test_an_output_inside_a_class_folder_input_is_refused(tmp_path, class_folder_dataset):
    """images/out would be listed as a class "out" by the next run (`make etl` passes --overwrite):
    its shards and sidecar became not_an_image rejects and "out" a class with no records."""
    out = os.path.join(class_folder_dataset, "out")
    for flags in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match=f"--output {out} lies inside the class-folder --input"):
            run_etl(class_folder_dataset, out, "--form", "jpeg", *flags)
        assert not os.path.exists(out)
    meta = run_etl(class_folder_dataset, tmp_path / "images_out", "--form", "jpeg")  # a name that only starts alike
    assert meta.class_names == ("cat", "dog", "owl")


def test_an_output_inside_a_class_folder_input_reached_through_a_link_is_refused(tmp_path, class_folder_dataset):
    # --input through a link, --output by the real path (or the other way round): compared as text,
    # they did not nest, and the next run listed the output's files as a class "out".
    link = tmp_path / "link"
    link.symlink_to(class_folder_dataset, target_is_directory=True)
    for given_input, out in ((link, os.path.join(class_folder_dataset, "out")), (class_folder_dataset, link / "out")):
        with pytest.raises(ValueError, match="lies inside the class-folder --input"):
            run_etl(str(given_input), out, "--form", "jpeg")
        assert not os.path.exists(out)
    # A link inside the input to a folder elsewhere is listed too (links are followed).
    out = os.path.join(class_folder_dataset, "linked_out")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out)
    with pytest.raises(ValueError, match="lies inside the class-folder --input"):
        run_etl(class_folder_dataset, out, "--form", "jpeg")
    assert os.listdir(tmp_path / "elsewhere") == []
