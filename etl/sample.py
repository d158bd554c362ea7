"""`make sample`: scikit-learn's bundled handwritten digits as JPEG files, without any download.

Writes `<out>/<digit>/<nnnn>.jpg` (1,797 images, 10 classes), `<out>/all_data.csv` in the book's
flowers format (`path,label`, no header; paths relative to the CSV) and `<out>/dict.txt`.
"""
from __future__ import annotations

import argparse
import csv
import os

import numpy as np
from PIL import Image

# The digits are 8x8 with ink values 0..16; 4x upscaling (nearest) gives 32x32 files whose
# JPEG artefacts stay small next to the strokes.
UPSCALE = 4


def write_digits_sample(out_dir: str, limit: int | None = None, quality: int = 95) -> str:
    """Writes the sample and returns the CSV's path. `limit` keeps the first N images (tests)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    if limit is not None:
        images, targets = images[:limit], targets[:limit]
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i, (image, target) in enumerate(zip(images, targets)):
        label = str(int(target))
        ink = np.clip(image / 16.0, 0.0, 1.0)
        gray = (255 * (1.0 - ink)).astype(np.uint8)  # dark ink on white paper
        picture = Image.fromarray(gray, mode="L").resize((8 * UPSCALE, 8 * UPSCALE), Image.NEAREST).convert("RGB")
        relative = f"{label}/{i:04d}.jpg"
        os.makedirs(os.path.join(out_dir, label), exist_ok=True)
        picture.save(os.path.join(out_dir, relative), format="JPEG", quality=quality)
        rows.append((relative, label))
    csv_path = os.path.join(out_dir, "all_data.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    with open(os.path.join(out_dir, "dict.txt"), "w") as f:
        f.write("".join(f"{d}\n" for d in range(10)))
    return csv_path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m etl.sample", description=__doc__, allow_abbrev=False)
    parser.add_argument("--output", default="data/sample/digits")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    path = write_digits_sample(args.output, args.limit)
    print(f"sample: wrote {path}")


if __name__ == "__main__":
    main()
