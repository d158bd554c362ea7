"""The vectorisation benchmark: every way of writing the chapter's grayscale conversion gives the same
pixels, the colour distortion placements do the same arithmetic, and the tool prints both tables on
records of either image form (its speed ratios are for a person to read, not asserted)."""
import numpy as np
import pytest
import tensorflow as tf

from tests import trainer_fixtures as fx
from trainer import augment, bench_vectorise, grayscale

# The sRGB curve's pow amplifies float32 rounding near the threshold; 1e-5 holds for any kernel.
ATOL = 1e-5


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, (3, 9, 7, 3)).astype(np.float32)
    pixels[0, 0, :4] = [[0, 0, 0], [1, 1, 1], [0.0031, 0.0031, 0.0031], [0.0032, 0.0032, 0.0032]]  # either side of the threshold
    return pixels


def test_every_way_of_the_chapter_gives_the_same_gray_pixels(images):
    expected = np.stack([bench_vectorise.to_grayscale_python(img) for img in images])
    per_image = {
        "py_function": bench_vectorise.to_grayscale_py_function,
        "slicing": bench_vectorise.to_grayscale_sliced,
        "matmul": bench_vectorise.to_grayscale_matmul,
    }
    for name, convert in per_image.items():
        got = np.stack(list(tf.data.Dataset.from_tensor_slices(images).map(convert).as_numpy_iterator()))
        np.testing.assert_allclose(got, expected, atol=ATOL, err_msg=name)
    for lambda_layer in (False, True):
        model = bench_vectorise.make_grayscale_model(images.shape[1:], lambda_layer=lambda_layer, with_mean=False)
        np.testing.assert_allclose(model.predict(images, verbose=0)[..., 0], expected, atol=ATOL, err_msg=str(lambda_layer))
    np.testing.assert_allclose(grayscale.Grayscale()(images).numpy()[..., 0], expected, atol=ATOL)


def test_every_row_of_the_tool_computes_the_same_image_means(images):
    ways = bench_vectorise.grayscale_means(tf.constant(images), batch_size=2)
    expected = np.stack([bench_vectorise.to_grayscale_python(img) for img in images]).mean(axis=(1, 2))
    assert len(ways) == 6
    for name, fn in ways.items():
        np.testing.assert_allclose(fn(tf.constant(images)), expected, atol=ATOL, err_msg=name)


def test_the_books_per_image_distortion_and_the_trainers_batch_arithmetic_agree(images):
    contrast, brightness = 1.3, -0.1
    book = tf.clip_by_value(tf.image.adjust_brightness(tf.image.adjust_contrast(images, contrast), brightness), 0.0, 1.0)
    factors = np.full([len(images), 1, 1, 1], contrast, np.float32), np.full([len(images), 1, 1, 1], brightness, np.float32)
    np.testing.assert_allclose(augment.distort_colors(images, *factors).numpy(), book.numpy(), atol=1e-6)
    means = {name: fn(tf.constant(images)) for name, fn in bench_vectorise.distortion_placements(2).items()}
    assert all(m.shape == (len(images),) and np.all((m >= 0) & (m <= 1)) for m in means.values())


def test_the_tool_prints_both_tables_on_a_datasets_images(tmp_path):
    items = fx.make_image_files(str(tmp_path / "images"), per_class=2)
    data = str(tmp_path / "jpeg")
    fx.write_dataset(data, items, "jpeg")
    output = bench_vectorise.run(data, num_images=4, batch_size=2, python_images=1, image_size=24, repeats=1)
    assert f"4 images of 24x24 px from {data} (jpeg form, decoded with shared.preprocess)" in output
    for row in ("| iteration: Python loop over pixels | 1, scaled to 4 |", "| tf.py_function (the same loop) | 1, scaled to 4 |",
                "| slicing + tf.where, map() per image | 4 |", "| matmul, map() per image | 4 |",
                "| Keras Grayscale layer on batches | 4 |", "| Keras Lambda layer on batches | 4 |",
                "| map() per image, before batch() | 4 |", "| map() on batches, after batch() | 4 |",
                "| Keras layer in the model (trainer/augment.py) | 4 |"):
        assert row in output, output
    first_rows = [line for line in output.splitlines() if line.startswith("| iteration") or line.startswith("| map() per")]
    assert all(line.endswith("| 1.0x |") for line in first_rows)


def test_the_pixels_form_is_used_as_stored(tmp_path):
    items = fx.make_image_files(str(tmp_path / "images"), per_class=2)
    data = str(tmp_path / "pixels")
    meta = fx.write_dataset(data, items, "pixels")
    pixels, what = bench_vectorise.load_images(data, num_images=100, image_size=224)
    _, records = fx.read_split_records(meta, data, "train")
    assert pixels.shape == (6, 32, 32, 3) and "6 images of 32x32 px" in what and "(pixels form, as stored)" in what
    stored = np.stack([r["image"] for r in records])  # shard order; the tool interleaves the shards
    np.testing.assert_array_equal(sorted(pixels[:len(records)], key=np.sum), sorted(stored, key=np.sum))
