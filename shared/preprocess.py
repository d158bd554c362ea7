"""Image bytes -> model input. Written once; used by the ETL, the trainer and the serving signature.

Every stage decodes with TensorFlow's own decoders, so a JPEG gives bit-identical pixels in
the Beam workers, in tf.data and inside the exported SavedModel (PIL and TF's libjpeg settings
differ in the last bit, which would be training/serving skew).
"""
from __future__ import annotations

import tensorflow as tf

RESIZE_METHOD = "bilinear"
RESIZE_ANTIALIAS = False

# Written into the sidecar so that a reader knows exactly how `pixels` were made.
DESCRIPTION = {
    "decode": ("tf.io.decode_image(channels=3, expand_animations=False) of JPEG, opaque PNG or uncompressed 24/32-bit "
               "BMP bytes; any other image's first frame is converted to RGB PNG first, transparency flattened onto "
               "white (shared.image_check.to_tf_decodable)"),
    "dtype": "float32",
    "scaling": "tf.image.convert_image_dtype: uint8 / 255 -> [0, 1]",
    "resize": {"method": RESIZE_METHOD, "antialias": RESIZE_ANTIALIAS, "preserve_aspect_ratio": False},
}


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP bytes (`image_check.to_tf_decodable` makes any other format one) -> uint8 [height, width, 3]."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def resize_image(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """float32 [h, w, 3] (or a batch) in [0, 1] -> float32 [height, width, 3] in [0, 1]."""
    resized = tf.image.resize(image, [height, width], method=RESIZE_METHOD, antialias=RESIZE_ANTIALIAS)
    return tf.clip_by_value(resized, 0.0, 1.0)


def preprocess_image(image_bytes: tf.Tensor, height: int, width: int | None = None) -> tf.Tensor:
    """Encoded image bytes -> float32 [height, width, 3] in [0, 1]: the `pixels` of a record."""
    width = height if width is None else width
    image = tf.image.convert_image_dtype(decode_image(image_bytes), tf.float32)
    return resize_image(image, height, width)


def preprocess_batch(image_bytes: tf.Tensor, height: int, width: int | None = None) -> tf.Tensor:
    """A 1-D string tensor of encoded images -> float32 [n, height, width, 3]."""
    width = height if width is None else width
    return tf.map_fn(lambda b: preprocess_image(b, height, width), image_bytes,
                     fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
