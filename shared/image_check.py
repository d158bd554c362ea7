"""Cheap checks on untrusted image bytes before anything decodes them in full.

Used by the ETL (every input file) and by the server (every request), so that a file
whose header claims 30000x30000 pixels is refused from its header, never decoded.
"""
from __future__ import annotations

import dataclasses
import io
import re
import warnings
import zlib

from PIL import Image

# PIL's own bomb guard warns at ~89 MP and raises at twice that; we apply our own limit instead.
Image.MAX_IMAGE_PIXELS = None

# 40 MP: larger than any phone photo (a 48 MP sensor bins to 12 MP), and 40e6 x 3 bytes = 120 MB decoded.
DEFAULT_MAX_PIXELS = 40_000_000

# The only formats PIL may open (every Image.open of untrusted bytes passes `formats=`): PIL would
# otherwise read EPS/PS by running Ghostscript on them, and dozens of rarer formats. A JPEG with
# an MPO index (phone photos) opens through "JPEG" as format "MPO".
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy open (the header only) of untrusted bytes, restricted to ALLOWED_FORMATS."""
    return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)


class ImageRejected(ValueError):
    """An input that cannot become a record. `reason` is a short code, the message says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    format: str  # PIL's name: "JPEG", "PNG", ...
    mode: str  # PIL's mode: "RGB", "L", "CMYK", "P", ...
    width: int
    height: int


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Reads format and size from the header only. Raises ImageRejected('not_an_image'|'too_large')."""
    if not data:
        raise ImageRejected("not_an_image", "the file is empty")
    # Plain JPEG and PNG headers are read here in a few microseconds; anything else, or anything
    # unusual in them, goes to PIL (~40 us a JPEG, a third of the server's per-request overhead).
    header = _plain_jpeg_header(data) or _plain_png_header(data)
    if header is None:
        header = _pil_header(data)
    width, height = header.width, header.height
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}")
    return header


def _pil_header(data: bytes) -> ImageHeader:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = open_image(data)  # lazy: parses the header, decodes nothing
    except Image.UnidentifiedImageError:  # its message names only an io.BytesIO object
        raise ImageRejected("not_an_image", f"not a readable image: no image format starts with the bytes "
                                            f"{data[:8].hex(' ')} (the formats read: {', '.join(ALLOWED_FORMATS)})"
                            ) from None
    except Exception as e:  # a known format's header that does not parse: SyntaxError, struct.error ...
        raise ImageRejected("not_an_image", f"not a readable image: {type(e).__name__}: {e}") from None
    width, height = image.size
    return ImageHeader(image.format or "unknown", image.mode, width, height)


# Start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15): the frame header that libjpeg sizes its output by.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # PIL's modes by component count
_JPEG_MAX_SEGMENTS = 64  # real files have ~5-20 before the frame header; more goes to PIL


def _plain_jpeg_header(data: bytes) -> ImageHeader | None:
    """The frame header of a JPEG whose markers are well formed, or None to let PIL decide.

    Walks marker segments from SOI the way libjpeg does and stops at the first SOF, which is the
    size libjpeg (TensorFlow's decoder) allocates for: it refuses a second SOF. Returns None for
    anything PIL may read differently: junk between markers, a scan before the frame header,
    precision other than 8 bits, an odd component count, or an MPO (PIL names it "MPO").
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        while data[pos + 1] == 0xFF:  # fill bytes before a marker are allowed
            pos += 1
            if pos + 4 > len(data):
                return None
        marker = data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _JPEG_SOF:
            if length < 8 or pos + 2 + length > len(data):
                return None
            bits, components = data[pos + 4], data[pos + 9]
            if bits != 8 or components not in _JPEG_MODES:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return ImageHeader("JPEG", _JPEG_MODES[components], width, height)
        if not 0xC4 <= marker <= 0xFE or 0xD0 <= marker <= 0xDA or length < 2:
            return None  # no length field (SOI, EOI, RST) or a scan before the frame header
        if marker == 0xE2 and data[pos + 4:pos + 8] == b"MPF\x00":
            return None
        pos += 2 + length
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {(8, 0): "L", (8, 2): "RGB", (8, 3): "P", (8, 4): "LA", (8, 6): "RGBA",
              (1, 3): "P", (2, 3): "P", (4, 3): "P"}  # PIL's modes by (bit depth, colour type)


def _plain_png_header(data: bytes) -> ImageHeader | None:
    """Size and mode from a PNG's IHDR (which the format requires first), or None to let PIL decide.
    The chunk's CRC must match, as libpng and PIL require."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    mode = _PNG_MODES.get((data[24], data[25]))
    if mode is None:
        return None
    return ImageHeader("PNG", mode, int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))


def verify_decodes(data: bytes, header: ImageHeader) -> None:
    """Decodes the whole image (a JPEG at 1/8 scale, which still reads every byte of its
    entropy-coded data) so that truncated or corrupt files are caught. Raises ImageRejected('corrupt')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = open_image(data)
            if header.format == "JPEG":
                image.draft("RGB", (max(1, header.width // 8), max(1, header.height // 8)))
            image.load()
    except Exception as e:
        raise ImageRejected("corrupt", f"the image does not decode ({header.format} {header.width}x{header.height}): "
                                       f"{type(e).__name__}: {e}") from None


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or float greyscale image as 8-bit "L": 16 bits to their high byte, as TF's PNG
    decoder and PIL's own 16-bit RGB reading do (PIL's convert("RGB") clips instead: a mid-grey
    16-bit image came out white, a float one black). Other modes are returned as they are.
    Raises ImageRejected for values with no known range."""
    import numpy as np

    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if low < 0.0 or high > 1.0:
            raise ImageRejected("corrupt", f"a floating-point image with values in [{low:g}, {high:g}]; only [0, 1] "
                                           f"has a known meaning as pixels")
        scaled = np.rint(values * 255.0)
    elif image.mode.startswith("I;16") or (low >= 0 and 255 < high <= 65535):
        scaled = np.floor(values / 256.0)
    elif low >= 0 and high <= 255:  # 32-bit container ("I") of 8-bit values
        scaled = values
    else:
        raise ImageRejected("corrupt", f"a 32-bit integer image with values in [{low:g}, {high:g}]; only 16-bit "
                                       f"ranges have a known meaning as pixels")
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def to_rgb_image_bytes(data: bytes, image_format: str, quality: int = 95) -> bytes:
    """Decodes an image of ALLOWED_FORMATS (its first frame) and re-encodes it as RGB `image_format`
    ('JPEG' or 'PNG'), transparency flattened onto white as the graph flattens it
    (`shared.preprocess`: PIL's paste with a mask rounds alike)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = open_image(data)
        image.seek(0)
        image = _to_8_bit(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # Onto white, as a viewer shows it, not onto the colour transparent pixels store (often black).
            rgba = image.convert("RGBA")  # also applies a palette's, grey or RGB image's tRNS
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        else:
            image = image.convert("RGB")
    out = io.BytesIO()
    if image_format == "JPEG":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format=image_format)
    return out.getvalue()


def graph_reads_as_sent(data: bytes) -> bool:
    """True for the bytes the serving graph decodes itself (`shared.preprocess.decode_image`, by the
    same magic bytes and header fields): JPEG, PNG, a still WebP, and a BMP with a Windows header
    (40 bytes or a later, longer version), uncompressed, of 8 (palette), 24 or 32 bits a pixel.

    The graph refuses the rest, since TF cannot read them as PIL does: it decodes every frame of a
    GIF (the header gives one frame's size), has no TIFF decoder, and refuses 1- and 4-bit, OS/2
    (12-byte header), RLE and bit-field BMPs."""
    if data[:3] == b"\xff\xd8\xff" or data[:8] == _PNG_SIGNATURE:
        return True
    if data[:2] == b"BM" and len(data) >= 34:
        header_size = int.from_bytes(data[14:18], "little")
        bits_per_pixel = int.from_bytes(data[28:30], "little")
        compression = int.from_bytes(data[30:34], "little")
        return header_size >= 40 and bits_per_pixel in (8, 24, 32) and compression == 0
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        animated = data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02
        return not animated
    return False


def to_tf_decodable(data: bytes, header: ImageHeader) -> bytes:
    """Bytes the serving graph decodes to the pixels the ETL stores: the original when the graph reads
    them itself (`graph_reads_as_sent`); else the first frame as RGB PNG (lossless), transparency
    flattened onto white as the graph does."""
    if graph_reads_as_sent(data):
        return data
    try:
        return to_rgb_image_bytes(data, "PNG")
    except ImageRejected:
        raise
    except Exception as e:
        raise ImageRejected("corrupt", f"cannot convert {header.format} {header.mode} to RGB: "
                                       f"{type(e).__name__}: {e}") from None


# What TF wraps around an error raised inside a tf.data map, and around an Assert's message.
_TF_DATA_PREFIX = re.compile(r"^Error in user-defined function passed to \S+ transformation with iterator: \S+: ")
_ASSERTION = re.compile(r"^assertion failed: \[(.*)\]$")


def decode_error_cause(message: str) -> str:
    """TF's error message for a failed decode -> its cause, e.g. "jpeg::Uncompress failed. Invalid JPEG
    data or crop window.". Around the cause TF puts "Graph execution error:", "Detected at node ...",
    the Python stack that built the graph (indented) or "<stack traces unavailable>" for a loaded
    SavedModel, and node names (indented, "[[...]]"): the cause is the last line that is none of these,
    without the tf.data map's prefix or an assertion's brackets."""
    causes = [line for line in message.splitlines()
              if line.strip() and not line[0].isspace()
              and not line.startswith(("Graph execution error", "Detected at node", "<stack traces unavailable>", "[["))]
    if not causes:
        return "no cause given"
    cause = _TF_DATA_PREFIX.sub("", causes[-1].strip())
    return _ASSERTION.sub(r"\1", cause)[:300]
