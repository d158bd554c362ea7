"""`python -m trainer.bench_vectorise --data DIR`: the book's table 7-5 (staying in the graph) on your records.

The chapter's grayscale conversion, written each way the chapter shows, on the same images (the
jpeg form decoded with shared.preprocess, the pixels form as stored), each producing every image's
mean gray value (the book's `reduce_mean`, so that nothing is optimised away):
  iteration        a Python loop over the pixels, each image pulled out of the graph with .numpy()
  tf.py_function   the same loop inside tf.data
  slicing          channel slices and tf.where, in map() per image
  matmul           one (H, W, 3) x (3, 1) matmul, in map() per image
  Keras layer      trainer.grayscale.Grayscale + Lambda(reduce_mean) on whole batches, model.predict
  Keras Lambda     the same with the conversion in a Lambda layer instead of a layer class
The two Python rows time --python_images images and scale to the count (the book did the same);
each row shows the fastest of --repeats runs.
Then the chapter's colour-distortion placement question on the same images: per image in map()
before batch(), on batches in map() after batch(), and as the trainer's Keras layer in a model.

Book figures (table 7-5, its machine): iteration 41.1 s wall, py_function 41.1, slicing 3.07,
matmul 2.29, batch 2.13; that is 1x, 1x, 13x, 18x and 19x.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import numpy as np

from shared import native_log

if __name__ == "__main__":
    native_log.load_tensorflow()

import tensorflow as tf
import tf_keras as keras

from shared import metadata
from trainer import augment, grayscale, ingest

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Row:
    name: str
    images: str  # how many images were timed: "512", or "4, scaled to 512"
    cpu: float
    wall: float


# --- the book's ways of converting one image, slowest first --------------------------------------

def to_grayscale_python(img: np.ndarray) -> np.ndarray:
    """The book's first version: [H, W, 3] -> [H, W], one pixel at a time in Python."""
    rows, cols, _ = img.shape
    result = np.zeros([rows, cols], dtype=np.float32)
    wr, wg, wb = grayscale.LUMINANCE_WEIGHTS
    for row in range(rows):
        for col in range(cols):
            red, green, blue = img[row][col][0], img[row][col][1], img[row][col][2]
            c_linear = wr * red + wg * green + wb * blue
            if c_linear > grayscale.SRGB_THRESHOLD:
                result[row][col] = grayscale.SRGB_SCALE * pow(c_linear, 1 / grayscale.SRGB_GAMMA) - grayscale.SRGB_OFFSET
            else:
                result[row][col] = grayscale.SRGB_LINEAR_SLOPE * c_linear
    return result


def to_grayscale_py_function(img: tf.Tensor) -> tf.Tensor:
    """The Python loop called from the graph: [H, W, 3] -> [H, W]."""
    gray = tf.py_function(lambda t: to_grayscale_python(t.numpy()), [img], tf.float32)
    gray.set_shape(img.shape[:2])
    return gray


def to_grayscale_sliced(img: tf.Tensor) -> tf.Tensor:
    """TF slicing and tf.where: [H, W, 3] -> [H, W]."""
    wr, wg, wb = grayscale.LUMINANCE_WEIGHTS
    c_linear = wr * img[:, :, 0] + wg * img[:, :, 1] + wb * img[:, :, 2]
    return grayscale.srgb_curve(c_linear)


def to_grayscale_matmul(img: tf.Tensor) -> tf.Tensor:
    """One matmul: [H, W, 3] -> [H, W]."""
    return grayscale.to_grayscale(img)[..., 0]


def make_grayscale_model(input_shape: tuple[int, int, int], lambda_layer: bool = False,
                         with_mean: bool = True) -> keras.Model:
    """The book's `preproc_model`: Grayscale (a layer class, or a Lambda) then, with `with_mean`,
    Lambda(reduce_mean) over each image."""
    convert = keras.layers.Lambda(grayscale.to_grayscale) if lambda_layer else grayscale.Grayscale()
    layers = [keras.Input(input_shape), convert]
    if with_mean:
        layers.append(keras.layers.Lambda(lambda gray: tf.reduce_mean(gray, axis=[1, 2, 3])))
    return keras.Sequential(layers)


def book_color_distort(image: tf.Tensor) -> tf.Tensor:
    """The book's per-image `color_distort`, with factors drawn by tf.random: its np.random ran once,
    when map() traced the function, and gave every image the same factors."""
    contrast = tf.random.uniform([], *augment.CONTRAST_RANGE)
    brightness = tf.random.uniform([], -augment.BRIGHTNESS_DELTA, augment.BRIGHTNESS_DELTA)
    image = tf.image.adjust_contrast(image, contrast)
    image = tf.image.adjust_brightness(image, brightness)
    return tf.clip_by_value(image, 0.0, 1.0)


# --- timing -----------------------------------------------------------------------------------

def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _image_means(ds: tf.data.Dataset) -> np.ndarray:
    """Drains a dataset of gray batches ([B, H, W] or [B, H, W, 1]), one mean per image."""
    rank_means = ds.map(lambda g: tf.reduce_mean(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1))
    return np.concatenate([m.numpy() for m in rank_means])


def grayscale_means(images: np.ndarray, batch_size: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each way's function from images [N, H, W, 3] to their mean gray values [N], by row name."""
    shape = tuple(images.shape[1:])
    layer_model, lambda_model = make_grayscale_model(shape), make_grayscale_model(shape, lambda_layer=True)

    def per_image(convert):
        return lambda x: _image_means(tf.data.Dataset.from_tensor_slices(x).map(convert, num_parallel_calls=AUTOTUNE)
                                      .batch(batch_size))

    def iteration(x):
        means = []
        for img in tf.data.Dataset.from_tensor_slices(x):
            gray = tf.constant(to_grayscale_python(img.numpy()))  # out of the graph and back
            means.append(float(tf.reduce_mean(gray)))
        return np.array(means, np.float32)

    def keras_predict(model):
        return lambda x: model.predict(tf.data.Dataset.from_tensor_slices(x).batch(batch_size), verbose=0).reshape(-1)

    return {
        "iteration: Python loop over pixels": iteration,
        "tf.py_function (the same loop)": per_image(to_grayscale_py_function),
        "slicing + tf.where, map() per image": per_image(to_grayscale_sliced),
        "matmul, map() per image": per_image(to_grayscale_matmul),
        "Keras Grayscale layer on batches": keras_predict(layer_model),
        "Keras Lambda layer on batches": keras_predict(lambda_model),
    }


PYTHON_ROWS = ("iteration: Python loop over pixels", "tf.py_function (the same loop)")


def distortion_placements(batch_size: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each colour-distortion placement's function from images to their mean values, by row name."""
    layer = augment.RandomColorDistortion()
    in_model = tf.function(lambda x: tf.reduce_mean(layer(x, training=True), axis=[1, 2, 3]))

    def before_batch(x):
        return _image_means(tf.data.Dataset.from_tensor_slices(x).map(book_color_distort, num_parallel_calls=AUTOTUNE)
                            .batch(batch_size))

    def after_batch(x):
        return _image_means(tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
                            .map(augment.random_color_distortion, num_parallel_calls=AUTOTUNE))

    def keras_layer(x):
        return np.concatenate([in_model(b).numpy() for b in tf.data.Dataset.from_tensor_slices(x).batch(batch_size)])

    return {"map() per image, before batch()": before_batch, "map() on batches, after batch()": after_batch,
            "Keras layer in the model (trainer/augment.py)": keras_layer}


def time_rows(ways: dict[str, Callable], images: tf.Tensor, batch_size: int, scaled: tuple[str, ...] = (),
              python_images: int = 4, repeats: int = 1) -> list[Row]:
    """Times each way on all images (the `scaled` ones on the first `python_images`, times N / that),
    after an untimed warm-up batch that traces its functions; the fastest of `repeats` runs by wall time."""
    n = len(images)
    rows = []
    for name, fn in ways.items():
        fn(images[:min(n, batch_size if name not in scaled else 1)])
        k = max(1, min(python_images, n)) if name in scaled else n
        cpu, wall = min((_timed(lambda: fn(images[:k])) for _ in range(repeats)), key=lambda t: t[1])
        rows.append(Row(name, f"{k}, scaled to {n}" if k < n or name in scaled else str(n), cpu * n / k, wall * n / k))
    return rows


def format_table(rows: list[Row], first_column: str) -> str:
    lines = [f"| {first_column} | images timed | CPU s | wall s | speed |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.name} | {r.images} | {r.cpu:.3f} | {r.wall:.3f} | {rows[0].wall / r.wall:.1f}x |")
    return "\n".join(lines)


# --- input ------------------------------------------------------------------------------------

def load_images(data_dir: str, num_images: int, image_size: int) -> tuple[np.ndarray, str]:
    """The first `num_images` images of the dataset (train, then valid, then test), as the trainer
    reads them; returns them and a line that says what they are."""
    meta = metadata.read_metadata(data_dir)
    metadata.check_shards(meta, data_dir)
    if meta.form == "embeddings":
        raise metadata.DatasetError(f"{data_dir} holds the embeddings form (vectors, not pixels); run the ETL "
                                    f"with --form jpeg or pixels")
    size = ingest.input_image_size(meta, image_size, 1.0)
    batches = []
    for split in (s for s in ("train", "valid", "test") if ingest.count_examples(meta, s)):
        for x, _ in ingest.make_eval_dataset(meta, data_dir, split, 64, input_size=size):
            batches.append(x.numpy())
            if sum(len(b) for b in batches) >= num_images:
                break
        if sum(len(b) for b in batches) >= num_images:
            break
    if not batches:
        raise metadata.DatasetError(f"{data_dir} lists no examples")
    images = np.concatenate(batches)[:num_images]
    how = "decoded with shared.preprocess" if meta.form == "jpeg" else "as stored"
    return images, f"{len(images)} images of {size}x{size} px from {data_dir} ({meta.form} form, {how})"


def run(data_dir: str, num_images: int = 512, batch_size: int = 32, python_images: int = 4,
        image_size: int = 224, repeats: int = 3) -> str:
    """The tool's whole output."""
    pixels, what = load_images(data_dir, num_images, image_size)
    images = tf.constant(pixels)  # once: each row's pipelines then slice the same tensor
    load_before = os.getloadavg()[0]
    gray = time_rows(grayscale_means(images, batch_size), images, batch_size, PYTHON_ROWS, python_images, repeats)
    distort = time_rows(distortion_placements(batch_size), images, batch_size, repeats=repeats)
    load_after = os.getloadavg()[0]
    devices = ", ".join(d.device_type for d in tf.config.list_logical_devices()) or "CPU"
    return "\n".join([
        f"Grayscale conversion (chapter 7, table 7-5): {what}, batches of {batch_size}",
        format_table(gray, "method"),
        "",
        f"Colour distortion placement (chapter 7, vectorisation): the same images, batches of {batch_size}",
        format_table(distort, "placement"),
        "",
        f"devices: {devices}; {os.cpu_count()} logical CPUs; 1-min load average {load_before:.2f} before, "
        f"{load_after:.2f} after; each row the fastest of {repeats} runs; speed = first row's wall time / this row's",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.bench_vectorise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--data", required=True, help="ETL output folder (jpeg or pixels form)")
    p.add_argument("--num_images", type=int, default=512, help="images each row converts")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--python_images", type=int, default=4,
                   help="images the two Python rows convert; their times are scaled to --num_images")
    p.add_argument("--image_size", type=int, default=224, help="decode size for the jpeg form (pixels: the sidecar's)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is shown (others share the CPU)")
    args = p.parse_args(argv)
    if min(args.num_images, args.batch_size, args.python_images, args.image_size, args.repeats) <= 0:
        p.error("--num_images, --batch_size, --python_images, --image_size and --repeats must be positive")
    try:
        print(run(args.data, args.num_images, args.batch_size, args.python_images, args.image_size, args.repeats),
              flush=True)
    except metadata.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
