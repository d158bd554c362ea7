"""Untrusted bytes never reach Ghostscript: PIL reads only image_check.ALLOWED_FORMATS, so EPS, PS
and PDF sent to the server, given to the ETL or to `trainer.predict` are refused as not images,
and a stand-in `gs` on PATH (which PIL would run to read EPS or PS) never runs."""
from __future__ import annotations

import ast
import base64
import io
import os
import pathlib

import pytest
from PIL import EpsImagePlugin, Image

from shared import image_check
from tests.serving_fixtures import test_export  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parent.parent


def postscript(eps: bool) -> bytes:
    header = b"%!PS-Adobe-3.0 EPSF-3.0\n" if eps else b"%!PS-Adobe-3.0\n"
    return header + (b"%%BoundingBox: 0 0 16 16\n%%EndComments\n"
                     b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def pdf() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format="PDF")
    return out.getvalue()


DOCUMENTS = {"eps": lambda: postscript(eps=True), "ps": lambda: postscript(eps=False), "pdf": pdf}


@pytest.fixture
def stand_in_gs(tmp_path, monkeypatch) -> pathlib.Path:
    """A `gs` first on PATH that only leaves a marker file; returns the marker's path."""
    folder, marker = tmp_path / "bin", tmp_path / "gs_ran"
    folder.mkdir()
    (folder / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\nexit 1\n")
    (folder / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL looks for gs once, then remembers
    return marker


def test_pil_without_an_allow_list_would_run_the_stand_in(stand_in_gs):
    """The control: the stand-in is found and run, so its absence below means nothing called it."""
    for name in ("eps", "ps"):
        with pytest.raises(Exception):
            Image.open(io.BytesIO(DOCUMENTS[name]())).load()
        assert stand_in_gs.exists(), name
        stand_in_gs.unlink()


def test_the_server_refuses_documents_without_running_ghostscript(test_export, stand_in_gs):
    from starlette.testclient import TestClient

    from trainer.serving.app import make_app

    with TestClient(make_app(test_export, "model")) as client:
        for name, make in DOCUMENTS.items():
            body = {"instances": [{"b64": base64.b64encode(make()).decode()}]}
            r = client.post("/v1/models/model:predict", json=body)
            assert r.status_code == 400, (name, r.text)
            assert "instance 0: not a readable image" in r.json()["error"], name
    assert not stand_in_gs.exists(), stand_in_gs.read_text()


@pytest.mark.parametrize("form", ["jpeg", "pixels"])
def test_the_etl_rejects_documents_as_not_images_without_running_ghostscript(tmp_path, stand_in_gs, form):
    from apache_beam.pvalue import TaggedOutput

    from etl import records
    from etl.inputs import Row

    load = records.LoadImage(form, (1, 0, 0), max_pixels=10**6, max_bytes=10**6, jpeg_quality=95)
    for name, make in DOCUMENTS.items():
        path = tmp_path / f"document.{name}"
        path.write_bytes(make())
        [out] = load.process(Row(str(path), "a", ""), {"a": 0})
        assert isinstance(out, TaggedOutput) and out.value["reason"] == "not_an_image", (name, out)
        assert ", ".join(image_check.ALLOWED_FORMATS) in out.value["detail"]
    assert not stand_in_gs.exists(), stand_in_gs.read_text()


def test_predict_refuses_documents_without_running_ghostscript(tmp_path, stand_in_gs):
    from trainer.serving.predict import read_image_file

    for name, make in DOCUMENTS.items():
        path = tmp_path / f"document.{name}"
        path.write_bytes(make())
        with pytest.raises(image_check.ImageRejected) as e:
            read_image_file(str(path))
        assert e.value.reason == "not_an_image", name
    assert not stand_in_gs.exists(), stand_in_gs.read_text()


def test_a_readable_format_outside_the_allow_list_is_not_an_image():
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PPM")  # PIL reads it; the project does not
    with pytest.raises(image_check.ImageRejected) as e:
        image_check.read_header(out.getvalue())
    assert e.value.reason == "not_an_image" and "the formats read: JPEG, PNG, BMP, GIF, WEBP, TIFF" in e.value.detail


def test_every_pil_open_in_the_project_passes_an_allow_list():
    """`Image.open(...)` without `formats=` anywhere outside tests would read any format PIL knows."""
    unguarded = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.relative_to(ROOT).parts[0] in ("tests", ".venv", "build") or ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "open"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "Image"
                    and "formats" not in {k.arg for k in node.keywords}):
                unguarded.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unguarded
