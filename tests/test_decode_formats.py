"""One decode path: for every format the ETL accepts, the exported SavedModel on its own (no project
code importable) gives the pixels of the ETL's record of that file, or refuses it naming the format;
`trainer.serve` gives the ETL's pixels for all of them.

The export is trainer.export's own, around a model that flattens its input, so its `probabilities`
output is the pixels the model sees (8x8x3 = 192 values).
"""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from shared import image_check, preprocess
from tests.image_factory import encode

SIZE = 8


def picture(mode: str = "RGB", size=(24, 18)) -> Image.Image:
    """Colour fields and grain; RGBA/LA ones are opaque on the left, half transparent in the middle
    and fully transparent on the right, storing black there (what TF's 3-channel decode shows)."""
    rng = np.random.default_rng(5)
    width, height = size
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (3, 4, 3)), height // 3 + 1, 0), width // 4 + 1, 1)[:height, :width]
    rgb = np.clip(rgb + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    alpha = np.full((height, width, 1), 255, np.uint8)
    alpha[:, width // 3:] = 128
    alpha[:, 2 * width // 3:] = 0
    rgb[:, 2 * width // 3:] = 0
    rgba = Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode) if mode != "LA" else rgba.convert("LA")


def png_16_bit(mode: str) -> bytes:
    """A 16-bit RGBA or grey PNG (PIL writes neither)."""
    rng = np.random.default_rng(6)
    channels, colour_type = {"RGBA": (4, 6), "L": (1, 0)}[mode]
    values = rng.integers(0, 65536, (18, 24, channels)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in values)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 24, 18, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def animation(image_format: str, **kwargs) -> bytes:
    frames = [picture()] + [Image.new("RGB", (24, 18), colour) for colour in [(10, 10, 240)] * 5]
    return encode(frames[0], image_format, save_all=True, append_images=frames[1:], **kwargs)


def palette_with_transparency(image_format: str) -> bytes:
    image = picture().quantize(16)
    return encode(image, image_format, transparency=int(np.asarray(image)[0, -1]))


def rgb_with_transparent_colour() -> bytes:
    pixels = np.asarray(picture()).copy()
    pixels[:6, :6] = (1, 2, 3)
    return encode(Image.fromarray(pixels), "PNG", transparency=(1, 2, 3))


# name: (bytes, None if the SavedModel alone decodes it, else a word its refusal must name)
FORMATS = {
    "jpeg rgb": (lambda: encode(picture(), "JPEG"), None),
    "jpeg grey": (lambda: encode(picture("L"), "JPEG"), None),
    "jpeg cmyk": (lambda: encode(picture("CMYK"), "JPEG"), None),
    "png rgb": (lambda: encode(picture(), "PNG"), None),
    "png rgba": (lambda: encode(picture("RGBA"), "PNG"), None),
    "png grey+alpha": (lambda: encode(picture("LA"), "PNG"), None),
    "png palette+tRNS": (lambda: palette_with_transparency("PNG"), None),
    "png rgb+tRNS": (rgb_with_transparent_colour, None),
    "png 16-bit grey": (lambda: png_16_bit("L"), None),
    "png 16-bit rgba": (lambda: png_16_bit("RGBA"), None),
    "bmp 24-bit": (lambda: encode(picture(), "BMP"), None),
    "bmp 32-bit": (lambda: encode(picture("RGBA"), "BMP"), None),
    "bmp 8-bit palette": (lambda: encode(picture().quantize(50), "BMP"), None),
    "bmp 1-bit": (lambda: encode(picture("1"), "BMP"), "BMP (1 bits a pixel"),
    "gif": (lambda: encode(picture(), "GIF"), "GIF"),
    "gif transparent": (lambda: palette_with_transparency("GIF"), "GIF"),
    "gif animated": (lambda: animation("GIF"), "GIF"),
    "webp lossy": (lambda: encode(picture(), "WEBP"), None),
    "webp lossless": (lambda: encode(picture(), "WEBP", lossless=True), None),
    "webp transparent lossy": (lambda: encode(picture("RGBA"), "WEBP"), None),
    "webp transparent lossless": (lambda: encode(picture("RGBA"), "WEBP", lossless=True), None),
    "webp animated": (lambda: animation("WEBP", lossless=True), "animated WebP"),
    "tiff": (lambda: encode(picture(), "TIFF"), "TIFF"),
    "tiff rgba": (lambda: encode(picture("RGBA"), "TIFF"), "TIFF"),
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("formats")
    paths = {}
    for i, (name, (make, _)) in enumerate(FORMATS.items()):
        paths[name] = str(folder / f"{i:02d}.img")
        with open(paths[name], "wb") as f:
            f.write(make())
    return paths


@pytest.fixture(scope="module")
def etl_pixels(image_files) -> dict[str, np.ndarray]:
    """The `pixels` of the ETL's record of each file: its LoadImage and EncodeTensor steps, as the
    pipeline runs them for `--form pixels --image_size 8`."""
    from etl import records
    from etl.inputs import Row
    from shared import schema

    features = schema.record_features("pixels", image_size=SIZE)
    load = records.LoadImage("pixels", (1, 0, 0), max_pixels=10**6, max_bytes=10**6, jpeg_quality=95)
    loaded = [next(iter(load.process(Row(path, "a", ""), {"a": 0}))) for path in image_files.values()]
    rejected = [item.value for item in loaded if not isinstance(item, records.Loaded)]
    assert not rejected, rejected
    encode_step = records.EncodeTensor(features, lambda: records.make_pixels_fn(SIZE))
    encode_step.setup()
    encoded = list(encode_step.process(loaded))
    assert all(isinstance(item, records.Encoded) for item in encoded), encoded
    return {name: schema.decode_example(features, item.serialized)["image"]
            for name, item in zip(image_files, encoded)}


@pytest.fixture(scope="module")
def flattening_export(tmp_path_factory) -> str:
    """trainer.export.export_model of a model that flattens its 8x8x3 input into its outputs."""
    import tf_keras as keras

    from shared import metadata, schema
    from trainer.export import export_model

    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten()])
    names = tuple(f"value_{i}" for i in range(SIZE * SIZE * 3))  # one "class" per output
    meta = metadata.DatasetMetadata(schema.SCHEMA_VERSION, "pixels", names, schema.record_features("pixels", SIZE),
                                    preprocess.DESCRIPTION, {})
    export_dir = str(tmp_path_factory.mktemp("flattening") / "export")
    return export_model(model, meta, export_dir, input_size=SIZE, dataset_sidecar_json=meta.to_json(), train_info={})


# Run with a clean environment: project modules cannot be imported (the venv installs the project
# editable, so a finder refuses them), and the cwd is a scratch folder.
SAVED_MODEL_ALONE = r"""
import importlib.abc, json, sys
class NoProjectCode(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("etl", "shared", "trainer", "tests"):
            raise ImportError(f"{name} is project code")
sys.meta_path.insert(0, NoProjectCode())
for module in ("shared", "etl", "trainer"):
    try:
        __import__(module)
        sys.exit(f"{module} imported")
    except ImportError:
        pass
import tensorflow as tf
export, files = sys.argv[1], json.loads(sys.argv[2])
loaded = tf.saved_model.load(export)
out = {}
for name, path in files.items():
    with open(path, "rb") as f:
        data = f.read()
    try:
        by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant([data]))["probabilities"]
        by_name = loaded.signatures["predict_filenames"](filenames=tf.constant([path]))["probabilities"]
        out[name] = {"pixels": by_bytes.numpy()[0].tolist(), "by_name": by_name.numpy()[0].tolist()}
    except tf.errors.InvalidArgumentError as e:
        out[name] = {"error": e.message}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved_model_alone(flattening_export, image_files, tmp_path_factory) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    out = subprocess.run([sys.executable, "-I", "-c", SAVED_MODEL_ALONE, flattening_export, json.dumps(image_files)],
                         capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(tmp_path_factory.mktemp("scratch")))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_saved_model_alone_gives_the_etl_pixels_or_names_the_format(name, saved_model_alone, etl_pixels):
    refused_as = FORMATS[name][1]
    answer = saved_model_alone[name]
    if refused_as is None:
        assert "error" not in answer, answer.get("error")
        pixels = np.reshape(answer["pixels"], (SIZE, SIZE, 3))
        np.testing.assert_allclose(pixels, etl_pixels[name], rtol=0, atol=preprocess.RESIZE_ORDER_TOLERANCE)
        np.testing.assert_array_equal(answer["by_name"], answer["pixels"])  # predict_filenames decodes alike
    else:
        assert "pixels" not in answer, f"{name} was decoded by the graph although the ETL converts it with PIL"
        cause = image_check.decode_error_cause(answer["error"])
        assert cause.startswith(refused_as) and f"the model decodes {preprocess.GRAPH_FORMATS}" in cause, cause


def test_the_server_gives_the_etl_pixels_for_every_format(flattening_export, image_files, etl_pixels):
    from starlette.testclient import TestClient

    from trainer.serving.app import make_app

    images = {name: open(path, "rb").read() for name, path in image_files.items()}
    with TestClient(make_app(flattening_export, "model")) as client:
        r = client.post("/v1/models/model:predict",
                        json={"instances": [{"b64": base64.b64encode(data).decode()} for data in images.values()]})
    assert r.status_code == 200, r.text
    for name, prediction in zip(images, r.json()["predictions"]):
        np.testing.assert_allclose(np.reshape(prediction["probabilities"], (SIZE, SIZE, 3)), etl_pixels[name],
                                   rtol=0, atol=preprocess.RESIZE_ORDER_TOLERANCE, err_msg=name)

