"""Tiny datasets for the trainer's tests, written straight through the shared schema (no Beam).

`write_dataset` makes what the ETL makes (shards named by shared.layout, a metadata.json from
shared.metadata whose preprocessing the ETL's describe_preprocessing writes, pixels from
shared.preprocess), small enough to train on in seconds.
The images are learnable: each class has its own dominant colour and a stripe in its own place.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
from PIL import Image

CLASS_NAMES = ("red", "green", "blue")
SPLIT_OF = ("train", "train", "train", "valid", "test")  # by index modulo 5: 60/20/20


def make_image_files(folder: str, per_class: int = 20, seed: int = 0) -> list[tuple[str, int]]:
    """Writes JPEG files of varied sizes; returns (path, label index), classes interleaved."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(per_class):
        for label, _ in enumerate(CLASS_NAMES):
            h, w = int(rng.integers(28, 48)), int(rng.integers(28, 48))
            pixels = rng.integers(40, 110, (h, w, 3))
            pixels[..., label] += 120
            pixels[:, (label * w) // 3:((label + 1) * w) // 3, :] += 25  # a class-specific stripe
            path = os.path.join(folder, f"{CLASS_NAMES[label]}_{i:03d}.jpg")
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
            items.append((path, label))
    return items


def write_tiny_hub_module(path: str, input_size: int = 32) -> str:
    """A TF2 SavedModel feature extractor, float32 [N, S, S, 3] in [0, 1] -> [N, 32], loadable by
    hub.load and hub.KerasLayer. Two strided convolutions and average pooling with fixed random
    weights: unlike a random-weight MobileNet (whose batch norms flatten every input to the same
    vector), its features differ from image to image, so tests can tell images apart through it."""
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(1)
    net = keras.Sequential([
        keras.Input((input_size, input_size, 3)),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
    ])

    class FeatureVector(tf.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)])
        def __call__(self, images):
            return self.net(images, training=False)

    tf.saved_model.save(FeatureVector(), path)
    return path


def write_dataset(out_dir: str, items: list[tuple[str, int]], form: str, image_size: int = 32,
                  shards_per_split: dict[str, int] | None = None, module_handle: str | None = None,
                  class_names: tuple[str, ...] = CLASS_NAMES) -> "object":
    """Writes shards + metadata.json for `form`; returns the DatasetMetadata."""
    import tensorflow as tf

    from etl import embeddings, pipeline
    from etl.options import EtlConfig
    from shared import layout, metadata, preprocess, schema

    shards_per_split = shards_per_split or {"train": 2, "valid": 1, "test": 1}
    embed = None
    embedding_size = None
    if form == "embeddings":
        import tensorflow_hub as hub

        module = hub.load(module_handle)
        embed = lambda pixels: module(pixels[None])[0].numpy()  # noqa: E731
        embedding_size = int(embed(np.zeros((image_size, image_size, 3), np.float32)).shape[0])
    features = schema.record_features(form, image_size=image_size, embedding_size=embedding_size)
    by_split = {s: [] for s in layout.SPLITS}
    for i, (path, label) in enumerate(items):
        data = open(path, "rb").read()
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        values = {"label": label, "label_name": class_names[label], "uri": path,
                  "example_id": hashlib.sha256(path.encode()).hexdigest()[:16], "height": height, "width": width}
        if form == "jpeg":
            values["image"] = data
        else:
            pixels = preprocess.preprocess_image(tf.constant(data), image_size).numpy()
            values["image" if form == "pixels" else "embedding"] = pixels if form == "pixels" else embed(pixels)
        by_split[SPLIT_OF[i % len(SPLIT_OF)]].append(schema.encode_example(features, values))
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for split, records in by_split.items():
        count = shards_per_split.get(split, 1)
        shards = []
        for index in range(count):
            name = layout.shard_file_name(split, index, count)
            full = os.path.join(out_dir, name)
            part = records[index::count]
            with tf.io.TFRecordWriter(full) as writer:
                for r in part:
                    writer.write(r)
            body = open(full, "rb").read()
            shards.append(metadata.ShardInfo(name, len(part), len(body), hashlib.sha256(body).hexdigest()))
        splits[split] = metadata.SplitInfo(len(records), tuple(shards))
    # The ETL's own description, so a key the trainer reads (the module, its input size) cannot drift.
    etl_config = EtlConfig(input="tests/trainer_fixtures.py", output=out_dir, form=form, image_size=image_size)
    module_info = embeddings.ModuleInfo(module_handle, image_size, embedding_size) if form == "embeddings" else None
    preprocessing = pipeline.describe_preprocessing(etl_config, module_info)
    meta = metadata.DatasetMetadata(schema_version=schema.SCHEMA_VERSION, form=form, class_names=tuple(class_names),
                                    features=features, preprocessing=preprocessing, splits=splits,
                                    extra={"input": "tests/trainer_fixtures.py"})
    with open(os.path.join(out_dir, layout.METADATA_FILE), "w") as f:
        f.write(meta.to_json())
    return meta


def trainer_argv(data: str, job_dir: str, **flags) -> list[str]:
    """argv for trainer.train with test-sized defaults (32 px, small batches, 3 epochs, no augmentation)."""
    defaults = {"batch_size": 8, "num_epochs": 3, "image_size": 32, "crop_ratio": 1.0, "with_flip": "false",
                "with_color_distort": "false", "model": "linear", "strategy": "one_device", "lrate": 0.01}
    defaults.update(flags)
    argv = ["--data", data, "--job_dir", job_dir]
    for k, v in defaults.items():
        argv += [f"--{k}", str(v)]
    return argv


def run_real_etl(csv_path: str, out_dir: str, form: str, image_size: int = 32, *extra: str):
    """The ETL (etl.pipeline.run, DirectRunner) on a CSV of the digits sample; returns the DatasetMetadata."""
    from etl import pipeline

    labels = os.path.join(os.path.dirname(csv_path), "dict.txt")
    return pipeline.run(["--input", csv_path, "--labels", labels, "--output", out_dir, "--form", form,
                         "--image_size", str(image_size), *extra])


def read_split_records(meta, data_dir: str, split: str) -> tuple[list[bytes], list[dict]]:
    """(serialized records, decoded records) of a split, in shard order."""
    import tensorflow as tf

    from shared import schema

    serialized = [r.numpy() for r in tf.data.TFRecordDataset(meta.shard_paths(data_dir, split))]
    return serialized, [schema.decode_example(meta.features, s) for s in serialized]
