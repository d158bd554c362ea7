"""The project's container images: what each holds, where `make push` puts it, how Cloud Build makes it.

  train             python -m trainer.train, the training extra (CPU)         containers/train.Dockerfile
  train-gpu         the same on a CUDA base with tensorflow[and-cuda]          (--build-arg VARIANT=gpu)
  serve             python -m trainer.serve, the serving extra (Vertex AI's custom-container contract)
  dataflow-worker   Beam's Python SDK image + the ETL's extra, for --sdk_container_image

`image_uri` is the one place an image's address is made: `make image`/`make push` ask it
(`python -m trainer.cloud.images uri --kind train --project P --region R`), and `trainer.cloud
train|tune|deploy` default to the same address, so a job runs what `make push` pushed.
`python -m trainer.cloud build --project P --region R [--dry_run]` builds all four with Cloud Build
(no local Docker needed); the dry run prints the build config and the `gcloud builds submit` command.

Imports nothing heavy: the Makefile calls it for every image target.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "imagepipe"  # setup.py's name: its version tags the images
DEFAULT_REPOSITORY = "imagepipe"  # the Artifact Registry repository (`gcloud artifacts repositories create`)
TRAINER_COMMAND = ("python", "-m", "trainer.train")  # the training image's ENTRYPOINT and the jobs' command
SERVER_COMMAND = ("python", "-m", "trainer.serve")  # the serving image's ENTRYPOINT
SERVING_PORT = 8080  # Vertex AI's default AIP_HTTP_PORT; the serving image EXPOSEs it
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")  # us-central1, europe-west4


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    name: str  # the image's name in the repository
    dockerfile: str  # relative to the repository root, which is the build context
    extra: str  # the setup.py extra the image installs
    build_args: tuple[tuple[str, str], ...] = ()


IMAGES = {
    "train": ImageSpec("imagepipe-train", "containers/train.Dockerfile", "training"),
    "train-gpu": ImageSpec("imagepipe-train-gpu", "containers/train.Dockerfile", "training", (("VARIANT", "gpu"),)),
    "serve": ImageSpec("imagepipe-serve", "containers/serve.Dockerfile", "serving"),
    "dataflow-worker": ImageSpec("imagepipe-dataflow-worker", "containers/dataflow_worker.Dockerfile", "etl"),
}
# The training image for a job's accelerator kind (trainer.cloud.vertex_specs.Hardware.image_kind).
TRAINING_IMAGE_FOR = {"cpu": "train", "gpu": "train-gpu"}
# Vertex AI's TPU VMs need TensorFlow built for TPUs (the tensorflow-tpu wheel with libtpu), which
# had no 2.21 release on PyPI (newest 2.20) when this was written; setup.py needs TF 2.21.
TPU_IMAGE_PROBLEM = ("strategy tpu needs an image with tensorflow-tpu matching this package's TensorFlow "
                     "(setup.py), and PyPI had none for 2.21: build one and pass --image_uri")


class ImageError(ValueError):
    """An image address cannot be made from the given values; the message names the flag."""


def package_version() -> str:
    """The installed package's version (setup.py's), which tags every image."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ImageError(f"{PACKAGE} is not installed (`pip install -e .`), so no image tag; pass --tag") from None


def installed_beam_version() -> str:
    """The launcher's Beam: Dataflow needs the workers' SDK image at exactly this version."""
    return importlib.metadata.version("apache-beam")


def image_uri(kind: str, project: str | None = None, region: str | None = None,
              repository: str = DEFAULT_REPOSITORY, tag: str | None = None) -> str:
    """`REGION-docker.pkg.dev/PROJECT/REPOSITORY/imagepipe-KIND:TAG` (Artifact Registry), or the local
    name `imagepipe-KIND:TAG` when no project is given; TAG defaults to the package version."""
    if kind not in IMAGES:
        raise ImageError(f"image kind {kind!r}: expected one of {sorted(IMAGES)}")
    tag = tag or package_version()
    local = f"{IMAGES[kind].name}:{tag}"
    if not project:
        return local
    problems = []
    if not region or not _REGION.match(region):
        problems.append(f"--region {region!r} is not a region such as us-central1")
    if "/" in project or project != project.strip():
        problems.append(f"--project {project!r} is not a project id")
    if not re.match(r"^[a-z][-a-z0-9_.]*$", repository):
        problems.append(f"--repository {repository!r} is not an Artifact Registry repository name")
    if problems:
        raise ImageError("; ".join(problems))
    return f"{region}-docker.pkg.dev/{project.replace(':', '/')}/{repository}/{local}"


def docker_build_args(kind: str) -> list[str]:
    """`docker build` arguments (without -t and the context) for one image."""
    spec = IMAGES[kind]
    args = ["-f", spec.dockerfile]
    for name, value in spec.build_args:
        args += ["--build-arg", f"{name}={value}"]
    if kind == "dataflow-worker":
        args += ["--build-arg", f"BEAM_VERSION={installed_beam_version()}"]
    return args


def cloud_build_config(uris: dict[str, str]) -> dict:
    """A Cloud Build config that builds every image and pushes it to its address."""
    steps = [{"id": kind, "name": "gcr.io/cloud-builders/docker", "waitFor": ["-"],
              "args": ["build", *docker_build_args(kind), "-t", uris[kind], "."]} for kind in IMAGES]
    # waitFor "-": the four builds are independent and run at once. BuildKit builds only the stages
    # a VARIANT needs (the classic builder would build the CUDA stage for the CPU image too).
    return {"steps": steps, "images": [uris[kind] for kind in IMAGES],
            "options": {"env": ["DOCKER_BUILDKIT=1"], "machineType": "E2_HIGHCPU_8"}, "timeout": "3600s"}


def cloud_build_command(project: str, region: str, config_file: str) -> str:
    return (f"gcloud builds submit --project={shlex.quote(project)} --region={shlex.quote(region)} "
            f"--config={shlex.quote(config_file)} {shlex.quote(str(REPO_ROOT))}")


def add_build_parser(sub) -> None:
    p = sub.add_parser("build", help="build and push every image with Cloud Build", allow_abbrev=False,
                       description="Builds the training (CPU and GPU), serving and Dataflow worker images with "
                                   "Cloud Build and pushes them where `make push` would.")
    p.add_argument("--project", required=True)
    p.add_argument("--region", default="us-central1")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY, help="Artifact Registry repository (docker format)")
    p.add_argument("--tag", default=None, help="default: the package version")
    p.add_argument("--config_file", default="cloudbuild.yaml", help="where the build config is written")
    p.add_argument("--dry_run", action="store_true", help="print the config and the gcloud command; build nothing")


def run_build(ns: argparse.Namespace, out=sys.stdout) -> int:
    uris = {kind: image_uri(kind, ns.project, ns.region, ns.repository, ns.tag) for kind in IMAGES}
    text = yaml.safe_dump(cloud_build_config(uris), sort_keys=False)
    command = cloud_build_command(ns.project, ns.region, ns.config_file)
    Path(ns.config_file).write_text(text)
    out.write(f"# Cloud Build config (written to {ns.config_file})\n{text}\n")
    if ns.dry_run:
        out.write(f"# Equivalent command (dry run: nothing built):\n{command}\n")
        return 0
    out.write(f"{command}\n")
    out.flush()
    try:
        return subprocess.run(shlex.split(command)).returncode
    except FileNotFoundError:
        raise ImageError("gcloud is not installed: install the Google Cloud CLI, or run `make push` "
                         "with a local Docker") from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m trainer.cloud.images uri --kind K [--project P --region R --repository N --tag T]`."""
    p = argparse.ArgumentParser(prog="python -m trainer.cloud.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    uri = sub.add_parser("uri", help="print an image's address", allow_abbrev=False)
    uri.add_argument("--kind", choices=sorted(IMAGES), required=True)
    uri.add_argument("--project", default="")
    uri.add_argument("--region", default="")
    uri.add_argument("--repository", default=DEFAULT_REPOSITORY)
    uri.add_argument("--tag", default="")
    sub.add_parser("build-args", help="print an image's docker build arguments", allow_abbrev=False).add_argument(
        "--kind", choices=sorted(IMAGES), required=True)
    ns = p.parse_args(argv)
    try:
        if ns.command == "uri":
            print(image_uri(ns.kind, ns.project or None, ns.region or None, ns.repository, ns.tag or None))
        else:
            print(shlex.join(docker_build_args(ns.kind)))
    except ImageError as e:
        print(f"trainer.cloud.images: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
