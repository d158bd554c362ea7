"""trainer.predict: one batched call, a line per file, errors named, and the grid."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shared import native_log
from tests.serving_fixtures import make_bomb_png_header, make_image_bytes, test_export  # noqa: F401
from tests.test_native_log import NATIVE_START_UP_NOTES
from trainer.serving import predict
from trainer.serving.exported_model import load_exported_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three good images (PNG, JPEG, GIF) and four bad files, in a mixed order."""
    d = tmp_path_factory.mktemp("images")
    files = {
        "red.png": make_image_bytes((250, 10, 10)),
        "notes.txt": b"not an image at all",
        "green.jpg": make_image_bytes((10, 230, 10), "JPEG"),
        "truncated.jpg": make_image_bytes((10, 230, 10), "JPEG", size=(200, 150))[:-300],
        "bomb.png": make_bomb_png_header(),
        "blue.gif": make_image_bytes((10, 10, 240), "GIF"),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    paths = [str(d / name) for name in files]
    paths.insert(3, str(d / "missing.png"))
    return paths


GOOD = ("red.png", "green.jpg", "blue.gif")


def test_all_good_images_go_in_one_call_and_match_the_saved_model(test_export, images):
    import tensorflow as tf

    model = load_exported_model(test_export)
    calls = []
    real_predict = model.predict
    model.predict = lambda batch: calls.append(len(batch)) or real_predict(batch)
    results = list(predict.predict_files(model, images))

    assert calls == [3], f"expected one call with the 3 good images, got calls of sizes {calls}"
    assert [r.file for r in results] == images
    good = [r for r in results if os.path.basename(r.file) in GOOD]
    assert all(r.error is None for r in good)
    fn = tf.saved_model.load(test_export).signatures["serving_default"]
    # The bytes predict gave the model (the GIF's first frame as PNG), in one batch of the same
    # images: oneDNN picks kernels by batch size.
    expected = fn(image_bytes=tf.constant([r.image for r in good]))
    np.testing.assert_allclose([r.prediction["probability"] for r in good], expected["probability"].numpy(), rtol=1e-6)
    assert [r.prediction["class_name"] for r in good] == [s.decode() for s in expected["class_name"].numpy()]
    if "SERVING_TEST_EXPORT" not in os.environ:
        assert [r.prediction["class_name"] for r in good] == ["red", "green", "blue"]

    errors = {os.path.basename(r.file): r.error for r in results if r.error is not None}
    assert set(errors) == {"notes.txt", "missing.png", "truncated.jpg", "bomb.png"}
    assert "not a readable image" in errors["notes.txt"]
    assert "does not decode (JPEG" in errors["truncated.jpg"] and "truncated" in errors["truncated.jpg"]
    assert "30000x30000" in errors["bomb.png"]


def test_batch_size_splits_the_calls(test_export, images):
    model = load_exported_model(test_export)
    calls = []
    real_predict = model.predict
    model.predict = lambda batch: calls.append(len(batch)) or real_predict(batch)
    list(predict.predict_files(model, images, batch_size=2))
    assert calls == [2, 1]


def test_cli_prints_a_json_line_per_file_writes_the_grid_and_fails_if_any_failed(test_export, images, tmp_path):
    grid = tmp_path / "grid.png"
    new_user = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", native_log.SHOW_ALL_ENV)}
    proc = subprocess.run([sys.executable, "-m", "trainer.predict", "--model", test_export, "--grid", str(grid),
                           *images], cwd=REPO, capture_output=True, text=True, timeout=120, env=new_user)
    assert proc.returncode == 1, proc.stderr
    assert not [note for note in NATIVE_START_UP_NOTES if note in proc.stderr], proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == images
    for line in lines:
        if os.path.basename(line["file"]) in GOOD:
            assert set(line) == {"file", "class_name", "class_index", "probability"}
        else:
            assert set(line) == {"file", "error"}
    assert "4 of 7 images failed" in proc.stderr
    with Image.open(grid) as picture:
        assert picture.format == "PNG" and picture.width >= 300  # three panels of 3 inches at 100 dpi


def test_cli_exits_zero_when_every_image_predicts(test_export, images, capsys):
    good = [p for p in images if os.path.basename(p) in GOOD]
    assert predict.run(["--model", test_export, *good]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all("error" not in line for line in lines)


def test_files_that_are_not_regular_or_too_big_get_an_error_line_and_nothing_waits(test_export, images, tmp_path):
    """A FIFO would block the open until a writer came; a device or pipe reads as 'empty' through
    tf.io.gfile. Each gets its own line, and the good image is still predicted."""
    fifo, big = tmp_path / "fifo.png", tmp_path / "big.png"
    os.mkfifo(fifo)
    big.write_bytes(make_image_bytes((250, 10, 10), size=(400, 300)))
    red = next(p for p in images if p.endswith("red.png"))
    paths = [str(fifo), str(tmp_path), "/dev/null", red, str(big)]
    proc = subprocess.run([sys.executable, "-m", "trainer.predict", "--model", test_export, "--max_file_mb", "0.1",
                           *paths], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = {line["file"]: line for line in map(json.loads, proc.stdout.splitlines())}
    assert list(lines) == paths and proc.returncode == 1
    assert lines[str(fifo)]["error"] == "OSError: not a regular file (a FIFO or pipe)"
    assert lines[str(tmp_path)]["error"] == "OSError: not a regular file (a folder)"
    assert lines["/dev/null"]["error"] == "OSError: not a regular file (a character device)"
    assert "error" not in lines[red]
    assert (f"the file has {big.stat().st_size:,} bytes, over the limit of {int(0.1 * 2**20):,} (--max_file_mb 0.1 MB)"
            in lines[str(big)]["error"])


def test_results_come_as_each_call_returns_not_after_every_file_is_read(test_export, images, monkeypatch):
    model = load_exported_model(test_export)
    read = []
    real_read = predict.read_image_file
    monkeypatch.setattr(predict, "read_image_file", lambda path, *a: read.append(path) or real_read(path, *a))
    results = predict.predict_files(model, images, batch_size=1)
    first = next(results)
    assert first.file == images[0] and first.prediction is not None
    assert read == images[:1], "the first result waited for later files"
    assert [r.file for r in [first, *results]] == images
    assert read == images


def test_the_grid_titles_each_image_with_its_class_and_probability(test_export, images, tmp_path, monkeypatch):
    import matplotlib.axes

    titles = []
    real_set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, text, *a, **k: titles.append(text) or real_set_title(self, text, *a, **k))
    results = list(predict.predict_files(load_exported_model(test_export), images))
    predicted = [r for r in results if r.prediction is not None]
    assert predict.write_prediction_grid(results, str(tmp_path / "grid.png")) == len(predicted) == 3
    assert titles == [f"{r.prediction['class_name']} ({r.prediction['probability']:.2f})\n{os.path.basename(r.file)}"
                      for r in predicted]
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.format == "PNG"


def test_the_grid_keeps_every_title_inside_the_picture(tmp_path):
    # tight_layout put the titles of 2-5 square images on one row above the figure's top edge.
    square = make_image_bytes((10, 10, 240), "JPEG", size=(64, 64))
    for n in (1, 2, 5, 7):
        results = [predict.FilePrediction(f"{i}.jpg", square, {"class_name": "blue", "probability": 0.5})
                   for i in range(n)]
        predict.write_prediction_grid(results, str(tmp_path / "grid.png"))
        with Image.open(tmp_path / "grid.png") as picture:
            top_rows = np.asarray(picture.convert("L"))[:2]
        assert top_rows.min() == 255, f"{n} images: drawn pixels on the top edge (darkest {top_rows.min()}): a title is cut"


def test_a_grid_that_cannot_be_written_is_a_usage_error_before_any_prediction(test_export, images, tmp_path, capsys):
    for grid, problem in [(tmp_path / "no_such_folder" / "grid.png", "does not exist"), (tmp_path, "is a folder")]:
        with pytest.raises(SystemExit) as e:
            predict.run(["--model", test_export, "--grid", str(grid), *images])
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and problem in err


def test_a_dollar_sign_in_a_file_or_class_name_is_drawn_as_text(tmp_path):
    # matplotlib reads text between two '$' as a formula: 'a$_$b.jpg' failed the whole grid.
    square = make_image_bytes((10, 10, 240), "JPEG", size=(64, 64))
    results = [predict.FilePrediction("a$_$b.jpg", square, {"class_name": "$\\x$", "probability": 0.5})]
    assert predict.write_prediction_grid(results, str(tmp_path / "grid.png")) == 1


def test_a_grid_that_fails_to_write_is_not_counted_as_a_failed_image(test_export, images, tmp_path, capsys,
                                                                     monkeypatch):
    def disk_full(results, path):
        raise OSError("No space left on device")

    monkeypatch.setattr(predict, "write_prediction_grid", disk_full)
    good = [p for p in images if os.path.basename(p) in GOOD]
    assert predict.run(["--model", test_export, "--grid", str(tmp_path / "grid.png"), *good]) == 1
    err = capsys.readouterr().err
    assert "cannot write the grid" in err and "No space left on device" in err
    assert "images failed" not in err  # every image was predicted
