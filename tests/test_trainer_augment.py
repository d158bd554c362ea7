"""Augmentation layers: random per image and per step (not baked into the graph), centre crop at inference."""
import numpy as np
import tensorflow as tf
import tf_keras as keras

from trainer import augment


def _batch(n=16, side=8, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(0.1, 0.9, (n, side, side, 3)).astype(np.float32))


def test_crop_at_inference_is_the_exact_centre_not_a_resize():
    images = _batch(side=8)
    out = augment.RandomCropOrCentre(4)(images, training=False).numpy()
    np.testing.assert_array_equal(out, images.numpy()[:, 2:6, 2:6, :])


def test_random_crop_takes_whole_pixels_at_an_offset_that_varies_per_image():
    side, size = 8, 4
    images = _batch(n=32, side=side)
    out = augment.RandomCropOrCentre(size)(images, training=True).numpy()
    offsets = []
    for img, crop in zip(images.numpy(), out):
        found = [(r, c) for r in range(side - size + 1) for c in range(side - size + 1)
                 if np.array_equal(img[r:r + size, c:c + size], crop)]
        assert found, "a crop is not an exact window of its image"
        offsets.append(found[0])
    assert len(set(offsets)) > 3, f"offsets do not vary across the batch: {offsets}"


def test_colour_distortion_differs_per_image_and_per_step_inside_a_compiled_graph():
    layer = augment.RandomColorDistortion()
    grey = tf.fill([8, 4, 4, 3], 0.5)  # same input for every image

    @tf.function
    def step(x):  # traced once, like model.fit's train step
        return layer(x, training=True)

    first, second = step(grey).numpy(), step(grey).numpy()
    per_image = first.reshape(8, -1).mean(axis=1)
    assert np.ptp(per_image) > 0.01, "every image got the same distortion (factors baked per batch)"
    assert not np.allclose(first, second), "two steps of the traced graph gave the same distortion (np.random bug)"
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(layer(grey, training=False).numpy(), grey.numpy())


def test_flip_mirrors_some_images_and_only_in_training():
    images = _batch(n=32)
    out = augment.RandomHorizontalFlip()(images, training=True).numpy()
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images.numpy())]
    kept = [np.array_equal(o, i) for o, i in zip(out, images.numpy())]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < 32, f"{sum(flipped)} of 32 flipped"
    np.testing.assert_array_equal(augment.RandomHorizontalFlip()(images, training=False).numpy(), images.numpy())


def test_layers_can_each_be_turned_off():
    assert augment.make_augmentation_layers(32, 32, False, False) == []
    names = [type(layer).__name__ for layer in augment.make_augmentation_layers(64, 32, True, True)]
    assert names == ["RandomCropOrCentre", "RandomHorizontalFlip", "RandomColorDistortion"]


def test_augmentation_in_a_model_is_on_under_fit_and_off_under_predict():
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for layer in augment.make_augmentation_layers(8, 4, True, True):
        x = layer(x)
    model = keras.Model(inputs, x)
    images = _batch(n=4)
    centre = images.numpy()[:, 2:6, 2:6, :]
    np.testing.assert_array_equal(model.predict(images, verbose=0), centre)
    assert not np.allclose(model(images, training=True).numpy(), centre)
