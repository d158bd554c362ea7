"""The images (containers/*.Dockerfile) agree with setup.py and the installed launcher, their entry
points run here, and `make image|push` and the Cloud Build dry run build and push every image.
No Docker engine runs here: the Dockerfiles are read, and their commands run in this venv."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.test_packaging import _setup_py
from trainer.cloud import cli, images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def read_dockerfile(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in open(os.path.join(REPO, path)).read().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        name, _, args = current.strip().partition(" ")
        instructions.append((name.upper(), args.strip()))
        current = ""
    return instructions


def stages(path: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions by build stage ('' for the final, unnamed one), plus the global ARGs under 'global'."""
    out, name = {"global": []}, "global"
    for instruction, args in read_dockerfile(path):
        if instruction == "FROM":
            name = args.split(" AS ")[1].strip() if " AS " in args else ""
            out[name] = []
        out[name].append((instruction, args))
    return out


def exec_form(path: str, instruction: str) -> list[str] | None:
    found = [json.loads(args) for name, args in read_dockerfile(path) if name == instruction]
    return found[-1] if found else None


def pip_installs(instructions) -> list[str]:
    """The requirement arguments of every `pip install` in these RUN instructions."""
    found = []
    for name, args in instructions:
        if name == "RUN":
            for command in args.split("&&"):
                words = shlex.split(command)
                if "pip" in " ".join(words[:1]) and words[1:2] == ["install"]:
                    found += [w for w in words[2:] if not w.startswith("-") and not w.startswith("/tmp/")]
    return found


def setup_requirement(name: str) -> Requirement:
    base, _ = _setup_py()
    return next(Requirement(r) for r in base if Requirement(r).name == name)


@pytest.mark.parametrize("kind", sorted(images.IMAGES))
def test_each_image_installs_its_roles_extra_from_setup_py(kind):
    spec = images.IMAGES[kind]
    _, extras = _setup_py()
    assert spec.extra in extras
    final = stages(spec.dockerfile)[""]
    assert pip_installs(final) == [f".[{spec.extra}]"]
    copied = {args.split()[0] for name, args in final if name == "COPY"}
    packages = {"dataflow-worker": {"setup.py", "shared", "etl"}}.get(kind, {"setup.py", "shared", "trainer"})
    assert copied == packages  # the packages the role imports (tests/test_packaging.py), no others


def test_every_image_runs_the_launchers_python_which_setup_py_allows():
    base_images = {kind: [args for name, args in read_dockerfile(spec.dockerfile) if name == "FROM"]
                   for kind, spec in images.IMAGES.items()}
    assert base_images["train"][0].startswith(f"python:{VENV_PYTHON}-slim")
    assert base_images["serve"] == [f"python:{VENV_PYTHON}-slim-bookworm"]
    assert base_images["dataflow-worker"] == [f"apache/beam_python{VENV_PYTHON}_sdk:${{BEAM_VERSION}}"]
    gpu = stages(images.IMAGES["train-gpu"].dockerfile)["base-gpu"]
    assert f"python{VENV_PYTHON} python{VENV_PYTHON}-venv" in " ".join(args for _, args in gpu)
    python_requires = re.search(r'python_requires="([^"]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)
    assert f"{VENV_PYTHON}.0" in SpecifierSet(python_requires)


def test_the_worker_image_is_beams_sdk_image_at_the_installed_beam_and_keeps_its_entrypoint():
    spec = images.IMAGES["dataflow-worker"]
    [default] = [args for name, args in stages(spec.dockerfile)["global"] if name == "ARG"]
    assert default == f"BEAM_VERSION={images.installed_beam_version()}"
    assert f"--build-arg BEAM_VERSION={images.installed_beam_version()}" in shlex.join(images.docker_build_args(
        "dataflow-worker"))
    # Dataflow starts workers through the SDK image's /opt/apache/beam/boot
    assert exec_form(spec.dockerfile, "ENTRYPOINT") is None and exec_form(spec.dockerfile, "CMD") is None
    assert 'echo "apache-beam==${BEAM_VERSION}"' in " ".join(args for _, args in read_dockerfile(spec.dockerfile))


def test_the_gpu_variant_installs_tensorflow_for_cuda_at_setup_pys_version():
    path = images.IMAGES["train-gpu"].dockerfile
    assert dict(images.IMAGES["train-gpu"].build_args) == {"VARIANT": "gpu"} and not images.IMAGES["train"].build_args
    by_stage = stages(path)
    assert ("ARG", "VARIANT=cpu") in by_stage["global"] and ("FROM", "base-${VARIANT}") in by_stage[""]
    assert by_stage["base-gpu"][0][1].startswith("nvidia/cuda:12.") and by_stage["base-gpu"][0][1].endswith(" AS base-gpu")
    [tensorflow] = pip_installs(by_stage["base-gpu"])
    req, wanted = Requirement(tensorflow), setup_requirement("tensorflow")
    assert (req.name, req.extras, req.specifier) == ("tensorflow", {"and-cuda"}, wanted.specifier)
    assert pip_installs(by_stage["base-cpu"]) == []  # the CPU image gets TensorFlow from setup.py itself


def test_the_entrypoints_are_the_commands_the_specs_name_and_the_port_vertex_uses():
    """The commands themselves run here in the venv: the training one in tests/test_cloud_local_run.py
    (a multi-worker job's replicas run the spec's command), the serving one in tests/test_cloud_deploy.py
    (started with Vertex AI's AIP_* variables, it serves the deployed copy)."""
    assert exec_form(images.IMAGES["train"].dockerfile, "ENTRYPOINT") == list(images.TRAINER_COMMAND)
    assert exec_form(images.IMAGES["serve"].dockerfile, "ENTRYPOINT") == list(images.SERVER_COMMAND)
    assert ("EXPOSE", str(images.SERVING_PORT)) in read_dockerfile(images.IMAGES["serve"].dockerfile)


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(*args: str, dry: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *(["-n"] if dry else []), "--no-print-directory", *args, f"PY={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@needs_make
def test_make_image_and_push_build_and_push_every_image_at_the_jobs_addresses():
    done = make("push", "PROJECT=my-project", "REGION=europe-west4", "IMAGE_REPO=team")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for kind in images.IMAGES:
        uri = images.image_uri(kind, "my-project", "europe-west4", "team")
        assert f"docker build {shlex.join(images.docker_build_args(kind))} -t {uri} ." in lines
        assert f"docker push {uri}" in lines
    local = make("image").stdout.splitlines()
    assert f"docker build {shlex.join(images.docker_build_args('serve'))} -t imagepipe-serve:" \
           f"{images.package_version()} ." in local
    refused = make("push", dry=False)  # stops at its first prerequisite: nothing is built or pushed
    assert refused.returncode != 0 and "make push needs PROJECT and REGION" in refused.stdout


def test_the_cloud_build_dry_run_prints_a_config_that_builds_and_pushes_every_image(tmp_path):
    config = tmp_path / "cloudbuild.yaml"
    out = io.StringIO()
    assert cli.run(["build", "--project", "my-project", "--region", "us-central1", "--config_file", str(config),
                    "--dry_run"], out=out) == 0
    printed, _, command = out.getvalue().partition("# Equivalent command (dry run: nothing built):\n")
    build = yaml.safe_load(config.read_text())
    assert yaml.safe_load(printed.split("\n", 1)[1]) == build
    uris = [images.image_uri(kind, "my-project", "us-central1") for kind in images.IMAGES]
    assert build["images"] == uris
    assert [step["args"] for step in build["steps"]] == [
        ["build", *images.docker_build_args(kind), "-t", uri, "."] for kind, uri in zip(images.IMAGES, uris)]
    assert command.strip() == (f"gcloud builds submit --project=my-project --region=us-central1 "
                               f"--config={config} {REPO}")


@pytest.mark.parametrize("argv, message", [
    (["--kind", "train", "--project", "p", "--region", "us central"], "--region 'us central'"),
    (["--kind", "train", "--project", "p", "--region", "us-central1", "--repository", "Bad Name"], "--repository"),
])
def test_an_address_from_bad_values_is_an_error_that_names_the_flag(argv, message, capsys):
    assert images.main(["uri", *argv]) == 2
    assert message in capsys.readouterr().err
