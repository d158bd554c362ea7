"""The header check that guards every decode (ETL and server): its fast path for plain JPEG and
PNG must give exactly what PIL gives, and never a smaller size than libjpeg would allocate for."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared import image_check, preprocess
from tests.image_factory import encode, jpeg_with_claimed_size, make_image, png_with_claimed_size


def fast_header(data):
    return image_check._plain_jpeg_header(data) or image_check._plain_png_header(data)


def photo(mode="RGB"):
    return make_image(1, seed=3, size=(40, 30)).convert(mode)


def exif_bytes():
    exif = Image.Exif()
    exif[0x010F] = "camera maker"  # Make
    return exif.tobytes()


# Files the fast path must read itself (the common ones), each compared with PIL.
FAST_CASES = {
    "jpeg rgb": lambda: encode(photo(), "JPEG"),
    "jpeg progressive": lambda: encode(photo(), "JPEG", progressive=True, optimize=True),
    "jpeg 4:4:4": lambda: encode(photo(), "JPEG", subsampling=0, quality=95),
    "jpeg gray": lambda: encode(photo("L"), "JPEG"),
    "jpeg cmyk": lambda: encode(photo("CMYK"), "JPEG"),
    "jpeg exif": lambda: encode(photo(), "JPEG", exif=exif_bytes()),
    "jpeg 70 KB icc profile (two APP2 segments)": lambda: encode(photo(), "JPEG", icc_profile=b"\x00" * 70_000),
    "jpeg restart markers": lambda: encode(photo(), "JPEG", restart_marker_blocks=1),
    "png rgb": lambda: encode(photo(), "PNG"),
    "png rgba": lambda: encode(photo("RGBA"), "PNG"),
    "png gray": lambda: encode(photo("L"), "PNG"),
    "png gray+alpha": lambda: encode(photo("LA"), "PNG"),
    "png palette": lambda: encode(photo("P"), "PNG"),
}
# Files it must hand to PIL, because PIL names them differently or they are rare.
PIL_CASES = {
    "mpo (PIL's format MPO)": lambda: encode(photo(), "MPO", save_all=True, append_images=[photo()]),
    "png 1-bit": lambda: encode(photo("1"), "PNG"),
    "png 16-bit": lambda: encode(photo("I;16"), "PNG"),
    "gif": lambda: encode(photo(), "GIF"),
    "bmp": lambda: encode(photo(), "BMP"),
    "webp": lambda: encode(photo(), "WEBP"),
}


@pytest.mark.parametrize("name", sorted(FAST_CASES))
def test_fast_path_reads_common_files_exactly_as_pil(name):
    data = FAST_CASES[name]()
    assert fast_header(data) is not None, f"{name} went to PIL"
    assert fast_header(data) == image_check._pil_header(data)
    assert image_check.read_header(data) == image_check._pil_header(data)


@pytest.mark.parametrize("name", sorted(PIL_CASES))
def test_other_files_go_to_pil(name):
    data = PIL_CASES[name]()
    assert fast_header(data) is None
    assert image_check.read_header(data) == image_check._pil_header(data)


def test_jpeg_size_matches_libjpeg():
    data = encode(make_image(0, seed=1, size=(123, 45)), "JPEG")
    header = image_check.read_header(data)
    assert (header.height, header.width) == tuple(tf.io.extract_jpeg_shape(data).numpy()[:2]) == (45, 123)


@pytest.mark.parametrize("make", [jpeg_with_claimed_size, png_with_claimed_size])
def test_bomb_headers_are_too_large_without_decoding(make):
    with pytest.raises(image_check.ImageRejected) as e:
        image_check.read_header(make(60_000, 60_000))
    assert e.value.reason == "too_large"
    assert "60000x60000" in e.value.detail


def test_a_second_frame_header_does_not_hide_a_bomb():
    """The fast path stops at the first SOF; libjpeg refuses a file with two, so a large
    second one can never be decoded."""
    small = encode(photo(), "JPEG")
    sof = small.index(b"\xff\xc0")
    end = sof + 2 + int.from_bytes(small[sof + 2:sof + 4], "big")
    big_sof = bytearray(small[sof:end])
    big_sof[5:9] = (60_000).to_bytes(2, "big") * 2
    data = small[:end] + bytes(big_sof) + small[end:]
    assert image_check.read_header(data).width == 40
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.extract_jpeg_shape(data)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(data)


def test_mutated_jpeg_headers_never_under_report_to_libjpeg():
    """3,000 random byte changes in the header segments of a JPEG: whenever the fast path gives a
    size, libjpeg (TensorFlow's decoder) either refuses the file or reads the same size."""
    original = encode(photo(), "JPEG", exif=exif_bytes())
    scan = original.index(b"\xff\xda")
    rng = np.random.default_rng(7)
    read_fast = 0
    for _ in range(3000):
        data = bytearray(original)
        for position in rng.integers(2, scan + 4, size=rng.integers(1, 4)):
            data[position] = rng.integers(0, 256)
        data = bytes(data)
        header = fast_header(data)
        if header is None:
            continue
        read_fast += 1
        try:
            libjpeg = tuple(tf.io.extract_jpeg_shape(data).numpy()[:2])
        except tf.errors.InvalidArgumentError:
            continue
        assert libjpeg == (header.height, header.width), data[:scan].hex()
    assert read_fast > 300  # the mutants exercised the fast path, not only the fallback


def test_any_change_to_png_signature_or_ihdr_goes_to_pil():
    original = encode(photo(), "PNG")
    assert image_check._plain_png_header(original) is not None
    for position in range(33):  # signature, IHDR length, type, data and CRC
        data = bytearray(original)
        data[position] ^= 0x10
        assert image_check._plain_png_header(bytes(data)) is None, position


@pytest.mark.parametrize("data", [b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00", b"\x89PNG\r\n\x1a\n\x00",
                                  b"\xff\xd8\xff\xc0\x00\x11\x08"])
def test_truncated_headers_are_not_images(data):
    with pytest.raises(image_check.ImageRejected) as e:
        image_check.read_header(data)
    assert e.value.reason == "not_an_image"


def bmp(pixels: np.ndarray, header_size: int = 40, top_down: bool = False, bit_fields: bool = False) -> bytes:
    """A BMP of an HxWx3 uint8 array in layouts PIL does not write: OS/2 (12-byte header),
    rows top-down, or 32-bit BI_BITFIELDS with RGBA masks (a V4 header)."""
    import struct

    height, width, _ = pixels.shape
    if bit_fields:
        rgba = np.concatenate([pixels, np.full((height, width, 1), 255, np.uint8)], axis=2)
        rows = [rgba[y].tobytes() for y in range(height)]
        bits, compression, header_size = 32, 3, 108
    else:
        row_size = (width * 3 + 3) // 4 * 4
        rows = [pixels[y, :, ::-1].tobytes().ljust(row_size, b"\0") for y in range(height)]  # BGR
        bits, compression = 24, 0
    data = b"".join(rows if top_down else rows[::-1])
    if header_size == 12:
        dib = struct.pack("<IHHHH", 12, width, height, 1, bits)
    else:
        dib = struct.pack("<IiiHHIIiiII", header_size, width, -height if top_down else height, 1, bits,
                          compression, len(data), 2835, 2835, 0, 0)
        if bit_fields:
            dib += struct.pack("<IIII", 0xFF, 0xFF00, 0xFF0000, 0xFF000000) + b"sRGB" + b"\0" * 48
    offset = 14 + len(dib)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + dib + data


def flipped_rows(data: bytes) -> bytes:
    """A bottom-up BMP written top-down: rows in the other order and a negative height."""
    import struct

    offset, width, height, bits = (struct.unpack("<I", data[10:14])[0], *struct.unpack("<ii", data[18:26]),
                                   struct.unpack("<H", data[28:30])[0])
    row_size = (width * bits + 31) // 32 * 4
    rows = [data[offset + i * row_size:offset + (i + 1) * row_size] for i in range(height)]
    return data[:22] + struct.pack("<i", -height) + data[26:offset] + b"".join(reversed(rows))


BMP_CASES = {  # name: (bytes, whether the graph decodes them as they are)
    "24-bit": (lambda: encode(photo(), "BMP"), True),
    "32-bit": (lambda: encode(photo("RGBA"), "BMP"), True),
    "24-bit top-down": (lambda: bmp(np.asarray(photo()), top_down=True), True),
    "8-bit palette": (lambda: encode(photo().quantize(50), "BMP"), True),
    "8-bit palette top-down": (lambda: flipped_rows(encode(photo().quantize(50), "BMP")), True),
    "8-bit grey": (lambda: encode(photo("L"), "BMP"), True),
    "1-bit": (lambda: encode(photo("1"), "BMP"), False),
    "OS/2 24-bit": (lambda: bmp(np.asarray(photo()), header_size=12), False),
    "32-bit bit fields": (lambda: bmp(np.asarray(photo()), bit_fields=True), False),
}


def graph_decode(data: bytes) -> np.ndarray:
    return preprocess.decode_image(tf.constant(data)).numpy()


@pytest.mark.parametrize("name", sorted(BMP_CASES))
def test_the_model_sees_a_bmp_as_pil_does_or_is_given_a_png(name):
    """TF reads an 8-bit BMP's palette indices as grey levels (the graph looks them up), and refuses
    1-bit, OS/2 and bit-field BMPs, which the graph refuses by name and the ETL and server convert."""
    make, as_sent = BMP_CASES[name]
    data = make()
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert image_check.graph_reads_as_sent(data) == as_sent
    prepared = image_check.to_tf_decodable(data, image_check.read_header(data))
    assert (prepared is data) == as_sent
    np.testing.assert_array_equal(graph_decode(prepared), pil)
    if not as_sent:
        with pytest.raises(tf.errors.InvalidArgumentError, match="BMP .* bits a pixel"):
            graph_decode(data)


def half_transparent(mode: str) -> bytes:
    """A PNG whose left half is opaque red, right half fully transparent and stored as black, and
    a column in between half transparent."""
    pixels = np.zeros((30, 40, 4), np.uint8)
    pixels[:, :20] = (200, 0, 0, 255)
    pixels[:, 19] = (200, 100, 50, 128)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P":  # palette entry 0 is the transparent black
        return encode(image.convert("RGB").convert("P"), "PNG", transparency=0)
    if mode in ("RGB", "L"):  # one transparent colour (tRNS): black
        return encode(image.convert(mode), "PNG", transparency=(0, 0, 0) if mode == "RGB" else 0)
    return encode(image.convert(mode), "PNG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB", "L"])
def test_the_graph_flattens_a_transparent_png_onto_white_as_the_jpeg_form_does(mode):
    """TF's 3-channel decode drops alpha and shows the colour transparent pixels store (black here),
    while the jpeg form flattens onto white: the graph flattens too, rounding as PIL's paste."""
    data = half_transparent(mode)
    assert image_check.to_tf_decodable(data, image_check.read_header(data)) is data
    seen_by_model = graph_decode(data)
    jpeg_form = Image.open(io.BytesIO(image_check.to_rgb_image_bytes(data, "PNG")))  # its pixels before JPEG coding
    np.testing.assert_array_equal(seen_by_model, np.asarray(jpeg_form))
    assert seen_by_model[0, 30].tolist() == [255, 255, 255]
    if mode == "RGBA":
        assert seen_by_model[0, 19].tolist() == [227, 177, 152]  # round((c * 128 + 255 * 127) / 255)


def test_the_flattening_rounds_as_pil_for_every_colour_and_alpha():
    values = np.arange(256, dtype=np.uint8)
    rgba = np.stack(np.broadcast_arrays(values[None, :], values[None, :], values[None, :], values[:, None]), -1)
    pil = Image.new("RGB", (256, 256), (255, 255, 255))
    pil.paste(Image.fromarray(rgba, "RGBA"), mask=Image.fromarray(rgba[..., 3], "L"))
    np.testing.assert_array_equal(graph_decode(encode(Image.fromarray(rgba, "RGBA"), "PNG")), np.asarray(pil))


def grey_gradient(dtype) -> np.ndarray:
    ramp = np.arange(48 * 64).reshape(48, 64) / (48 * 64 - 1)
    return (ramp * 65535).astype(np.uint16) if dtype == np.uint16 else ramp.astype(np.float32)


def test_a_16_bit_image_is_scaled_not_clipped_and_every_form_sees_it_alike():
    """PIL's convert("RGB") clips 16-bit values at 255: a mid-grey ramp came out white in the jpeg
    form. The graph keeps a 16-bit PNG's high byte; the jpeg form and a converted TIFF do the same."""
    png, tiff = (encode(Image.fromarray(grey_gradient(np.uint16)), image_format) for image_format in ("PNG", "TIFF"))
    seen_by_model = graph_decode(png)
    assert abs(seen_by_model.mean() / 255 - 0.5) < 0.01
    np.testing.assert_array_equal(seen_by_model[..., 0], grey_gradient(np.uint16) >> 8)
    for data in (png, tiff):
        jpeg_form = np.asarray(Image.open(io.BytesIO(image_check.to_rgb_image_bytes(data, "PNG"))))
        np.testing.assert_array_equal(jpeg_form, seen_by_model)
    np.testing.assert_array_equal(graph_decode(image_check.to_tf_decodable(tiff, image_check.read_header(tiff))),
                                  seen_by_model)


def test_a_float_image_in_0_1_is_scaled_and_other_ranges_are_refused():
    data = encode(Image.fromarray(grey_gradient(np.float32), "F"), "TIFF")
    assert abs(np.asarray(Image.open(io.BytesIO(image_check.to_rgb_image_bytes(data, "PNG")))).mean() / 255 - 0.5) < 0.01
    data = encode(Image.fromarray(grey_gradient(np.float32) * 1000, "F"), "TIFF")
    with pytest.raises(image_check.ImageRejected, match=r"values in \[0, 1000\]"):
        image_check.to_rgb_image_bytes(data, "PNG")


def test_a_32_bit_integer_image_of_8_bit_values_keeps_them():
    values = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.int32)
    data = encode(Image.fromarray(values, "I"), "TIFF")
    converted = np.asarray(Image.open(io.BytesIO(image_check.to_rgb_image_bytes(data, "PNG"))))
    np.testing.assert_array_equal(converted[..., 0], values)
