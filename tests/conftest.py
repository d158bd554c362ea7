"""Fixtures that make their own tiny data: generated images, CSVs, a small embedding module."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tests import image_factory  # noqa: E402


@pytest.fixture(scope="session")
def embedding_module_dir(tmp_path_factory) -> str:
    """A TF Hub-style feature-vector module: MobileNetV2's architecture, random weights, 32x32 input."""
    return image_factory.build_embedding_module(str(tmp_path_factory.mktemp("module") / "mobilenet_v2_32"))


@pytest.fixture()
def class_folder_dataset(tmp_path) -> str:
    """tmp/images/<class>/<n>.jpg for 3 classes x 8 images, plus a README and dict.txt beside them."""
    root = tmp_path / "images"
    image_factory.write_class_folders(str(root), classes=("cat", "dog", "owl"), per_class=8)
    (root / "README.md").write_text("not an image")
    (root / "dict.txt").write_text("cat\ndog\nowl\n")
    return str(root)


@pytest.fixture(scope="session")
def digits_pixels_dir(tmp_path_factory) -> str:
    """The digits sample's first 1,000 images (etl.sample) as the pixels form at 32 px, written through the
    shared schema (tests/trainer_fixtures.py, no Beam): 600 train in 2 shards, 200 valid in 2, 200 test in 1."""
    import csv

    from etl.sample import write_digits_sample
    from tests import trainer_fixtures as fx

    root = tmp_path_factory.mktemp("digits_pixels")
    csv_path = write_digits_sample(str(root / "digits"), limit=1000)
    items = [(str(root / "digits" / path), int(label)) for path, label in csv.reader(open(csv_path))]
    out = str(root / "pixels")
    fx.write_dataset(out, items, "pixels", class_names=tuple(str(d) for d in range(10)),
                     shards_per_split={"train": 2, "valid": 2, "test": 1})
    return out
