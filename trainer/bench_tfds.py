"""The TensorFlow Datasets peer of `trainer.bench_ingest`: the same records' images as a TFDS dataset.

Benchmark only: tensorflow_datasets comes with the `bench` extra and is imported here alone.
The copy is built offline (a `GeneratorBasedBuilder` over the shards, no download) with
`tfds.features.Image`, so that reading it uses TFDS's own reader and decoder
(`tf.image.decode_image`, in the parallel map of `as_dataset`).
"""
from __future__ import annotations

import contextlib
import sys

import tensorflow as tf

from shared import metadata, preprocess, schema

AUTOTUNE = tf.data.AUTOTUNE


def tfds_available() -> bool:
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return False
    return True


def build_tfds_copy(meta: metadata.DatasetMetadata, data_dir: str, split: str, folder: str,
                    num_shards: int | None):
    """Writes `split`'s images and labels (the JPEG bytes as stored) as a TFDS dataset under `folder`,
    in `num_shards` shards (None: as many as TFDS picks, one below 64 MB); returns its builder."""
    import tensorflow_datasets as tfds

    files = meta.shard_paths(data_dir, split)
    payload = meta.payload.name

    class ImagepipeRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, supervised_keys=("image", "label"),
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=list(meta.class_names))}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples()}

        def _generate_examples(self):
            for batch in tf.data.TFRecordDataset(files).batch(256):
                parsed = schema.parse_batch(meta.features, batch)
                for key, image, label in zip(parsed["example_id"].numpy(), parsed[payload].numpy(),
                                             parsed["label"].numpy()):
                    yield key.decode(), {"image": image, "label": int(label)}

    tfds.disable_progress_bar()
    builder = ImagepipeRecords(data_dir=folder)
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress; stdout is the table
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            num_shards=num_shards, try_download_gcs=False))
    return builder


def make_tfds_dataset(builder, split: str, input_size: int, batch_size: int, shuffle_buffer: int, *,
                      tfds_decodes: bool = True, autocache: bool = False, passes: int = 1) -> tf.data.Dataset:
    """`passes` over the split as (x, label) batches, read as a TFDS user would for training: files
    shuffled, the split repeated, examples shuffled, then the project's resize (`tfds_decodes`: after
    TFDS's decoder) or the whole of `shared.preprocess.preprocess_image` (on the bytes, TFDS's decoder
    skipped), batched, prefetched. Repeated before the shuffle, as the trainer's records are: the
    shuffle buffer fills once, not once a pass.

    `autocache`: TFDS's default, which keeps a dataset under 250 MiB in memory, decoded, after the
    first pass when it is read from one shard or in file order; the trainer decodes every pass.
    """
    import tensorflow_datasets as tfds

    decoders = None if tfds_decodes else {"image": tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=True, decoders=decoders,
                            read_config=tfds.ReadConfig(try_autocache=autocache))
    if tfds_decodes:
        def prepare(image, label):
            return preprocess.resize_image(image, input_size, input_size), label
    else:
        def prepare(image, label):
            return preprocess.preprocess_image(image, input_size), label
    return (ds.repeat(passes).shuffle(shuffle_buffer).map(prepare, num_parallel_calls=AUTOTUNE, deterministic=False)
            .batch(batch_size).prefetch(AUTOTUNE))
