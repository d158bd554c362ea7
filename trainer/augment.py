"""Augmentation as Keras layers after `batch()`: vectorised over the batch, random per image.

Two bugs of the book's layers are fixed here:
- its colour distortion drew its factors with `np.random` inside `call()`, which runs once when
  `fit` traces the graph, so one fixed shift was baked in; these layers draw with `tf.random`,
  per image and per step;
- its `RandomCrop` resized the whole padded image at inference, so serving saw a different scale
  from training; `RandomCropOrCentre` takes the centre crop of the same size instead.
Each layer is the identity (or the centre crop) when `training` is false.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

# The book's ranges (chapter 6/7 `color_distort`).
CONTRAST_RANGE = (0.5, 1.5)
BRIGHTNESS_DELTA = 0.2


class RandomCropOrCentre(keras.layers.Layer):
    """[N, S, S, C] -> [N, size, size, C]: a random crop per image in training, the centre crop otherwise."""

    def __init__(self, size: int, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, images, training=None):
        side = tf.shape(images)[1]
        tf.debugging.assert_greater_equal(side, self.size, message=f"image smaller than the crop size {self.size}")
        if not training:
            offset = (side - self.size) // 2
            return images[:, offset:offset + self.size, offset:offset + self.size, :]
        n = tf.shape(images)[0]
        # One (row, column) offset per image; gather keeps whole pixels, so no interpolation.
        offsets = tf.random.uniform([n, 2], 0, side - self.size + 1, dtype=tf.int32)
        steps = tf.range(self.size)
        rows = offsets[:, :1] + steps  # [N, size]
        cols = offsets[:, 1:] + steps
        images = tf.gather(images, rows, axis=1, batch_dims=1)
        return tf.gather(images, cols, axis=2, batch_dims=1)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], self.size, self.size, input_shape[-1]])

    def get_config(self):
        return super().get_config() | {"size": self.size}


class RandomHorizontalFlip(keras.layers.Layer):
    """Mirrors each image left-right with probability 1/2 in training."""

    def call(self, images, training=None):
        if not training:
            return images
        flip = tf.random.uniform([tf.shape(images)[0], 1, 1, 1]) < 0.5
        return tf.where(flip, tf.reverse(images, axis=[2]), images)


def distort_colors(images: tf.Tensor, contrast: tf.Tensor, brightness: tf.Tensor) -> tf.Tensor:
    """[N, H, W, C] with per-image factors [N, 1, 1, 1]: tf.image.adjust_contrast's arithmetic (about
    each channel's mean), then adjust_brightness's, clipped to [0, 1], for a whole batch at once."""
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return tf.clip_by_value((images - mean) * contrast + mean + brightness, 0.0, 1.0)


def random_color_distortion(images: tf.Tensor) -> tf.Tensor:
    """[N, H, W, C] -> the same with a contrast factor in CONTRAST_RANGE and a brightness shift in
    +-BRIGHTNESS_DELTA drawn per image."""
    n = tf.shape(images)[0]
    contrast = tf.random.uniform([n, 1, 1, 1], *CONTRAST_RANGE)
    brightness = tf.random.uniform([n, 1, 1, 1], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    return distort_colors(images, contrast, brightness)


class RandomColorDistortion(keras.layers.Layer):
    """random_color_distortion in training; the identity otherwise."""

    def call(self, images, training=None):
        if not training:
            return images
        return random_color_distortion(images)


def make_augmentation_layers(input_size: int, model_size: int, with_flip: bool,
                             with_color_distort: bool) -> list[keras.layers.Layer]:
    """The layers between the model's input and its network; a crop only if model_size < input_size."""
    layers = []
    if model_size < input_size:
        layers.append(RandomCropOrCentre(model_size, name="random_crop_or_centre"))
    if with_flip:
        layers.append(RandomHorizontalFlip(name="random_flip"))
    if with_color_distort:
        layers.append(RandomColorDistortion(name="random_color_distortion"))
    return layers
