"""Predicts image files with an export, in batched calls to its `serving_default`:

    python -m trainer.predict --model runs/r1/export img1.jpg img2.png ...      # one JSON line per image
    python -m trainer.predict --model runs/r1/export --grid grid.png *.jpg      # and a picture of them

Each line is {"file", "class_name", "class_index", "probability"}, or {"file", "error"} for a file that
cannot be read or decoded; the others are still predicted, and the exit status is 1 if any failed.
Files may be local or gs:// (read with tf.io.gfile); the bytes, never the paths, go to the model,
in calls of up to --batch_size images, each call's lines printed as it returns.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
from typing import Any, Iterator, Sequence

from shared import image_check, native_log
from shared.paths import is_remote
from shared.untrusted_files import FileRefused, read_untrusted_file
from trainer.serving.exported_model import (BatchDecodeError, ExportedModel, ExportError, load_exported_model,
                                    prepare_image_bytes)

# One call per this many images, and results printed as each call returns: a shell glob of 10,000
# files must neither decode nor hold all of them at once.
DEFAULT_BATCH_SIZE = 128
DEFAULT_MAX_FILE_MB = 64.0  # the ETL's --max_file_mb: files are read whole, so refuse bigger ones first
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


def read_image_file(path: str, max_pixels: int = image_check.DEFAULT_MAX_PIXELS,
                    max_bytes: int = int(DEFAULT_MAX_FILE_MB * 2**20)) -> bytes:
    """The file's bytes made model-ready, or OSError / ImageRejected saying why not.

    A local path must be a regular file: opening a FIFO waits for a writer forever, and a device
    or pipe reports size 0 ("empty") to tf.io.gfile. Files over `max_bytes` are refused unread
    (`shared.untrusted_files`)."""
    import tensorflow as tf

    try:
        if is_remote(path):
            mode, size = None, tf.io.gfile.stat(path).length
        else:
            try:
                info = os.stat(path)
            except OSError as e:
                raise OSError(f"cannot read: {e.strerror}") from None
            mode, size = info.st_mode, info.st_size
        data = read_untrusted_file(lambda: tf.io.gfile.GFile(path, "rb"), max_bytes, mode=mode, size=size)
    except tf.errors.OpError as e:
        raise OSError(f"cannot read: {e.message}") from None
    except FileRefused as e:
        if e.reason == "not_regular":
            raise OSError(e.detail) from None
        raise image_check.ImageRejected("too_large", f"{e.detail} (--max_file_mb {max_bytes / 2**20:.3g} MB)") from None
    return prepare_image_bytes(data, image_check.read_header(data, max_pixels))


def predict_files(model: ExportedModel, paths: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                  max_pixels: int = image_check.DEFAULT_MAX_PIXELS,
                  max_bytes: int = int(DEFAULT_MAX_FILE_MB * 2**20)) -> Iterator[FilePrediction]:
    """One FilePrediction per path, in the paths' order, yielded as they are known: the readable
    images go to the model in calls of `batch_size` (all in one call when there are fewer), and
    only one call's images are held at a time."""
    pending: list[tuple[int, bytes | FilePrediction]] = []  # (position, model-ready bytes or a failure), in order

    def predict_pending() -> Iterator[FilePrediction]:
        batch = [(position, item) for position, item in pending if isinstance(item, bytes)]
        done: dict[int, FilePrediction] = {position: item for position, item in pending if not isinstance(item, bytes)}
        while batch:
            try:
                predictions = model.predict([data for _, data in batch])
            except BatchDecodeError as e:
                if e.index < 0:
                    raise
                position, _ = batch.pop(e.index)  # the model refused this one: report it, predict the rest
                done[position] = FilePrediction(paths[position], error=f"the model cannot decode it: {e.detail}")
                continue
            for (position, data), prediction in zip(batch, predictions):
                done[position] = FilePrediction(paths[position], image=data, prediction=prediction)
            break
        for position, _ in pending:
            yield done[position]
        pending.clear()

    ready = 0
    for position, path in enumerate(paths):
        try:
            pending.append((position, read_image_file(path, max_pixels, max_bytes)))
            ready += 1
        except (OSError, image_check.ImageRejected) as e:
            pending.append((position, FilePrediction(path, error=f"{type(e).__name__}: {e}")))
        if ready == batch_size:
            yield from predict_pending()
            ready = 0
    yield from predict_pending()


def write_prediction_grid(results: Sequence[FilePrediction], output_path: str) -> int:
    """A PNG of the predicted images titled with class and probability (the book's figure 7-3).
    Returns how many images it shows (at most GRID_MAX_IMAGES)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.prediction is not None][:GRID_MAX_IMAGES]
    if not shown:
        raise ValueError("no image was predicted, so there is no grid to draw")
    columns = min(GRID_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        image = image_check.open_image(r.image).convert("RGB")
        image.thumbnail((512, 512))
        ax.imshow(image)
        # parse_math=False: a '$' in a file or class name would start a mathtext formula ('a$_$b.jpg' failed the grid)
        ax.set_title(f"{r.prediction['class_name']} ({r.prediction['probability']:.2f})\n{_short(r.file)}", fontsize=9,
                     parse_math=False)
    fig.tight_layout()
    png = io.BytesIO()
    # bbox_inches: tight_layout alone left the titles of 2-5 square images on one row above the top edge.
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    import tensorflow as tf

    with tf.io.gfile.GFile(output_path, "wb") as f:  # local or gs://
        f.write(png.getvalue())
    return len(shown)


def _short(path: str, limit: int = 30) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def grid_path_problem(path: str) -> str | None:
    """Why `--grid path` could not be written, checked before any prediction; None if it can be
    (gs:// paths are checked when written)."""
    if is_remote(path):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name such as {os.path.join(path, 'grid.png')}"
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    return None


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="the export folder a training run wrote (runs/<run>/export)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the images and their predictions here "
                                                f"(the first {GRID_MAX_IMAGES}), local or gs://")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per model call (default: %(default)s)")
    p.add_argument("--max_pixels", type=int, default=image_check.DEFAULT_MAX_PIXELS,
                   help="refuse images whose header claims more pixels (default: %(default)s, the ETL's)")
    p.add_argument("--max_file_mb", type=float, default=DEFAULT_MAX_FILE_MB,
                   help="refuse files larger than this, unread (default: %(default)s, the ETL's)")
    p.add_argument("files", nargs="+", help=f"image files ({', '.join(image_check.ALLOWED_FORMATS)}), local or gs://")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch_size must be positive, got {args.batch_size}")
    if not 0 < args.max_file_mb < math.inf:
        p.error(f"--max_file_mb must be a positive number, got {args.max_file_mb}")
    if args.grid and grid_path_problem(args.grid):
        p.error(f"--grid {args.grid}: {grid_path_problem(args.grid)}")

    tf = native_log.load_tensorflow()

    try:
        model = load_exported_model(args.model)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = failed = predicted = 0
    for_grid: list[FilePrediction] = []
    for r in predict_files(model, args.files, args.batch_size, args.max_pixels, int(args.max_file_mb * 2**20)):
        print(r.to_json(), flush=True)
        total += 1
        failed += r.error is not None
        predicted += r.prediction is not None
        if args.grid and r.prediction is not None and len(for_grid) < GRID_MAX_IMAGES:
            for_grid.append(r)
    grid_failed = False  # an error of its own: the images' count stays the images'
    if args.grid:
        try:
            shown = write_prediction_grid(for_grid, args.grid)
            note = f" (the first {shown} of {predicted})" if shown < predicted else ""
            print(f"wrote {args.grid}{note}", file=sys.stderr)
        except ValueError as e:
            print(f"error: no grid: {e}", file=sys.stderr)
            grid_failed = True
        except (OSError, tf.errors.OpError) as e:
            print(f"error: cannot write the grid to {args.grid}: {getattr(e, 'message', None) or e}", file=sys.stderr)
            grid_failed = True
    if failed:
        print(f"{failed} of {total} images failed", file=sys.stderr)
    return 1 if failed or grid_failed else 0


if __name__ == "__main__":
    sys.exit(run())
