"""`--python_package`: the sdist on one of Google's prebuilt training images (a PythonPackageSpec).

Vertex AI pip-installs the package on the prebuilt image before running it, and accepts only its own
images there. That works only when the image's Python and TensorFlow satisfy setup.py; otherwise
pip refuses the package, or replaces the TensorFlow built for the image's accelerators. So the sdist
is built here (`setup.py sdist`), its Requires-Python and TensorFlow pin are checked against the
image, and the job is refused with the reasons when they do not fit (today they do not: the
prebuilt images stop at Python 3.10 and TF 2.17). Our own image (a ContainerSpec) is the default.
"""
from __future__ import annotations

import argparse
import email.parser
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from trainer.cloud import vertex_specs

REPO_ROOT = Path(__file__).resolve().parents[2]  # holds setup.py


class CloudJobError(RuntimeError):
    """The job cannot be built or would fail on Vertex AI; the message names the flag or file."""


def build_sdist(dist_dir: str, repo_root: Path | None = None) -> Path:
    """`python setup.py sdist` of repo_root (default: this checkout) into dist_dir; returns the .tar.gz
    (setuptools has no offline-free `python -m build` here: build isolation would download setuptools)."""
    repo_root = repo_root or REPO_ROOT
    if not (repo_root / "setup.py").exists():
        raise CloudJobError(f"no setup.py in {repo_root}; pass --package_uri gs://.../imagepipe-X.tar.gz")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", dist_dir],
                          cwd=repo_root, capture_output=True, text=True)
    tarballs = sorted(Path(dist_dir).glob("*.tar.gz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        raise CloudJobError(f"setup.py sdist failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return tarballs[0]


def read_sdist_requirements(sdist: Path) -> tuple[str, list[str]]:
    """(Requires-Python, install requirements) from the sdist's PKG-INFO and egg-info."""
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        info = email.parser.Parser().parsestr(tar.extractfile(f"{top}/PKG-INFO").read().decode())
        req_name = next((n for n in names if n.endswith(".egg-info/requires.txt")), None)
        lines = tar.extractfile(req_name).read().decode().splitlines() if req_name else []
    requires = []
    for line in lines:
        if line.startswith("["):  # extras follow; the base requirements come first
            break
        if line.strip():
            requires.append(line.strip())
    return info.get("Requires-Python", ""), requires


def image_compatibility_problems(requires_python: str, requires: Sequence[str], image_python: str,
                                 image_tf: str) -> list[str]:
    """Why pip-installing the package on the prebuilt image would fail or replace its TensorFlow."""
    problems = []
    if requires_python and image_python not in SpecifierSet(requires_python):
        problems.append(f"the package needs Python {requires_python} but the prebuilt image runs Python "
                        f"{image_python}: pip refuses to install it there")
    for text in requires:
        req = Requirement(text)
        if req.name == "tensorflow" and req.specifier and f"{image_tf}.0" not in req.specifier:
            problems.append(f"the package needs {text} but the image has TensorFlow {image_tf}: pip would "
                            f"replace the TensorFlow built for that image's accelerators")
    return problems


def image_tf_version(ns: argparse.Namespace, hw: vertex_specs.Hardware) -> str:
    return ns.tf_version or vertex_specs.PREBUILT_TF_VERSIONS[hw.image_kind][-1]


def upload_to_gcs(local: Path, uri: str) -> None:
    from google.cloud import storage

    bucket, _, blob = uri[len("gs://"):].partition("/")
    storage.Client().bucket(bucket).blob(blob).upload_from_filename(str(local))


class PythonPackage:
    """With --python_package: the sdist built from this checkout, its gs:// address (`uri`), the
    check that it installs on the prebuilt image, and its upload. Without: `uri` is None."""

    def __init__(self, ns: argparse.Namespace, repo_root: Path | None = None):
        self.ns, self.repo_root = ns, repo_root
        self.sdist: Path | None = None
        self.uri: str | None = None
        self._dist_dir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "PythonPackage":
        if self.ns.python_package:
            self._dist_dir = tempfile.TemporaryDirectory()
            self.sdist = build_sdist(self._dist_dir.name, self.repo_root)
            self.uri = self.ns.package_uri or f"{self.ns.job_dir.rstrip('/')}/package/{self.sdist.name}"
        return self

    def __exit__(self, *exc) -> None:
        if self._dist_dir is not None:
            self._dist_dir.cleanup()

    def check_installs_on_image(self, hw: vertex_specs.Hardware) -> None:
        if self.sdist is None:
            return
        problems = image_compatibility_problems(*read_sdist_requirements(self.sdist),
                                                vertex_specs.PREBUILT_IMAGE_PYTHON, image_tf_version(self.ns, hw))
        if problems:
            raise CloudJobError("refusing a PythonPackageSpec: " + "; ".join(problems) +
                                ". Drop --python_package to run our training image (a custom container)")

    def upload(self) -> None:
        if self.sdist is not None and not self.ns.package_uri:
            upload_to_gcs(self.sdist, self.uri)
