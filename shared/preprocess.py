"""Image bytes -> model input. Written once; used by the ETL, the trainer and the serving signature.

Every stage decodes with TensorFlow's own decoders, so an image gives bit-identical pixels in the
Beam workers, in tf.data and inside the exported SavedModel (PIL and TF's libjpeg settings differ
in the last bit, which would be training/serving skew). The graph decodes the formats it can read
as PIL shows them (GRAPH_FORMATS) and refuses the others naming their format, so a client of the
SavedModel alone (TF Serving, Vertex AI) gets the ETL's pixels or an error, never other pixels;
`shared.image_check.to_tf_decodable` turns those others into PNG before the graph sees them.
"""
from __future__ import annotations

import tensorflow as tf

RESIZE_METHOD = "bilinear"
RESIZE_ANTIALIAS = False
# The most the two orders of resize_image may differ by, per pixel: 1.8e-7 (3 float32 ulps below
# 1.0) was the largest difference over ~1,400 random images shrunk to 1-64 px.
RESIZE_ORDER_TOLERANCE = 3e-7

GRAPH_FORMATS = "JPEG, PNG, still WebP and uncompressed BMP of 8 (palette), 24 or 32 bits a pixel"


def describe() -> dict:
    """What `preprocess_image` does, for the sidecar's `preprocessing`, built from the constants it uses."""
    return {
        "decode": (f"in the graph, by the magic bytes: {GRAPH_FORMATS}; transparency (alpha, or a PNG's tRNS) "
                   "flattened onto white ((rgb*a + 255*(255-a)) / 255, rounded); 16-bit PNG to its high byte. Other "
                   "formats the graph refuses by name: the ETL and trainer.serve give it the first frame of a GIF, "
                   "animated WebP or TIFF, or another BMP, as PNG made by PIL with the same flattening "
                   "(shared.image_check.to_tf_decodable)"),
        "dtype": "float32",
        "scaling": ("uint8 * (1/255) -> [0, 1] (as tf.image.convert_image_dtype); after the resize for an image "
                    "larger than the output, before it otherwise (the two orders agree within "
                    f"{RESIZE_ORDER_TOLERANCE:g})"),
        "resize": {"method": RESIZE_METHOD, "antialias": RESIZE_ANTIALIAS, "preserve_aspect_ratio": False},
    }


# Written into the sidecar so that a reader knows exactly how `pixels` were made.
DESCRIPTION = describe()

_HEAD = 64  # bytes of the header the format checks read (zero-padded, so a short input reads zeros)


def _field(header: tf.Tensor, start: int, dtype: tf.DType) -> tf.Tensor:
    """The little-endian integer at header[start:], as int64."""
    return tf.cast(tf.io.decode_raw(tf.strings.substr(header, start, dtype.size), dtype)[0], tf.int64)


def _on_white(rgba: tf.Tensor) -> tf.Tensor:
    """uint8 RGBA -> RGB flattened onto white: (rgb * a + 255 * (255 - a)) / 255, rounded with
    shifts as PIL's paste with a mask rounds it (shared.image_check). The sum fits uint16, which
    needs 12 bytes a pixel of scratch where float32 took 20 (a 40 MP image); an opaque image (most
    PNGs) skips it."""
    def flatten():
        rgb, alpha = tf.cast(rgba[..., :3], tf.uint16), tf.cast(rgba[..., 3:], tf.uint16)
        blend = rgb * alpha + 255 * (255 - alpha) + 128
        return tf.cast(tf.bitwise.right_shift(blend + tf.bitwise.right_shift(blend, 8), 8), tf.uint8)

    return tf.cond(tf.reduce_all(tf.equal(rgba[..., 3], 255)), lambda: rgba[..., :3], flatten)


def _decode_bmp(image_bytes: tf.Tensor, header: tf.Tensor, bits: tf.Tensor, header_size: tf.Tensor) -> tf.Tensor:
    """An uncompressed 8-, 24- or 32-bit BMP -> RGB. TF reads an 8-bit BMP's palette indices as grey
    levels, so they are looked up in the palette (BGRX entries after the header) here."""
    def from_palette():
        colours_used = _field(header, 46, tf.int32)
        count = tf.where(colours_used > 0, colours_used, 256)
        entries = tf.io.decode_raw(tf.strings.substr(image_bytes, 14 + header_size, 4 * count), tf.uint8)
        palette = tf.reverse(tf.reshape(entries, [count, 4])[:, :3], axis=[1])  # BGR -> RGB
        return tf.gather(palette, tf.cast(tf.io.decode_bmp(image_bytes, channels=0)[..., 0], tf.int32))

    return tf.cond(bits == 8, from_palette, lambda: tf.io.decode_bmp(image_bytes, channels=3))


def _refuse(what: tf.Tensor) -> tf.Tensor:
    """An InvalidArgument error naming the format, where the graph cannot decode as the ETL does."""
    message = tf.strings.join([what, f": the model decodes {GRAPH_FORMATS}; convert anything else to PNG first "
                                     "(its first frame, transparency on white), as the ETL and trainer.serve do"])
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
        return tf.zeros([0, 0, 3], tf.uint8)


def _decode_other(image_bytes: tf.Tensor) -> tf.Tensor:
    """Anything but JPEG -> uint8 RGB, or `_refuse`."""
    header = tf.strings.substr(image_bytes, 0, _HEAD) + tf.constant(b"\0" * _HEAD)

    def starts(magic: bytes, at: int = 0) -> tf.Tensor:
        return tf.equal(tf.strings.substr(header, at, len(magic)), magic)

    # BMP: a Windows header (40 bytes or a later, longer version), no compression (BI_RGB).
    is_bmp, bmp_header_size = starts(b"BM"), _field(header, 14, tf.int32)
    bmp_bits, bmp_compression = _field(header, 28, tf.uint16), _field(header, 30, tf.int32)
    is_plain_bmp = (is_bmp & (bmp_header_size >= 40) & (bmp_compression == 0)
                    & ((bmp_bits == 8) | (bmp_bits == 24) | (bmp_bits == 32)))
    # WebP: simple lossy ('VP8 ', no alpha), lossless ('VP8L', alpha bit in its header) or extended
    # ('VP8X', flags: 0x10 alpha, 0x02 animation). TF's decode_webp wants the channels the file has.
    is_webp, chunk = starts(b"RIFF") & starts(b"WEBP", 8), tf.strings.substr(header, 12, 4)
    vp8x_flags, vp8l_bits = _field(header, 20, tf.uint8), _field(header, 24, tf.uint8)
    is_vp8x, has_bit = tf.equal(chunk, b"VP8X"), lambda value, bit: tf.bitwise.bitwise_and(value, bit) > 0
    webp_animated = is_vp8x & has_bit(vp8x_flags, 0x02)
    webp_alpha = (is_vp8x & has_bit(vp8x_flags, 0x10)) | (tf.equal(chunk, b"VP8L") & has_bit(vp8l_bits, 0x10))

    def png():
        return _on_white(tf.io.decode_png(image_bytes, channels=4))  # expands palette, grey and tRNS to RGBA

    def webp():
        return tf.cond(webp_alpha, lambda: _on_white(tf.io.decode_webp(image_bytes, channels=4)[0]),
                       lambda: tf.io.decode_webp(image_bytes, channels=3)[0])

    def refuse():
        bmp = tf.strings.join(["BMP (", tf.strings.as_string(bmp_bits), " bits a pixel, compression ",
                               tf.strings.as_string(bmp_compression), ")"])
        names = tf.stack(["GIF", "TIFF", "animated WebP", bmp, "an image format the model does not know"])
        kinds = tf.stack([starts(b"GIF8"), starts(b"II*\0") | starts(b"MM\0*"), is_webp, is_bmp, True])
        return _refuse(tf.gather(names, tf.argmax(tf.cast(kinds, tf.int32))))  # the first that holds

    return tf.case([(starts(b"\x89PNG\r\n\x1a\n"), png),
                    (is_plain_bmp, lambda: _decode_bmp(image_bytes, header, bmp_bits, bmp_header_size)),
                    (is_webp & ~webp_animated, webp)], default=refuse)


_JPEG_MAGIC = b"\xff\xd8\xff"


def _is_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(image_bytes, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)


def _decode_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_jpeg(image_bytes, channels=3)  # TF's defaults: INTEGER_FAST DCT, fancy upscaling


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes -> uint8 [height, width, 3] as the ETL stores it, or InvalidArgumentError
    naming a format the graph does not decode (see the module docstring)."""
    # tf.cond inlines both branches: a JPEG passes the other one's ~300 ops idle, 150 us of CPU for a
    # 300x400 JPEG (555 us decoded alone, 711 so; one thread), which `decode_jpeg_record` skips where
    # the bytes must be JPEG. A raw If op over two functions skips them, but it is stateful (the
    # refusal's Assert), and tf.map_fn then ran its iterations one at a time.
    image = tf.cond(_is_jpeg(image_bytes), lambda: _decode_jpeg(image_bytes), lambda: _decode_other(image_bytes))
    image.set_shape([None, None, 3])
    return image


def decode_jpeg_record(image_bytes: tf.Tensor) -> tf.Tensor:
    """A jpeg-form record's image, which is always an RGB JPEG (the ETL re-encodes every other input),
    -> uint8 [height, width, 3], the pixels `decode_image` gives for it; InvalidArgumentError for bytes
    that are not JPEG, which TF's decode_jpeg would otherwise decode as PNG, GIF or BMP. It skips the
    format dispatch, 10% of a decode and resize to 448 px (1,237 against 1,359 us of CPU, one thread)."""
    check = tf.debugging.Assert(_is_jpeg(image_bytes), [
        "a jpeg-form record holds an image that is not a JPEG (its bytes do not start with FF D8 FF); the "
        "ETL writes only JPEGs into this form, so write the dataset again with it"])
    with tf.control_dependencies([check]):
        image = _decode_jpeg(image_bytes)
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
        # No clip: a bilinear mix of float32 values in [0, 1] rounds into [0, 1] (tests/test_preprocess.py
        # checks it bit for bit), and clipping the enlarged image cost 10% of the trainer's CPU per image.
        return resize(tf.image.convert_image_dtype(image, tf.float32))

    shape = tf.shape(image)
    # int64: a 65535x65535 JPEG has more pixels than int32 holds, and would take the costly order.
    shrinks = tf.cast(shape[-3], tf.int64) * tf.cast(shape[-2], tf.int64) > height * width
    return tf.cond(shrinks, resize_then_scale, scale_then_resize)


def preprocess_image(image_bytes: tf.Tensor, height: int, width: int | None = None) -> tf.Tensor:
    """Encoded image bytes -> float32 [height, width, 3] in [0, 1]: the `pixels` of a record."""
    width = height if width is None else width
    return resize_image(decode_image(image_bytes), height, width)


def preprocess_jpeg_record(image_bytes: tf.Tensor, height: int, width: int | None = None) -> tf.Tensor:
    """A jpeg-form record's image -> what `preprocess_image` gives for it, bit for bit (the trainer's
    input; see `decode_jpeg_record`)."""
    width = height if width is None else width
    return resize_image(decode_jpeg_record(image_bytes), height, width)


_PARALLEL_IMAGES = 32  # images in flight: a server batch at once, for machines with more cores (here 32 ran
# as fast as 4-16)


def preprocess_batch(image_bytes: tf.Tensor, height: int, width: int | None = None) -> tf.Tensor:
    """A 1-D string tensor of encoded images -> float32 [n, height, width, 3], each as
    `preprocess_image` gives it: the ETL's batches and the export's signature.

    tf.map_fn with parallel iterations: on 32 320x240 JPEGs (2 cores, quiet) it took 10-25% less
    CPU and wall time than a tf.data parallel map in the graph, at 28 and 224 px, with one caller
    and with two."""
    width = height if width is None else width

    def each(decode):
        return lambda: tf.map_fn(lambda b: resize_image(decode(b), height, width), image_bytes,
                                 fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
                                 parallel_iterations=_PARALLEL_IMAGES)

    # A batch of JPEGs, the usual one, skips the format dispatch per image (`decode_image`), whose
    # idle branch runs for every image: the check is one op for the batch, and the branch not taken
    # runs idle once per batch. Same decode_jpeg call, so the same pixels. 32 320x240 JPEGs at 224 px
    # (best of 9, four runs): 0.826-0.893 ms of CPU an image, 0.877-0.918 with the dispatch.
    return tf.cond(tf.reduce_all(_is_jpeg(image_bytes)), each(_decode_jpeg), each(decode_image))
