"""Submits the trainer to Vertex AI Training: one job (`train`) or a tuning job (`tune`).

    python -m trainer.cloud train --strategy mirrored --machine n1-standard-8 \\
        --accelerator NVIDIA_TESLA_T4:2 --data gs://b/out --job_dir gs://b/runs/r1 \\
        --project P --region R [--dry_run] [trainer flags, e.g. --num_epochs 5]
    python -m trainer.cloud tune --search_space search.yaml --max_trials 50 --parallel_trials 2 ...

Both build the source distribution (setup.py sdist), build the spec through the SDK's types
(trainer.vertex_specs), and check it against the trainer's own argument parser. `--dry_run`
prints the spec as YAML and the equivalent `gcloud` command and submits nothing; otherwise the
sdist is uploaded to <job_dir>/package/ and the job is created with the aiplatform_v1 client.

Job folders: `train` passes --job_dir itself. `tune` passes none: Vertex AI sets AIP_MODEL_DIR
to <job_dir>/<trial id>/model for each trial, which the trainer reads, so trials never share a
folder (a shared one would make each trial resume from the previous trial's checkpoint).
"""
from __future__ import annotations

import argparse
import datetime
import email.parser
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from trainer import hypertune_report
from trainer.cloud import vertex_specs
from trainer.tuning.search_space import (SearchSpace, SearchSpaceError, check_against_trainer, join_flag_values,
                                  load_search_space)

REPO_ROOT = Path(__file__).resolve().parents[2]  # holds setup.py
DEFAULT_WORKERS = 2  # multi_worker's machines when --workers is not given


class CloudJobError(RuntimeError):
    """The job cannot be built or would fail on Vertex AI; the message names the flag or file."""


def make_arg_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--data", required=True, help="ETL output folder on gs://")
    common.add_argument("--job_dir", "--job-dir", dest="job_dir", required=True, help="run folder on gs://")
    common.add_argument("--project", required=True)
    common.add_argument("--region", default="us-central1")
    common.add_argument("--strategy", choices=vertex_specs.STRATEGIES, default="one_device")
    common.add_argument("--machine", default=None, help="machine type; default n1-standard-4 (CPU), n1-standard-8 (T4, V100, P100, P4), "
                        "the a2/g2/a3 type that holds the GPUs (A100, L4, H100)")
    common.add_argument("--accelerator", default=None, help="TYPE:COUNT per machine, e.g. NVIDIA_TESLA_T4:2, TPU_V3:8")
    common.add_argument("--workers", type=int, default=None,
                        help=f"machines in total, for multi_worker only (default {DEFAULT_WORKERS})")
    common.add_argument("--tf_version", default=None, help="of the prebuilt image; default: the newest there is")
    common.add_argument("--executor_image", default=None, help="your own training image instead of the prebuilt one")
    common.add_argument("--package_uri", default=None, help="an sdist already on gs:// (skips build and upload)")
    common.add_argument("--display_name", default=None)
    common.add_argument("--spec_file", default=None, help="also write the spec YAML here (for gcloud --config)")
    common.add_argument("--dry_run", action="store_true", help="print the spec and gcloud command; submit nothing")
    p = argparse.ArgumentParser(prog="python -m trainer.cloud", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", parents=[common], allow_abbrev=False, help="one CustomJob", epilog="Other flags go to the trainer.")
    tune = sub.add_parser("tune", parents=[common], allow_abbrev=False, help="a HyperparameterTuningJob",
                          epilog="Other flags go to every trial's trainer.")
    tune.add_argument("--search_space", default=None, help="YAML search space; default: the book's")
    tune.add_argument("--max_trials", type=int, default=None, help="default: the search space's")
    tune.add_argument("--parallel_trials", type=int, default=None, help="default: the search space's")
    tune.add_argument("--max_failed_trials", type=int, default=0, help="0 = Vertex's default")
    return p


def build_sdist(dist_dir: str, repo_root: Path = REPO_ROOT) -> Path:
    """`python setup.py sdist` into dist_dir; returns the .tar.gz (setuptools has no offline-free
    `python -m build` here: build isolation would download setuptools)."""
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


def make_trainer_args(ns: argparse.Namespace, trainer_flags: Sequence[str], tuning: bool, num_replicas: int = 1,
                      space: SearchSpace | None = None) -> list[str]:
    """The trainer's flags for every replica, checked by the trainer's own parser; every batch size
    the job can run (the fixed one, or each tuned value) must split evenly over num_replicas."""
    from trainer.config import parse_config

    for name in ("data", "job_dir"):
        if not getattr(ns, name).startswith("gs://"):
            raise CloudJobError(f"--{name} must be on gs:// (Vertex AI cannot read {getattr(ns, name)!r})")
    args = [f"--data={ns.data}", f"--strategy={ns.strategy}", *join_flag_values(trainer_flags)]
    if not tuning:
        args.insert(1, f"--job_dir={ns.job_dir}")
    saved = os.environ.get("AIP_MODEL_DIR")
    if tuning:  # what Vertex sets in each trial; the trainer's parser only requires --job_dir without it
        os.environ["AIP_MODEL_DIR"] = f"{ns.job_dir.rstrip('/')}/1/model"
    try:
        config = parse_config(args)
    except SystemExit:
        raise CloudJobError(f"the trainer rejects these flags (see above): {args}") from None
    finally:
        if tuning and saved is None:
            del os.environ["AIP_MODEL_DIR"]
        elif tuning:
            os.environ["AIP_MODEL_DIR"] = saved
    if ns.strategy == "multi_worker" and config.num_training_examples <= 0:
        raise CloudJobError("multi_worker needs virtual epochs: pass --num_training_examples N (the book: "
                            "workers read whole batches, so an epoch is a step count, not a pass over the files)")
    tuned = {p.name: p for p in space.parameters} if space else {}
    batch = tuned.get("batch_size")
    if batch is not None and not batch.values and num_replicas > 1:
        raise CloudJobError(f"batch_size is tuned over a range [{batch.min}, {batch.max}], but with {num_replicas} "
                            f"replicas it must be a multiple of {num_replicas}: list values (`type: discrete`)")
    sizes = [int(float(v)) for v in batch.values] if batch is not None else [config.batch_size]
    uneven = [b for b in sizes if b % num_replicas]
    if uneven:
        raise CloudJobError(f"batch size {uneven} does not split over the {num_replicas} replicas of strategy "
                            f"{ns.strategy} (the trainer refuses it on Vertex AI): use multiples of {num_replicas}")
    return args


def image_tf_version(ns: argparse.Namespace, hw: vertex_specs.Hardware) -> str:
    return ns.tf_version or vertex_specs.PREBUILT_TF_VERSIONS[hw.image_kind][-1]


def machine_count(ns: argparse.Namespace) -> int:
    """--workers, which only multi_worker takes: elsewhere a typed count would be dropped unseen."""
    if ns.workers is not None and ns.strategy != "multi_worker":
        raise CloudJobError(f"--workers {ns.workers} is for --strategy multi_worker; {ns.strategy} runs on one machine")
    return DEFAULT_WORKERS if ns.workers is None else ns.workers


def spec_file_name(ns: argparse.Namespace) -> str:
    """The file the gcloud command's --config names: --spec_file, or a default the user saves the spec to."""
    return ns.spec_file or ("hptuning_job.yaml" if ns.command == "tune" else "custom_job.yaml")


def build_job(ns: argparse.Namespace, trainer_flags: Sequence[str], package_uri: str):
    """(the message to submit, the message to print as the gcloud config, the gcloud command, the hardware)."""
    hw = vertex_specs.make_hardware(ns.strategy, ns.machine, ns.accelerator, machine_count(ns))
    image = ns.executor_image or vertex_specs.prebuilt_training_image(hw.image_kind, image_tf_version(ns, hw), ns.region)
    tuning = ns.command == "tune"
    space = load_search_space(ns.search_space) if tuning else None
    if space is not None:
        if space.metric != hypertune_report.METRIC_TAG:  # no trial would report it, so none would have a result
            raise CloudJobError(f"metric {space.metric!r}: the trainer reports only {hypertune_report.METRIC_TAG!r} "
                                f"(validation accuracy) to Vertex AI; set `metric: {hypertune_report.METRIC_TAG}`")
        check_against_trainer(space, trainer_flags)
    args = make_trainer_args(ns, trainer_flags, tuning, hw.num_replicas, space)
    display_name = ns.display_name or "imagepipe-{}-{}-{}".format(
        ns.command, ns.strategy.replace("_", "-"), datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    spec = vertex_specs.build_custom_job_spec(hw, image, package_uri, args, ns.job_dir)
    config_file = spec_file_name(ns)
    where = f"--project={shlex.quote(ns.project)} --region={shlex.quote(ns.region)}"
    if not tuning:
        job = vertex_specs.aip.CustomJob(display_name=display_name, job_spec=spec)
        command = (f"gcloud ai custom-jobs create {where} --display-name={shlex.quote(display_name)} "
                   f"--config={shlex.quote(config_file)}")
        return job, spec, command, hw
    max_trials = ns.max_trials if ns.max_trials is not None else space.max_trials
    parallel = ns.parallel_trials if ns.parallel_trials is not None else space.parallel_trials
    if max_trials <= 0 or parallel <= 0 or ns.max_failed_trials < 0:
        raise CloudJobError(f"--max_trials and --parallel_trials must be positive and --max_failed_trials >= 0, "
                            f"got {max_trials}, {parallel}, {ns.max_failed_trials}")
    job = vertex_specs.build_tuning_job(display_name, space, spec, max_trials, parallel, ns.max_failed_trials)
    command = (f"gcloud ai hp-tuning-jobs create {where} --display-name={shlex.quote(display_name)} "
               f"--max-trial-count={job.max_trial_count} --parallel-trial-count={job.parallel_trial_count} "
               f"--config={shlex.quote(config_file)}")
    return job, job, command, hw


def upload_to_gcs(local: Path, uri: str) -> None:
    from google.cloud import storage

    bucket, _, blob = uri[len("gs://"):].partition("/")
    storage.Client().bucket(bucket).blob(blob).upload_from_filename(str(local))


def submit_job(job, project: str, region: str, client=None) -> str:
    """Creates the job with the aiplatform_v1 JobServiceClient; returns its resource name."""
    aip = vertex_specs.aip
    if client is None:
        client = aip.JobServiceClient(client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
    parent = f"projects/{project}/locations/{region}"
    if isinstance(job, aip.CustomJob):
        return client.create_custom_job(parent=parent, custom_job=job).name
    return client.create_hyperparameter_tuning_job(parent=parent, hyperparameter_tuning_job=job).name


def run(argv: Sequence[str] | None = None, out=sys.stdout, client=None) -> str | None:
    """Builds (and unless --dry_run, submits) the job; returns the job's resource name or None."""
    ns, trainer_flags = make_arg_parser().parse_known_args(argv)
    with tempfile.TemporaryDirectory() as dist_dir:
        problems = []
        if ns.package_uri:
            sdist, package_uri = None, ns.package_uri
        else:
            sdist = build_sdist(dist_dir)
            package_uri = f"{ns.job_dir.rstrip('/')}/package/{sdist.name}"
        try:
            job, printed, command, hw = build_job(ns, trainer_flags, package_uri)
        except (vertex_specs.SpecError, SearchSpaceError) as e:
            raise CloudJobError(str(e)) from e
        if sdist is not None and not ns.executor_image:
            problems = image_compatibility_problems(*read_sdist_requirements(sdist),
                                                    vertex_specs.PREBUILT_IMAGE_PYTHON, image_tf_version(ns, hw))
        text = vertex_specs.spec_to_yaml(printed)
        if ns.spec_file:
            Path(ns.spec_file).write_text(text)
        for problem in problems:
            print(f"WARNING: this job would fail on Vertex AI: {problem}. Pass --executor_image with an "
                  f"image that matches, or align setup.py with the image.", file=sys.stderr)
        if ns.dry_run:
            kind = "CustomJobSpec" if ns.command == "train" else "HyperparameterTuningJob"
            saved = "" if ns.spec_file else \
                f"; --config names {spec_file_name(ns)}: save the spec above there, or pass --spec_file"
            out.write(f"# {kind} (dry run: nothing submitted)\n{text}\n# Equivalent gcloud command "
                      f"(after uploading the sdist to {package_uri}{saved}):\n{command}\n")
            return None
        if problems:
            raise CloudJobError("refusing to submit: " + "; ".join(problems))
        if sdist is not None:
            upload_to_gcs(sdist, package_uri)
        name = submit_job(job, ns.project, ns.region, client)
        out.write(f"submitted {name}\n")
        return name


def main() -> None:
    try:
        run()
    except CloudJobError as e:
        print(f"trainer.cloud: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
