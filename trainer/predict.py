"""Predicts image files with an export, in batched calls to its `serving_default`:

    python -m trainer.predict --model runs/r1/export img1.jpg img2.png ...      # one JSON line per image
    python -m trainer.predict --model runs/r1/export --grid grid.png *.jpg      # and a picture of them

Each line is {"file", "class_name", "class_index", "probability"}, or {"file", "error"} for a file that
cannot be read or decoded; the others are still predicted, and the exit status is 1 if any failed.
Files may be local or gs:// (read with tf.io.gfile); the bytes, never the paths, go to the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
from typing import Any, Sequence

from shared import image_check
from trainer.exported_model import (BatchDecodeError, ExportedModel, ExportError, load_exported_model,
                                    prepare_image_bytes)

# One call per this many images: a shell glob of 10,000 files must not decode all of them at once.
DEFAULT_BATCH_SIZE = 128
GRID_COLUMNS = 5
GRID_MAX_IMAGES = 50  # a bigger grid is unreadable; the rest are left out with a note on stderr


@dataclasses.dataclass(frozen=True)
class FilePrediction:
    file: str
    image: bytes | None = None  # the bytes given to the model (for the grid); None when it failed
    prediction: dict[str, Any] | None = None  # the signature's outputs for this image
    error: str | None = None

    def to_json(self) -> str:
        if self.error is not None:
            return json.dumps({"file": self.file, "error": self.error})
        p = self.prediction
        return json.dumps({"file": self.file, "class_name": p["class_name"], "class_index": p["class_index"],
                           "probability": p["probability"]})


def read_image_file(path: str, max_pixels: int) -> bytes:
    """The file's bytes made model-ready, or OSError / ImageRejected saying why not."""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except tf.errors.OpError as e:
        raise OSError(f"cannot read: {e.message}") from None
    return prepare_image_bytes(data, image_check.read_header(data, max_pixels))


def predict_files(model: ExportedModel, paths: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                  max_pixels: int = image_check.DEFAULT_MAX_PIXELS) -> list[FilePrediction]:
    """One FilePrediction per path, in order; files are read and checked first, then predicted in
    calls of up to `batch_size` images (all of them in one call when there are fewer)."""
    results: list[FilePrediction | None] = [None] * len(paths)
    ready: list[tuple[int, bytes]] = []
    for position, path in enumerate(paths):
        try:
            ready.append((position, read_image_file(path, max_pixels)))
        except (OSError, image_check.ImageRejected) as e:
            results[position] = FilePrediction(path, error=f"{type(e).__name__}: {e}")
    for start in range(0, len(ready), batch_size):
        batch = ready[start:start + batch_size]
        while batch:
            try:
                predictions = model.predict([data for _, data in batch])
            except BatchDecodeError as e:
                if e.index < 0:
                    raise
                position, _ = batch.pop(e.index)  # the model refused this one: report it, predict the rest
                results[position] = FilePrediction(paths[position], error=f"the model cannot decode it: {e.detail}")
                continue
            for (position, data), prediction in zip(batch, predictions):
                results[position] = FilePrediction(paths[position], image=data, prediction=prediction)
            break
    return results


def write_prediction_grid(results: Sequence[FilePrediction], output_path: str) -> int:
    """A PNG of the predicted images titled with class and probability (the book's figure 7-3).
    Returns how many images it shows (at most GRID_MAX_IMAGES)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = [r for r in results if r.prediction is not None][:GRID_MAX_IMAGES]
    if not shown:
        raise ValueError("no image was predicted, so there is no grid to draw")
    columns = min(GRID_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        image = Image.open(io.BytesIO(r.image)).convert("RGB")
        image.thumbnail((512, 512))
        ax.imshow(image)
        ax.set_title(f"{r.prediction['class_name']} ({r.prediction['probability']:.2f})\n{_short(r.file)}", fontsize=9)
    fig.tight_layout()
    with open(output_path, "wb") as f:  # local file: matplotlib cannot write gs://
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return len(shown)


def _short(path: str, limit: int = 30) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the export folder a training run wrote (runs/<run>/export)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the images and their predictions here")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per model call (default: %(default)s)")
    p.add_argument("--max_pixels", type=int, default=image_check.DEFAULT_MAX_PIXELS,
                   help="refuse images whose header claims more pixels (default: %(default)s, the ETL's)")
    p.add_argument("files", nargs="+", help="image files (JPEG, PNG, GIF, BMP, or anything PIL reads), local or gs://")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch_size must be positive, got {args.batch_size}")

    try:
        model = load_exported_model(args.model)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = predict_files(model, args.files, args.batch_size, args.max_pixels)
    for r in results:
        print(r.to_json())
    failed = sum(r.error is not None for r in results)
    if args.grid:
        try:
            shown = write_prediction_grid(results, args.grid)
            note = f" (the first {shown} of {len(results) - failed})" if shown < len(results) - failed else ""
            print(f"wrote {args.grid}{note}", file=sys.stderr)
        except ValueError as e:
            print(f"error: no grid: {e}", file=sys.stderr)
            failed = failed or 1
    if failed:
        print(f"{failed} of {len(results)} images failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
