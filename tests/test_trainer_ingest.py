"""tf.data ingest: shapes from the sidecar, exact pixels, sharding across workers, bad data named."""
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from shared import metadata, preprocess, schema
from tests import trainer_fixtures as fx
from trainer import config as config_lib, ingest, run_folder, train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fx.make_image_files(str(tmp_path_factory.mktemp("images")), per_class=10)


@pytest.fixture(scope="module")
def pixels_dir(tmp_path_factory, images):
    out = str(tmp_path_factory.mktemp("pixels"))
    fx.write_dataset(out, images, "pixels", image_size=32)
    return out


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory, images):
    out = str(tmp_path_factory.mktemp("jpeg"))
    fx.write_dataset(out, images, "jpeg", shards_per_split={"train": 3, "valid": 1, "test": 1})
    return out


def _records(meta, data_dir, split):
    return [schema.decode_example(meta.features, r.numpy())
            for r in tf.data.TFRecordDataset(meta.shard_paths(data_dir, split))]


def test_eval_pass_is_exact_and_deterministic_pixels(pixels_dir):
    meta = ingest.load_dataset_metadata(pixels_dir)
    ds = ingest.make_eval_dataset(meta, pixels_dir, "valid", 5, input_size=32)
    first = [(x.numpy(), y.numpy()) for x, y in ds]
    second = [(x.numpy(), y.numpy()) for x, y in ds]
    x = np.concatenate([b[0] for b in first])
    y = np.concatenate([b[1] for b in first])
    assert x.shape == (meta.splits["valid"].num_examples, 32, 32, 3) and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.concatenate([b[0] for b in second]))
    records = _records(meta, pixels_dir, "valid")
    np.testing.assert_array_equal(x, np.stack([r["image"] for r in records]))  # one shard: file order
    np.testing.assert_array_equal(y, [r["label"] for r in records])


def test_jpeg_form_decodes_with_the_shared_function_to_the_padded_size(jpeg_dir):
    meta = ingest.load_dataset_metadata(jpeg_dir)
    padded = ingest.input_image_size(meta, image_size=32, crop_ratio=0.5)
    assert padded == 64
    x, _ = next(iter(ingest.make_eval_dataset(meta, jpeg_dir, "test", 4, input_size=padded)))
    records = _records(meta, jpeg_dir, "test")[:4]
    expected = np.stack([preprocess.preprocess_image(tf.constant(r["image"]), 64).numpy() for r in records])
    np.testing.assert_array_equal(x.numpy(), expected)


@pytest.fixture(scope="module")
def one_file_dir(tmp_path_factory, images):
    """The train split in one file, so that nothing but the shuffle can change its order."""
    out = str(tmp_path_factory.mktemp("one_file"))
    fx.write_dataset(out, images, "pixels", image_size=32, shards_per_split={"train": 1, "valid": 1, "test": 1})
    return out


def _example_ids(batches) -> list[float]:
    return [round(float(x.sum()), 3) for batch, _ in batches for x in batch.numpy()]


@pytest.mark.parametrize("cache", [False, True])
def test_train_input_repeats_for_virtual_epochs_and_shuffles(one_file_dir, cache):
    """One file, so only the shuffle can change the order. Without --cache the records stream
    through a buffer of 8 batches across passes; with it each pass is the whole data, shuffled in
    full: with batches of 1 a buffer of 8 would put one of the file's first 8 records first in
    every pass, a full shuffle often does not."""
    meta = ingest.load_dataset_metadata(one_file_dir)
    n = meta.splits["train"].num_examples
    assert n > 2 * ingest.SHUFFLE_BATCHES
    file_order = _example_ids(ingest.make_eval_dataset(meta, one_file_dir, "train", 1, input_size=32))
    ds = ingest.make_train_dataset(meta, one_file_dir, 1, input_size=32, seed=1, cache=cache)
    assert ds.options().deterministic is False
    stream = _example_ids(ds.take(12 * n))  # virtual epochs: the stream goes on past the data
    passes = [stream[k * n:(k + 1) * n] for k in range(12)]
    assert passes[0] != file_order and passes[1] != passes[0], "not shuffled, or the same order each pass"
    assert set(stream) == set(file_order)
    if cache:
        assert all(sorted(p) == sorted(file_order) for p in passes), "a cached pass is not exactly the data"
        first_positions = {file_order.index(p[0]) for p in passes}
        assert max(first_positions) >= ingest.SHUFFLE_BATCHES, f"only a local shuffle: passes began at {first_positions}"


def test_cache_gives_the_same_examples(pixels_dir):
    meta = ingest.load_dataset_metadata(pixels_dir)
    n = meta.splits["train"].num_examples
    ds = ingest.make_train_dataset(meta, pixels_dir, n, input_size=32, seed=1, cache=True)
    x1, _ = next(iter(ds))
    sums = sorted(np.round(x1.numpy().reshape(n, -1).sum(axis=1), 3))
    expected = sorted(np.round([r["image"].sum() for r in _records(meta, pixels_dir, "train")], 3))
    np.testing.assert_allclose(sums, expected, rtol=1e-5)


@pytest.mark.parametrize("train_files", [4, 3, 1])
def test_workers_read_disjoint_parts_that_cover_the_data(tmp_path, images, train_files):
    """Evaluation and training alike; 4 files go 2 per worker, 3 or 1 are split by record."""
    out = str(tmp_path / "d")
    meta = fx.write_dataset(out, images, "pixels", shards_per_split={"train": train_files, "valid": 1, "test": 1})
    n = meta.splits["train"].num_examples
    for read in ("eval", "train"):
        seen = []
        for index in range(2):
            shard = ingest.InputShard(num_workers=2, worker_index=index)
            if read == "eval":
                ds = ingest.make_eval_dataset(meta, out, "train", 4, input_size=32, shard=shard)
            else:  # six passes' worth of the endless stream: each worker's set is its whole part
                ds = ingest.make_train_dataset(meta, out, 4, input_size=32, seed=3, shard=shard).take(3 * n // 4)
            seen.append(_example_ids(ds))
        parts = [set(ids) for ids in seen]
        assert not parts[0] & parts[1], f"{read}: two workers read the same example"
        assert len(parts[0]) + len(parts[1]) == n, f"{read}: the workers' parts do not cover the data"
        assert abs(len(parts[0]) - len(parts[1])) <= train_files, f"{read}: unbalanced parts {len(parts[0])}, {len(parts[1])}"


def test_sharding_says_whether_by_file_or_by_record(tmp_path, images, caplog):
    import logging

    caplog.set_level(logging.INFO)
    out = str(tmp_path / "d")
    meta = fx.write_dataset(out, images, "pixels", shards_per_split={"train": 1, "valid": 1, "test": 1})
    ingest.make_train_dataset(meta, out, 4, input_size=32, seed=0, shard=ingest.InputShard(2, 0))
    assert "by record (1 files do not divide among 2 workers" in caplog.text


# --- bad data ------------------------------------------------------------------------------------

def test_missing_sidecar_names_the_file(tmp_path):
    with pytest.raises(metadata.DatasetError, match=str(tmp_path / "metadata.json")):
        ingest.load_dataset_metadata(str(tmp_path))


def test_sidecar_of_another_schema_version_is_refused(tmp_path, pixels_dir):
    out = tmp_path / "old"
    shutil.copytree(pixels_dir, out)
    body = json.loads((out / "metadata.json").read_text())
    body["schema_version"] = schema.SCHEMA_VERSION + 1
    (out / "metadata.json").write_text(json.dumps(body))
    with pytest.raises(metadata.DatasetError, match=r"metadata.json: schema_version 2"):
        ingest.load_dataset_metadata(str(out))


def test_truncated_shard_is_named_before_training(tmp_path, pixels_dir):
    out = tmp_path / "cut"
    shutil.copytree(pixels_dir, out)
    shard = out / "train-00001-of-00002.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(metadata.DatasetError, match="train-00001-of-00002.tfrecord has .* bytes"):
        ingest.load_dataset_metadata(str(out))


def test_corrupted_shard_fails_training_with_the_file_name(tmp_path, pixels_dir):
    out = tmp_path / "bad"
    shutil.copytree(pixels_dir, out)
    shard = out / "train-00000-of-00002.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so only reading finds it
    shard.write_bytes(bytes(data))
    problems = ingest.find_corrupt_shards(metadata.read_metadata(str(out)), str(out))
    assert len(problems) == 1 and problems[0].startswith(str(shard)), problems
    config = config_lib.parse_config(fx.trainer_argv(str(out), str(tmp_path / "run"), num_epochs=1))
    with pytest.raises(metadata.DatasetError, match=r"corrupt shard\(s\): .*train-00000-of-00002.tfrecord"):
        train.train_and_export(config)
    assert not os.path.exists(tmp_path / "run" / "export")


def test_a_corrupt_test_shard_is_named_after_training_and_the_rerun_does_not_train_again(tmp_path, pixels_dir):
    out = tmp_path / "bad_test"
    shutil.copytree(pixels_dir, out)
    shard = out / "test-00000-of-00001.tfrecord"
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same size: the sidecar's size check passes, reading fails
    shard.write_bytes(bytes(data))
    job = tmp_path / "run"
    config = config_lib.parse_config(fx.trainer_argv(str(out), str(job), num_epochs=2))
    with pytest.raises(metadata.DatasetError, match=r"corrupt shard\(s\): .*test-00000-of-00001.tfrecord.*rerun to evaluate"):
        train.train_and_export(config)
    log = (job / "epochs.jsonl").read_text()
    assert len(log.splitlines()) == 2 and (job / run_folder.TRAINED_FILE).exists()
    shard.write_bytes(good)  # the data repaired: the rerun measures and exports the trained weights
    metrics = train.train_and_export(config)
    assert (job / "epochs.jsonl").read_text() == log, "the rerun trained again"
    assert metrics["epochs_run"] == 2 and "test_accuracy" in metrics
    assert (job / run_folder.EXPORT_DIR / "saved_model.pb").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda body: [], "the sidecar must be a JSON object, got list"),
    (lambda body: body["splits"]["train"].update(num_examples="many") or body, "malformed sidecar, ValueError"),
    (lambda body: body["splits"]["train"].update(num_examples=body["splits"]["train"]["num_examples"] + 5) or body,
     r"split 'train' records \d+ examples but its shards \d+"),
])
def test_a_malformed_sidecar_is_named_with_what_is_wrong(tmp_path, pixels_dir, edit, message):
    out = tmp_path / "edited"
    shutil.copytree(pixels_dir, out)
    body = edit(json.loads((out / "metadata.json").read_text()))
    (out / "metadata.json").write_text(json.dumps(body))
    with pytest.raises(metadata.DatasetError, match=f"{out / 'metadata.json'}: {message}"):
        ingest.load_dataset_metadata(str(out))


def test_a_job_dir_that_is_a_file_is_a_one_line_error(tmp_path, pixels_dir, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert train.main(fx.trainer_argv(pixels_dir, str(tmp_path / "run"))) == 1
    assert f"--job_dir {tmp_path / 'run'} is a file" in capsys.readouterr().err


def test_a_job_dir_that_cannot_be_created_is_a_one_line_error(tmp_path, pixels_dir, capsys):
    (tmp_path / "file").write_text("not a folder")
    job = tmp_path / "file" / "run"
    assert train.main(fx.trainer_argv(pixels_dir, str(job))) == 1
    assert f"error: --job_dir {job} cannot be written (FailedPreconditionError: " in capsys.readouterr().err
