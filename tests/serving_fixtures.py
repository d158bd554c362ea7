"""A tiny export with exactly the trainer's serving contract, and images to send it.

The model reads colour: its logit for class k is 10 x the mean of channel k, so a red image is
"red" with probability ~0.9999 and a grey one is a three-way tie. Its `predict_filenames`
writes a marker file when it runs, so a test can prove the server never called it.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

CLASS_NAMES = ("red", "green", "blue")
IMAGE_SIZE = 32  # small: the whole export saves in ~2 s
MARKER_FILE = "predict_filenames_was_called"  # written next to the export by predict_filenames


def write_test_export(export_dir: str) -> str:
    """Saves the test model to `export_dir` (a TF2 SavedModel with the contract's two signatures)."""
    import tensorflow as tf

    from shared.preprocess import preprocess_batch

    num_pixels = IMAGE_SIZE * IMAGE_SIZE
    kernel = np.zeros((num_pixels * 3, len(CLASS_NAMES)), np.float32)
    for k in range(len(CLASS_NAMES)):
        kernel[k::3, k] = 10.0 / num_pixels  # HWC flattening: channel k sits at every third position
    marker = os.path.join(os.path.dirname(os.path.abspath(export_dir)), MARKER_FILE)

    class ColourModel(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(kernel, name="kernel")
            self.class_names = tf.constant(CLASS_NAMES)

        def _outputs(self, image_bytes):
            pixels = preprocess_batch(image_bytes, IMAGE_SIZE)
            flat = tf.reshape(pixels, [-1, num_pixels * 3])
            probabilities = tf.nn.softmax(tf.matmul(flat, self.kernel))
            class_index = tf.argmax(probabilities, axis=1)
            return {"probability": tf.reduce_max(probabilities, axis=1), "class_index": class_index,
                    "class_name": tf.gather(self.class_names, class_index), "probabilities": probabilities}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve_bytes(self, image_bytes):  # the argument names are the signature's input names
            return self._outputs(image_bytes)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve_filenames(self, filenames):
            with tf.control_dependencies([tf.io.write_file(marker, "called")]):
                image_bytes = tf.map_fn(tf.io.read_file, filenames)
            return self._outputs(image_bytes)

    module = ColourModel()
    tf.saved_model.save(module, export_dir, signatures={
        "serving_default": module.serve_bytes.get_concrete_function(),
        "predict_filenames": module.serve_filenames.get_concrete_function(),
    })
    return export_dir


@pytest.fixture(scope="module")
def test_export(tmp_path_factory) -> str:
    """Path of a fresh test export; `<parent>/MARKER_FILE` appears if predict_filenames ever runs.

    Set SERVING_TEST_EXPORT to run the same tests against a real trainer export instead.
    """
    real = os.environ.get("SERVING_TEST_EXPORT")
    if real:
        return real
    return write_test_export(str(tmp_path_factory.mktemp("serving") / "export"))


def marker_path(export_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(export_dir)), MARKER_FILE)


def make_image_bytes(colour: tuple[int, int, int], image_format: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    """A solid-colour image with a little noise (so JPEGs are not trivially small), encoded."""
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour, np.int16) + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format=image_format)
    return out.getvalue()


def make_bomb_png_header(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims width x height pixels (900 MP by default) with a token of data:
    what a decompression bomb looks like to a header reader."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
