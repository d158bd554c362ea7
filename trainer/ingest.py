"""tf.data input for every record form: what the sidecar says is in the shards, as (x, label) batches.

Everything about the records comes from `metadata.json` (through `shared/`): the features,
the payload's shape, the shard list and counts. `load_dataset_metadata` checks the shards
against the sidecar before any training starts; `make_train_dataset` and `make_eval_dataset`
build the pipelines the book's chapter 7 describes.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from shared import layout, metadata, preprocess, schema

AUTOTUNE = tf.data.AUTOTUNE
# The book: "shuffle with a buffer larger than the batch size"; 8 x batch is its choice.
SHUFFLE_BATCHES = 8


@dataclasses.dataclass(frozen=True)
class InputShard:
    """Which part of the data this process reads under multi-worker training (1 worker: all of it)."""
    num_workers: int = 1
    worker_index: int = 0


def load_dataset_metadata(data_dir: str, splits: tuple[str, ...] = layout.SPLITS) -> metadata.DatasetMetadata:
    """Reads the sidecar and checks that each listed shard exists with its recorded size.

    Raises metadata.DatasetError (missing, other-version or malformed sidecar; missing or resized
    shard), with the file's path in the message.
    """
    meta = metadata.read_metadata(data_dir)
    metadata.check_shards(meta, data_dir, splits)
    for split in ("train", "valid"):  # valid: early stopping and the best checkpoint watch val_accuracy
        if split not in meta.splits or meta.splits[split].num_examples == 0:
            raise metadata.DatasetError(f"{layout.join(data_dir, layout.METADATA_FILE)} lists no {split} examples "
                                        f"(splits: { {k: v.num_examples for k, v in meta.splits.items()} })")
    return meta


def input_image_size(meta: metadata.DatasetMetadata, image_size: int, crop_ratio: float) -> int | None:
    """Side of the images that enter the Keras model (the padded size the crop is taken from).

    pixels: the sidecar's size. jpeg: `image_size / crop_ratio`, as in the book's trainer.
    embeddings: None (the model's input is a vector).
    """
    if meta.form == "pixels":
        return int(meta.payload.shape[0])
    if meta.form == "jpeg":
        return int(round(image_size / crop_ratio))
    return None


def model_image_size(input_size: int, crop_ratio: float) -> int:
    """Side of the crop the network sees: the input size times the crop ratio."""
    return max(1, int(round(input_size * crop_ratio)))


def make_parse_fn(meta: metadata.DatasetMetadata):
    """Batch of serialized records -> (payload, label), parsed with the shared schema; labels are
    checked against the sidecar's class names. jpeg payloads stay encoded (`records_to_batches`
    decodes them)."""
    payload = meta.payload.name
    features = meta.features
    num_classes = len(meta.class_names)

    def parse(serialized):
        parsed = schema.parse_batch(features, serialized)
        label = parsed["label"]
        tf.debugging.assert_less(label, tf.constant(num_classes, tf.int64),
                                 message=f"a label is >= the sidecar's {num_classes} class names")
        return parsed[payload], label

    return parse


def records_to_batches(records: tf.data.Dataset, meta: metadata.DatasetMetadata, input_size: int | None,
                       batch_size: int, drop_remainder: bool, deterministic: bool) -> tf.data.Dataset:
    """Serialized records -> (x, label) batches, parsing a batch at a time: what training and
    evaluation read.

    jpeg: after the batched parse, images are decoded one per element in a parallel map and
    batched again: decoding dominates, and tf.map_fn over a batch decoded 2.5x slower (504 vs
    1,244 images/s, 2 cores). The records hold only RGB JPEGs, so they decode without the format
    dispatch (`preprocess_jpeg_record`: preprocess_image's pixels, 10% less CPU). Other forms: the
    batched parse is all there is to do.
    """
    parsed = records.batch(batch_size, drop_remainder=drop_remainder).map(
        make_parse_fn(meta), num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if meta.form != "jpeg":
        return parsed
    return (parsed.unbatch()
            .map(lambda image, label: (preprocess.preprocess_jpeg_record(image, input_size), label),
                 num_parallel_calls=AUTOTUNE, deterministic=deterministic)
            .batch(batch_size, drop_remainder=drop_remainder))


def _read_records(files: list[str], shard: InputShard, shuffle_seed: int | None, repeat: bool,
                  deterministic: bool) -> tuple[tf.data.Dataset, str]:
    """Interleaved records from `files`, sharded for this worker; returns (dataset, how it was sharded)."""
    file_ds = tf.data.Dataset.from_tensor_slices(files)
    how = "none (1 worker)"
    # By file only when every worker gets as many files (the ETL's shards are within a few records of
    # each other): MultiWorkerMirroredStrategy takes a batch from every worker each step, so with 3
    # files over 2 workers the one with 1 file would show its records twice as often.
    by_file = shard.num_workers > 1 and len(files) % shard.num_workers == 0
    if by_file:
        # Before the shuffle: each worker keeps its own files for the whole run.
        file_ds = file_ds.shard(shard.num_workers, shard.worker_index)
        how = f"by file ({len(files)} files over {shard.num_workers} workers)"
    if shuffle_seed is not None:
        # Same seed on every worker: a new file order each pass, reproducible.
        file_ds = file_ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        file_ds = file_ds.repeat()
    read_file = tf.data.TFRecordDataset
    if shard.num_workers > 1 and not by_file:
        # Within each file, so the records a worker keeps do not depend on the interleave's order
        # (sharding the interleaved stream, which is not deterministic, let workers overlap).
        read_file = lambda path: tf.data.TFRecordDataset(path).shard(shard.num_workers, shard.worker_index)  # noqa: E731
        how = (f"by record ({len(files)} files do not divide among {shard.num_workers} workers: each reads every "
               f"file and keeps 1/{shard.num_workers} of its records)")
    records = file_ds.interleave(read_file, cycle_length=max(1, min(len(files), 8)),
                                 num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return records, how


def _with_options(ds: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = deterministic
    # We shard explicitly (above); Keras must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def make_train_dataset(meta: metadata.DatasetMetadata, data_dir: str, batch_size: int, *,
                       input_size: int | None, seed: int, cache: bool = False, drop_remainder: bool = False,
                       shard: InputShard = InputShard(), split: str = "train") -> tf.data.Dataset:
    """Endless (x, label) batches for `model.fit(steps_per_epoch=...)` (virtual epochs).

    `batch_size` is what this process's pipeline batches: the global batch size; Keras splits
    it across the replicas. Order is not deterministic (faster); augmentation runs in the model.
    """
    files = meta.shard_paths(data_dir, split)
    shuffle_buffer = SHUFFLE_BATCHES * batch_size
    if cache:
        # Cache decoded examples: later passes skip reading and decoding; shuffling stays per pass.
        side = input_size or 1
        per_example = 4 * (int(np.prod(meta.payload.shape)) if meta.form != "jpeg" else side * side * 3)
        logging.info("--cache holds ~%.1f GB of decoded %s examples in memory",
                     per_example * count_examples(meta, split) / shard.num_workers / 1e9, meta.form)
        records, how = _read_records(files, shard, shuffle_seed=None, repeat=False, deterministic=False)
        # The cache replays one order, so a small buffer would only shuffle locally; the examples are
        # in memory anyway, so shuffle all of them each pass (the buffer holds references, not copies).
        shuffle_buffer = max(shuffle_buffer, count_examples(meta, split) // shard.num_workers + 1)
        ds = (records_to_batches(records, meta, input_size, batch_size, False, deterministic=False)
              .unbatch().cache()
              .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
              .batch(batch_size, drop_remainder=drop_remainder))
    else:
        records, how = _read_records(files, shard, shuffle_seed=seed, repeat=True, deterministic=False)
        ds = records_to_batches(records.shuffle(shuffle_buffer, seed=seed), meta, input_size, batch_size,
                                drop_remainder, deterministic=False)
    logging.info("train input: %d files, shuffle buffer %d, sharding %s, cache %s", len(files), shuffle_buffer, how, cache)
    return _with_options(ds.prefetch(AUTOTUNE), deterministic=False)


def make_eval_dataset(meta: metadata.DatasetMetadata, data_dir: str, split: str, batch_size: int, *,
                      input_size: int | None, drop_remainder: bool = False,
                      shard: InputShard = InputShard()) -> tf.data.Dataset:
    """One deterministic pass over `split` as (x, label) batches, in shard order."""
    files = meta.shard_paths(data_dir, split)
    records, _ = _read_records(files, shard, shuffle_seed=None, repeat=False, deterministic=True)
    ds = records_to_batches(records, meta, input_size, batch_size, drop_remainder, deterministic=True)
    return _with_options(ds.prefetch(AUTOTUNE), deterministic=True)


def count_examples(meta: metadata.DatasetMetadata, split: str) -> int:
    return meta.splits[split].num_examples if split in meta.splits else 0


def find_corrupt_shards(meta: metadata.DatasetMetadata, data_dir: str,
                        splits: tuple[str, ...] = layout.SPLITS) -> list[str]:
    """Reads every shard (CRC-checked) and parses its records; returns one line per bad file.

    Run only after a read failed: TFRecordDataset's "corrupted record at N" does not say which file.
    """
    problems = []
    for split in splits:
        if split not in meta.splits:
            continue
        for info, path in zip(meta.splits[split].shards, meta.shard_paths(data_dir, split)):
            count = 0
            try:
                for batch in tf.data.TFRecordDataset(path).batch(256):
                    schema.parse_batch(meta.features, batch)
                    count += int(batch.shape[0])
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                problems.append(f"{path}: {type(e).__name__} after {count} records: {e.message.splitlines()[0]}")
                continue
            if count != info.num_examples:
                problems.append(f"{path}: {count} records, but {layout.METADATA_FILE} records {info.num_examples}")
    return problems
