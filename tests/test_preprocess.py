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


def test_the_sidecar_states_the_tolerance_the_test_holds_the_orders_to():
    # Every pixels dataset's sidecar carries this text; it said "2 ulps" while the orders differ by up to 1.8e-7.
    assert f"within {preprocess.RESIZE_ORDER_TOLERANCE:g}" in preprocess.DESCRIPTION["scaling"]


def test_resize_image_refuses_an_already_scaled_image():
    # A float image in [0, 1] would be divided by 255 a second time and come out almost black.
    with pytest.raises(TypeError, match="uint8.*float32"):
        preprocess.resize_image(tf.zeros([8, 8, 3], tf.float32), 4, 4)
