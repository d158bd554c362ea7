"""The ETL with gs:// input and output, against a Cloud Storage emulator (tests/gcs_emulator.py).

Everything is read back through the emulator: the trainer cannot follow, since TensorFlow's own GCS
client has its endpoint compiled in, so these tests stop at the published dataset.
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from etl import inputs, pipeline, publish
from etl.errors import EtlError
from etl.records import example_id_for, split_for
from etl.tfrecord_io import read_framed_records
from shared import layout, preprocess, schema
from tests import gcs_emulator, image_factory, overwrite_kill_points
from tests.gcs_emulator import download, list_objects, upload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gcs_env(tmp_path_factory):
    """The emulator, and this process's environment pointed at it for the module's tests."""
    with gcs_emulator.running_emulator(str(tmp_path_factory.mktemp("gcs"))) as env:
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture()
def gcs_dir(gcs_env) -> str:
    """A fresh prefix in the emulator's bucket for one test."""
    return f"gs://{gcs_emulator.BUCKET}/{uuid.uuid4().hex[:8]}"


def upload_class_folders(root: str, classes=("cat", "dog"), per_class=3) -> dict[str, bytes]:
    """root/<class>/<i>.jpg as RGB JPEGs; returns {uri: bytes}."""
    files = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            data = image_factory.encode(image_factory.make_image(c, seed=100 * c + i), "JPEG", quality=90)
            files[upload(f"{root}/{name}/{i:03d}.jpg", data)] = data
    return files


def truncated_jpeg() -> bytes:
    jpeg = image_factory.encode(image_factory.make_image(0, 1, size=(200, 160)), "JPEG")
    return jpeg[: len(jpeg) // 2]


def read_dataset(out: str) -> tuple[dict, dict]:
    """(the sidecar as JSON, {uri: decoded record with its split}), checking on the way that every shard
    the sidecar lists has its size, sha256 and record count, and that the folder holds nothing else."""
    body = json.loads(download(f"{out}/{layout.METADATA_FILE}"))
    features = schema.features_from_json(body["features"])
    listed = [s for split in body["splits"].values() for s in split["shards"]]
    names = set(list_objects(out)) - {""}  # "": the folder's own placeholder object, if made
    assert sorted(names) == sorted([layout.METADATA_FILE, layout.REJECTS_FILE] + [s["file"] for s in listed])
    records = {}
    for split, info in body["splits"].items():
        for shard in info["shards"]:
            data = download(f"{out}/{shard['file']}")
            assert len(data) == shard["num_bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"], shard
            decoded = [schema.decode_example(features, r) for r in read_framed_records(data, shard["file"])]
            assert len(decoded) == shard["num_examples"]
            records.update({r["uri"]: dict(r, split=split) for r in decoded})
    return body, records


def published(out: str) -> dict[str, bytes]:
    """{name: bytes} of the output folder's objects outside staging folders."""
    return {n: download(f"{out}/{n}") for n in list_objects(out) if not n.startswith(publish.TEMP_PREFIX)}


def staging(out: str) -> dict[str, int]:
    """{name: size} of the objects in the output's staging folders."""
    return {n: size for n, size in list_objects(out).items() if n.startswith(publish.TEMP_PREFIX)}


def read_rejects(out: str) -> dict[str, str]:
    """{uri: reason} from rejects.jsonl on gs://."""
    return {r["uri"]: r["reason"] for r in map(json.loads, download(f"{out}/{layout.REJECTS_FILE}").splitlines())}


@pytest.mark.parametrize("form", ["jpeg", "pixels", "embeddings"])
def test_class_folders_on_gcs_to_a_dataset_on_gcs(gcs_dir, form, request):
    images = upload_class_folders(f"{gcs_dir}/in")
    bad = {upload(f"{gcs_dir}/in/cat/notes.jpg", b"not a picture"): "not_an_image",
           upload(f"{gcs_dir}/in/dog/truncated.jpg", truncated_jpeg()): "corrupt"}
    flags = {"jpeg": [], "pixels": ["--image_size", "16"], "embeddings": ["--embedding_module"]}[form]
    if form == "embeddings":
        flags.append(request.getfixturevalue("embedding_module_dir"))
    out = f"{gcs_dir}/out"
    for folder in (f"{gcs_dir}/in/", f"{gcs_dir}/in/cat/", f"{out}/"):
        upload(folder, b"")  # a folder made in the Cloud Console: an empty object named "<folder>/"
    # A trailing slash on a folder input, as `gsutil ls` prints it.
    meta = pipeline.run(["--input", f"{gcs_dir}/in/", "--output", out, "--form", form, *flags])

    body, records = read_dataset(out)
    assert body["form"] == form and body["class_names"] == ["cat", "dog"] == list(meta.class_names)
    assert read_rejects(out) == bad
    assert sorted(records) == sorted(images)
    for uri, record in records.items():
        assert record["label_name"] == uri.split("/")[-2] and body["class_names"][record["label"]] == record["label_name"]
        # Split and id hash the path under the input root: the same as for a copy of the folder on disk.
        key = uri[len(f"{gcs_dir}/in/"):]
        assert (record["split"], record["example_id"]) == (split_for(key, (80, 10, 10)), example_id_for(key))
        if form == "jpeg":
            assert record["image"] == images[uri], "an RGB JPEG keeps its bytes"
        elif form == "pixels":
            np.testing.assert_array_equal(record["image"], preprocess.preprocess_image(tf.constant(images[uri]), 16))
    if form == "embeddings":
        module = tf.saved_model.load(body["preprocessing"]["module"])
        uri, record = next(iter(records.items()))
        expected = module(preprocess.preprocess_image(tf.constant(images[uri]), 32)[None])[0].numpy()
        np.testing.assert_allclose(record["embedding"], expected, rtol=1e-5, atol=1e-5)


def test_a_csv_on_gcs_of_absolute_and_relative_gs_paths(gcs_dir):
    """Relative paths are relative to the CSV's folder, as for a local CSV; bad objects are rejects."""
    images = upload_class_folders(f"{gcs_dir}/lists/img", per_class=2)
    elsewhere = upload_class_folders(f"{gcs_dir}/other", classes=("owl",), per_class=1)
    upload(f"{gcs_dir}/lists/img/notes.jpg", b"not a picture")
    upload(f"{gcs_dir}/lists/img/truncated.jpg", truncated_jpeg())
    (cat0, cat1, dog0, dog1), [owl] = sorted(images), list(elsewhere)
    lines = ["image,label", f"{cat0},cat", "img/cat/001.jpg,cat", "./img/dog/000.jpg,dog", "img/./dog/001.jpg,dog",
             "../other/owl/000.jpg,owl", "img/missing.jpg,cat", "img/notes.jpg,dog", "img/truncated.jpg,dog"]
    csv_path = upload(f"{gcs_dir}/lists/rows.csv", ("\n".join(lines) + "\n").encode())
    class_names = upload(f"{gcs_dir}/lists/dict.txt", b"owl\ndog\ncat\n")
    out = f"{gcs_dir}/out"
    meta = pipeline.run(["--input", csv_path, "--class_names_file", class_names, "--output", out, "--form", "jpeg"])

    body, records = read_dataset(out)
    assert sorted(records) == sorted([cat0, cat1, dog0, dog1, owl]), "uris as the objects are named"
    assert all(records[uri]["image"] == data for uri, data in {**images, **elsewhere}.items())
    assert body["class_names"] == ["owl", "dog", "cat"] and body["input"]["num_rows"] == 8
    assert all(body["class_names"][r["label"]] == r["label_name"] for r in records.values())
    assert read_rejects(out) == {f"{gcs_dir}/lists/img/missing.jpg": "missing_file",
                                 f"{gcs_dir}/lists/img/notes.jpg": "not_an_image",
                                 f"{gcs_dir}/lists/img/truncated.jpg": "corrupt"}
    assert meta.extra["rejected"]["count"] == 3


@pytest.mark.parametrize("relative, resolved", [
    ("img/a.jpg", "gs://b/l/img/a.jpg"), ("./img/./a.jpg", "gs://b/l/img/a.jpg"), ("../a.jpg", "gs://b/a.jpg"),
    ("../../a.jpg", "gs://b/a.jpg"), ("img//a.jpg", "gs://b/l/img//a.jpg")])
def test_dots_in_a_relative_path_resolve_on_an_object_store_and_nothing_else_changes(relative, resolved):
    assert inputs.resolve_path(relative, "gs://b/l") == resolved


def test_a_gs_input_that_does_not_exist_is_named_as_on_disk(gcs_dir):
    upload_class_folders(f"{gcs_dir}/in", per_class=1)
    for missing in (f"{gcs_dir}/in.csv", f"{gcs_dir}/typo/"):
        with pytest.raises(EtlError, match=f"--input {re.escape(missing)} does not exist"):
            pipeline.run(["--input", missing, "--output", f"{gcs_dir}/out", "--form", "jpeg"])
    assert list_objects(f"{gcs_dir}/out") == {}, "refused before the output is touched"


def test_overwrite_replaces_a_dataset_on_gcs(gcs_dir):
    upload_class_folders(f"{gcs_dir}/in")
    out = f"{gcs_dir}/out"
    pipeline.run(["--input", f"{gcs_dir}/in", "--output", out, "--form", "jpeg", "--min_shards", "2"])
    before = published(out)
    old_shards = {s["file"] for split in json.loads(before[layout.METADATA_FILE])["splits"].values()
                  for s in split["shards"]}
    assert len(old_shards) >= 2 and old_shards <= set(before)
    with pytest.raises(publish.OutputNotEmptyError, match="--overwrite"):
        pipeline.run(["--input", f"{gcs_dir}/in", "--output", out, "--form", "pixels"])
    upload(f"{out}/notes.txt", b"mine")
    with pytest.raises(publish.OutputNotEmptyError, match="notes.txt"):
        pipeline.run(["--input", f"{gcs_dir}/in", "--output", out, "--form", "pixels", "--overwrite"])
    assert published(out) == {**before, "notes.txt": b"mine"}
    FileSystems.delete([f"{out}/notes.txt"])

    pipeline.run(["--input", f"{gcs_dir}/in", "--output", out, "--form", "pixels", "--image_size", "8", "--overwrite"])
    body, records = read_dataset(out)  # the new sidecar's files and nothing else: old shards it does not list are gone
    new_shards = {s["file"] for split in body["splits"].values() for s in split["shards"]}
    assert body["form"] == "pixels" and len(records) == 6 and old_shards - new_shards


def test_a_live_run_refuses_a_second_and_its_kill_leaves_the_old_dataset(gcs_dir):
    """A second run to the output of a live one is refused; kill -9 of an --overwrite run before it
    publishes leaves the previous dataset as it was, and the next run removes its staging folder."""
    upload_class_folders(f"{gcs_dir}/in")
    out = f"{gcs_dir}/out"
    pipeline.run(["--input", f"{gcs_dir}/in", "--output", out, "--form", "jpeg"])
    before = published(out)
    first = subprocess.Popen([sys.executable, "-m", "etl", "--input", f"{gcs_dir}/in", "--output", out,
                              "--form", "pixels", "--image_size", "8", "--overwrite"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any(n.endswith("/" + publish.OWNER_FILE) for n in staging(out)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before it staged"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # alive, and kept from publishing
        staged = staging(out)
        assert published(out) == before, "the first run published before it could be stopped"

        with pytest.raises(publish.OutputNotEmptyError, match=f"another ETL run is writing to .*process {first.pid}"):
            pipeline.run(["--input", f"{gcs_dir}/in", "--output", out, "--form", "jpeg"])
        assert staging(out) == staged, "the live run's staging folder must stay"
    finally:
        first.kill()
        first.wait()
    assert published(out) == before and staging(out) == staged

    pipeline.run(["--input", f"{gcs_dir}/in", "--output", out, "--form", "pixels", "--image_size", "8", "--overwrite"])
    body, _ = read_dataset(out)  # the new dataset alone: no staging folder left
    assert body["form"] == "pixels"


def test_a_kill_at_any_point_of_an_overwrite_on_gcs_leaves_one_complete_dataset(gcs_dir, tmp_path):
    """tests/test_etl_overwrite.py's kill -9 experiment with --output on gs://, where a rename is a copy
    and a delete per object, a folder is a prefix, and the sidecar commit is one object write. One point
    per phase: all ten cost ~75 s on 2 cores (`python -m tests.overwrite_kill_points --gcs_emulator`)."""
    result = overwrite_kill_points.run_in_subprocess(str(tmp_path), output=f"{gcs_dir}/out",
                                                     only=overwrite_kill_points.PHASES)
    print(overwrite_kill_points.format_table(result))  # pytest -s shows it
    overwrite_kill_points.assert_one_complete_dataset_throughout(result)
