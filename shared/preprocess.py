"""Image bytes -> model input. Written once; used by the ETL, the trainer and the serving signature.

Every stage decodes with TensorFlow's own decoders, so a JPEG gives bit-identical pixels in
the Beam workers, in tf.data and inside the exported SavedModel (PIL and TF's libjpeg settings
differ in the last bit, which would be training/serving skew).
"""
from __future__ import annotations

import tensorflow as tf

RESIZE_METHOD = "bilinear"
RESIZE_ANTIALIAS = False
# The most the two orders of resize_image may differ by, per pixel: 1.8e-7 (3 float32 ulps below
# 1.0) was the largest difference over ~1,400 random images shrunk to 1-64 px.
RESIZE_ORDER_TOLERANCE = 3e-7

# Written into the sidecar so that a reader knows exactly how `pixels` were made.
DESCRIPTION = {
    "decode": ("tf.io.decode_image(channels=3, expand_animations=False) of JPEG, opaque PNG or uncompressed 24/32-bit "
               "BMP bytes; any other image's first frame is converted to RGB PNG first, transparency flattened onto "
               "white (shared.image_check.to_tf_decodable)"),
    "dtype": "float32",
    "scaling": ("uint8 * (1/255) -> [0, 1] (as tf.image.convert_image_dtype); after the resize for an image larger "
                f"than the output, before it otherwise (the two orders agree within {RESIZE_ORDER_TOLERANCE:g})"),
    "resize": {"method": RESIZE_METHOD, "antialias": RESIZE_ANTIALIAS, "preserve_aspect_ratio": False},
}


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP bytes (`image_check.to_tf_decodable` makes any other format one) -> uint8 [height, width, 3]."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def resize_image(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """uint8 [h, w, 3] (or a batch) -> float32 [height, width, 3] in [0, 1]: a bilinear resize and a
    scaling by 1/255 (as tf.image.convert_image_dtype), in the cheaper order for this image.

    Resizing is linear, so the order changes a pixel by float rounding only (RESIZE_ORDER_TOLERANCE),
    and it is chosen from the sizes alone, so the ETL, the trainer and the server still agree. An
    image larger than the output is resized as uint8 and never copied to float32 at full size (12
    bytes a pixel): 320x240 -> 32 px took 0.41 instead of 0.54 ms of CPU. A smaller one is scaled first, because
    TF's uint8 resize is slower per output pixel: 400x300 -> 448 px took 2.11 ms that way and 2.63 ms
    the other way (2 cores).
    """
    if image.dtype != tf.uint8:
        raise TypeError(f"resize_image takes the uint8 image decode_image returns, got {image.dtype.name}")

    def resize(pixels):
        return tf.image.resize(pixels, [height, width], method=RESIZE_METHOD, antialias=RESIZE_ANTIALIAS)

    def resize_then_scale():
        return tf.clip_by_value(resize(image) * (1.0 / 255.0), 0.0, 1.0)

    def scale_then_resize():
        return tf.clip_by_value(resize(tf.image.convert_image_dtype(image, tf.float32)), 0.0, 1.0)

    shape = tf.shape(image)
    # int64: a 65535x65535 JPEG has more pixels than int32 holds, and would take the costly order.
    shrinks = tf.cast(shape[-3], tf.int64) * tf.cast(shape[-2], tf.int64) > height * width
    return tf.cond(shrinks, resize_then_scale, scale_then_resize)


def preprocess_image(image_bytes: tf.Tensor, height: int, width: int | None = None) -> tf.Tensor:
    """Encoded image bytes -> float32 [height, width, 3] in [0, 1]: the `pixels` of a record."""
    width = height if width is None else width
    return resize_image(decode_image(image_bytes), height, width)


def preprocess_batch(image_bytes: tf.Tensor, height: int, width: int | None = None) -> tf.Tensor:
    """A 1-D string tensor of encoded images -> float32 [n, height, width, 3]."""
    width = height if width is None else width
    return tf.map_fn(lambda b: preprocess_image(b, height, width), image_bytes,
                     fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
