"""Cheap checks on untrusted image bytes before anything decodes them in full.

Used by the ETL (every input file) and by the server (every request), so that a file
whose header claims 30000x30000 pixels is refused from its header, never decoded.
"""
from __future__ import annotations

import dataclasses
import io
import warnings

from PIL import Image

# PIL's own bomb guard warns at ~89 MP and raises at twice that; we apply our own limit instead.
Image.MAX_IMAGE_PIXELS = None

# 40 MP: larger than any phone photo (a 48 MP sensor bins to 12 MP), and 40e6 x 3 bytes = 120 MB decoded.
DEFAULT_MAX_PIXELS = 40_000_000

# Formats passed to TensorFlow's decode_image as they are; anything else becomes PNG first.
# Not GIF, although TF reads it: decode_image decodes every frame even with
# expand_animations=False (120 frames of 1000x1000 took 3.3 s), and the header gives one
# frame's size, so a small animated GIF could hold gigabytes of pixels.
TF_DECODABLE_FORMATS = ("JPEG", "PNG", "BMP")


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))  # lazy: parses the header, decodes nothing
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error ...
        raise ImageRejected("not_an_image", f"not a readable image: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected("too_large", f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}")
    return ImageHeader(image.format or "unknown", image.mode, width, height)


def verify_decodes(data: bytes, header: ImageHeader) -> None:
    """Decodes the whole image (a JPEG at 1/8 scale, which still reads every byte of its
    entropy-coded data) so that truncated or corrupt files are caught. Raises ImageRejected('corrupt')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            if header.format == "JPEG":
                image.draft("RGB", (max(1, header.width // 8), max(1, header.height // 8)))
            image.load()
    except Exception as e:
        raise ImageRejected("corrupt", f"the image does not decode ({header.format} {header.width}x{header.height}): "
                                       f"{type(e).__name__}: {e}") from None


def to_rgb_image_bytes(data: bytes, image_format: str, quality: int = 95) -> bytes:
    """Decodes any PIL-readable image (first frame) and re-encodes it as RGB `image_format` ('JPEG' or 'PNG')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        image.seek(0)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            # Flatten transparency onto white, as a viewer would show it, instead of onto black.
            rgba = image.convert("RGBA")
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


def to_tf_decodable(data: bytes, header: ImageHeader) -> bytes:
    """Bytes that TF's decode_image reads as the image the header describes: the original for
    JPEG, PNG and BMP, the first frame as RGB PNG (lossless) for everything else."""
    if header.format in TF_DECODABLE_FORMATS:
        return data
    try:
        return to_rgb_image_bytes(data, "PNG")
    except Exception as e:
        raise ImageRejected("corrupt", f"cannot convert {header.format} {header.mode} to RGB: "
                                       f"{type(e).__name__}: {e}") from None
