"""shared.preprocess: the one image -> model input function the ETL, the trainer and serving share."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared import preprocess
from tests.image_factory import encode


@pytest.mark.parametrize("seed", [3, 63])  # 63: a 200x10 shrink 3 float32 ulps off, the most seen
@pytest.mark.parametrize("size,target", [((320, 240), (32, 32)), ((200, 10), (32, 32)), ((17, 9), (32, 48)), ((64, 64), (64, 64))])
def test_either_resize_order_matches_scaling_first(size, target, seed):
    # The order is chosen per image for speed (shrinking: no float32 copy at full size); resizing is
    # linear, so the pixels must stay those of convert_image_dtype-then-resize up to float rounding.
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for encoded in (encode(Image.fromarray(pixels), "JPEG"), encode(Image.fromarray(pixels), "PNG")):
        got = preprocess.preprocess_image(tf.constant(encoded), *target).numpy()
        scaled_first = tf.image.convert_image_dtype(preprocess.decode_image(tf.constant(encoded)), tf.float32)
        want = tf.clip_by_value(tf.image.resize(scaled_first, target, method=preprocess.RESIZE_METHOD,
                                                antialias=preprocess.RESIZE_ANTIALIAS), 0.0, 1.0).numpy()
        assert got.shape == (*target, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=preprocess.RESIZE_ORDER_TOLERANCE)
        assert got.min() >= 0.0 and got.max() <= 1.0


def test_the_two_resize_orders_agree_within_the_stated_tolerance_on_random_images():
    """The tolerance the sidecar states holds for both orders on random images and sizes, shrinking
    and enlarging (each image is resized both ways, whichever resize_image would choose)."""
    rng = np.random.default_rng(11)
    worst = 0.0
    for _ in range(120):
        height, width = rng.integers(1, 120, 2)
        target = [int(t) for t in rng.integers(1, 64, 2)]
        image = tf.constant(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        resize = lambda x: tf.image.resize(x, target, method=preprocess.RESIZE_METHOD,  # noqa: E731
                                           antialias=preprocess.RESIZE_ANTIALIAS)
        resized_first = tf.clip_by_value(resize(image) * (1.0 / 255.0), 0.0, 1.0)
        scaled_first = tf.clip_by_value(resize(tf.image.convert_image_dtype(image, tf.float32)), 0.0, 1.0)
        worst = max(worst, float(tf.reduce_max(tf.abs(resized_first - scaled_first))))
    assert 0 < worst <= preprocess.RESIZE_ORDER_TOLERANCE


def test_the_sidecar_text_is_built_from_the_constants_the_code_uses(monkeypatch):
    assert preprocess.describe() == preprocess.DESCRIPTION
    monkeypatch.setattr(preprocess, "RESIZE_ORDER_TOLERANCE", 1.25e-5)
    monkeypatch.setattr(preprocess, "RESIZE_METHOD", "area")
    monkeypatch.setattr(preprocess, "GRAPH_FORMATS", "JPEG only")
    described = preprocess.describe()
    assert "within 1.25e-05" in described["scaling"] and described["resize"]["method"] == "area"
    assert "JPEG only" in described["decode"]


@pytest.mark.parametrize("mode,options", [("RGB", {}), ("L", {}), ("CMYK", {}), ("RGB", {"progressive": True})])
def test_a_jpeg_decodes_as_before_the_graph_read_other_formats(mode, options):
    """JPEG takes its own branch: its pixels (and so every JPEG dataset's records) stay decode_image's."""
    data = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert(mode),
                  "JPEG", **options)
    np.testing.assert_array_equal(preprocess.decode_image(tf.constant(data)).numpy(),
                                  tf.io.decode_image(data, channels=3, expand_animations=False).numpy())


@pytest.mark.parametrize("mode,options", [("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0})])
def test_a_jpeg_record_preprocesses_to_preprocess_images_pixels_bit_for_bit(mode, options):
    """The trainer decodes the jpeg form's records without the format dispatch: same pixels, both
    when shrinking (resize first) and enlarging (scale first), in eager mode and in a tf.data map."""
    data = encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert(mode),
                  "JPEG", **options)
    for size in (16, 64):
        want = preprocess.preprocess_image(tf.constant(data), size).numpy()
        np.testing.assert_array_equal(preprocess.preprocess_jpeg_record(tf.constant(data), size).numpy(), want)
        [mapped] = list(tf.data.Dataset.from_tensors(data).map(lambda b: preprocess.preprocess_jpeg_record(b, size)))
        np.testing.assert_array_equal(mapped.numpy(), want)


def test_a_jpeg_record_that_is_not_a_jpeg_is_refused_not_decoded_as_another_format():
    # TF's decode_jpeg decodes PNG, GIF and BMP too; a jpeg-form record must be a JPEG.
    png = encode(Image.new("RGB", (8, 6), (200, 10, 10)), "PNG")
    assert preprocess.decode_image(tf.constant(png)).shape == (6, 8, 3)  # the dispatching decoder reads it
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG"):
        preprocess.decode_jpeg_record(tf.constant(png))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG"):
        list(tf.data.Dataset.from_tensors(png).map(lambda b: preprocess.preprocess_jpeg_record(b, 4)))


def test_a_batch_is_each_image_preprocessed_alone_in_order():
    rng = np.random.default_rng(4)
    images = [encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), image_format)
              for (h, w), image_format in [((30, 40), "JPEG"), ((5, 7), "PNG"), ((64, 48), "WEBP"), ((20, 20), "BMP")]]
    batch_fn = tf.function(lambda b: preprocess.preprocess_batch(b, 16, 12),
                           input_signature=[tf.TensorSpec([None], tf.string)])
    batch = batch_fn(tf.constant(images)).numpy()
    assert batch.shape == (4, 16, 12, 3)
    for got, data in zip(batch, images):
        np.testing.assert_array_equal(got, preprocess.preprocess_image(tf.constant(data), 16, 12).numpy())
    np.testing.assert_array_equal(batch_fn(tf.constant(images[2:3])).numpy(), batch[2:3])
    assert batch_fn(tf.constant([], tf.string)).shape == (0, 16, 12, 3)
    # A batch of JPEGs only takes the branch without the per-image dispatch: the same pixels.
    jpegs = [images[0]] + [encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG",
                                  progressive=h > 20) for h, w in [(9, 31), (48, 64)]]
    for got, data in zip(batch_fn(tf.constant(jpegs)).numpy(), jpegs):
        np.testing.assert_array_equal(got, preprocess.preprocess_image(tf.constant(data), 16, 12).numpy())


def test_a_batch_of_jpegs_decodes_each_without_the_dispatch_and_a_mixed_one_with_it(monkeypatch):
    """Counts the per-image format dispatches that preprocess_batch builds into its graph: the JPEG-only
    branch must not dispatch (that is its point), the mixed branch must (it reads PNG, WebP, BMP)."""
    built = []
    real = preprocess.decode_image
    monkeypatch.setattr(preprocess, "decode_image", lambda b: built.append(1) or real(b))
    tf.function(lambda b: preprocess.preprocess_batch(b, 8),
                input_signature=[tf.TensorSpec([None], tf.string)]).get_concrete_function()
    assert len(built) == 1  # the mixed branch's map_fn body; the JPEG branch's has none


@pytest.mark.parametrize("count,size,target", [(16, (5, 7), (448, 448)), (2, (300, 400), (448, 448)),
                                               (256, (11, 13), (97, 131))])
def test_enlarging_skips_the_clip_and_gives_the_clipped_pixels_bit_for_bit(count, size, target):
    # resize_image leaves out tf.clip_by_value when enlarging, so a bilinear mix of float32 values in
    # [0, 1] must round into [0, 1]. The likeliest to round above 1.0: white beside dark, many weights.
    rng = np.random.default_rng(0)
    pixels = np.where(rng.random((count, *size, 3)) < 0.5, 255, rng.integers(0, 128, (count, *size, 3))).astype(np.uint8)
    raw = tf.image.resize(tf.image.convert_image_dtype(pixels, tf.float32), target, method=preprocess.RESIZE_METHOD,
                          antialias=preprocess.RESIZE_ANTIALIAS).numpy()
    assert raw.min() >= 0.0 and raw.max() <= 1.0 and not np.signbit(raw).any()
    got = preprocess.resize_image(tf.constant(pixels), *target).numpy()
    np.testing.assert_array_equal(got, np.clip(raw, 0.0, 1.0))


def test_resize_image_refuses_an_already_scaled_image():
    # A float image in [0, 1] would be divided by 255 a second time and come out almost black.
    with pytest.raises(TypeError, match="uint8.*float32"):
        preprocess.resize_image(tf.zeros([8, 8, 3], tf.float32), 4, 4)
