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
