"""The chapter's grayscale conversion, vectorised: one matrix multiplication over a whole batch.

Luminance weights (Rec. 709) give c_linear; the sRGB transfer curve then maps it to the gray
value, as in the book's `to_grayscale` (chapter 7, "Staying in the graph"). `Grayscale` is the
layer `--grayscale true` puts at the model's input, so the export converts exactly as training did;
trainer.bench_vectorise times it against the book's slower ways of writing the same formula.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

LUMINANCE_WEIGHTS = (0.2126, 0.7152, 0.0722)  # red, green, blue
SRGB_THRESHOLD = 0.0031308  # below it the sRGB curve is linear
SRGB_LINEAR_SLOPE = 12.92
SRGB_GAMMA = 2.4
SRGB_SCALE, SRGB_OFFSET = 1.055, 0.055


def srgb_curve(c_linear: tf.Tensor) -> tf.Tensor:
    """The book's conditional, as tf.where over every pixel at once."""
    return tf.where(c_linear > SRGB_THRESHOLD,
                    SRGB_SCALE * tf.pow(c_linear, 1 / SRGB_GAMMA) - SRGB_OFFSET,
                    SRGB_LINEAR_SLOPE * c_linear)


def to_grayscale(images: tf.Tensor) -> tf.Tensor:
    """float32 [..., H, W, 3] in [0, 1] -> [..., H, W, 1]: one (..., 3) x (3, 1) matmul, then the curve.
    The same for one image or a batch (matmul broadcasts over the leading dimensions)."""
    weights = tf.constant([[w] for w in LUMINANCE_WEIGHTS], dtype=images.dtype)  # 3x1
    return srgb_curve(tf.matmul(images, weights))


class Grayscale(keras.layers.Layer):
    """[N, H, W, 3] -> [N, H, W, 1], in training and at inference alike (it has no weights)."""

    def call(self, images):
        return to_grayscale(images)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([1])
