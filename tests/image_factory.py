"""Generated test images: each class has its own colour, so a model can learn it and a
scrambled label or pixel shows up."""
from __future__ import annotations

import csv
import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30), (160, 40, 200)]


def make_image(class_index: int, seed: int, size=(48, 40)) -> Image.Image:
    """An RGB picture: a class-coloured square on a noisy background."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    colour = np.array(CLASS_COLOURS[class_index % len(CLASS_COLOURS)], dtype=np.uint8)
    top, left = rng.integers(0, height // 3), rng.integers(0, width // 3)
    pixels[top:top + height // 2, left:left + width // 2] = colour
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, image_format: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **kwargs)
    return out.getvalue()


def write_class_folders(root: str, classes=("cat", "dog", "owl"), per_class=8, size=(48, 40)) -> list[tuple[str, str]]:
    """Writes root/<class>/<i>.jpg; returns (path, label) rows."""
    rows = []
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, name, f"{i:03d}.jpg")
            make_image(c, seed=1000 * c + i, size=size).save(path, format="JPEG", quality=90)
            rows.append((path, name))
    return rows


def write_csv(path: str, rows, header=None, line_end="\n") -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator=line_end)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    # IHDR data starts at byte 16 (8 signature + 4 length + 4 type); its CRC follows 13 bytes of data.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_with_claimed_size(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def build_embedding_module(path: str, size: int = 32) -> str:
    """A small feature-vector module for tests (see etl.embeddings.save_random_mobilenet)."""
    from etl.embeddings import save_random_mobilenet

    return save_random_mobilenet(path, size=size, alpha=0.35)
