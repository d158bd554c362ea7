"""`python -m trainer.cloud train|tune`: the trainer as a Vertex AI CustomJob or HyperparameterTuningJob.

    python -m trainer.cloud train --strategy mirrored --accelerator NVIDIA_TESLA_T4:2 \\
        --data gs://b/out --job_dir gs://b/runs/r1 --project P [--region R] [--dry_run | --local_run] \\
        [trainer flags, e.g. --num_epochs 5]
    python -m trainer.cloud tune --search_space search.yaml --max_trials 50 --parallel_trials 2 ...

Each worker pool runs our training image (containers/train.Dockerfile) as a custom container: the
image `make push` pushed for the project and region (trainer.cloud.images; --image_uri for another),
the trainer's command, and its flags checked by the trainer's own parser. `--python_package` runs
the package on one of Google's prebuilt images instead, and is refused when its Python or TensorFlow
cannot install the package. `--dry_run` prints the spec (YAML) and the equivalent `gcloud` command;
`--local_run` runs the same spec here, one process per replica with Vertex AI's environment
(trainer.cloud.local_run, local_tune), and accepts local --data and --job_dir.

Job folders: `train` passes --job_dir itself. `tune` passes none: Vertex AI sets AIP_MODEL_DIR to
<job_dir>/<trial id>/model for each trial, which the trainer reads, so trials never share a folder
(a shared one would make each trial resume from the previous trial's checkpoint).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from shared.paths import is_remote
from trainer import hypertune_report, run_folder
from trainer.cloud import images, local_run, local_tune, package_spec, vertex_specs
from trainer.tuning.search_space import (SearchSpace, SearchSpaceError, check_against_trainer, join_flag_values,
                                         load_search_space)

DEFAULT_WORKERS = 2  # multi_worker's machines when --workers is not given
CloudJobError = package_spec.CloudJobError


def add_job_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--data", required=True, help="ETL output folder on gs:// (local too, with --local_run)")
    common.add_argument("--job_dir", "--job-dir", dest="job_dir", required=True,
                        help="run folder on gs:// (local too, with --local_run)")
    common.add_argument("--project", required=True)
    common.add_argument("--region", default="us-central1")
    common.add_argument("--strategy", choices=vertex_specs.STRATEGIES, default="one_device")
    common.add_argument("--machine", default=None, help="machine type; default n1-standard-4 (CPU), n1-standard-8 (T4, "
                        "V100, P100, P4), the a2/g2/a3 type that holds the GPUs (A100, L4, H100)")
    common.add_argument("--accelerator", default=None, help="TYPE:COUNT per machine, e.g. NVIDIA_TESLA_T4:2, TPU_V3:8")
    common.add_argument("--workers", type=int, default=None,
                        help=f"machines in total, for multi_worker only (default {DEFAULT_WORKERS})")
    common.add_argument("--image_uri", default=None, help="the training image; default: what `make push` pushed "
                        "for --project and --region (the GPU variant when there are GPUs)")
    common.add_argument("--repository", default=images.DEFAULT_REPOSITORY, help="Artifact Registry repository")
    common.add_argument("--python_package", action="store_true",
                        help="run the sdist on Google's prebuilt image (PythonPackageSpec) instead of our image")
    common.add_argument("--tf_version", default=None, help="of the prebuilt image; default: the newest there is")
    common.add_argument("--package_uri", default=None, help="with --python_package: the sdist already on gs:// "
                        "(the local one is still built, to check it installs on the image)")
    common.add_argument("--executor_image", default=None, help=argparse.SUPPRESS)  # gone: named in its error
    common.add_argument("--display_name", default=None)
    common.add_argument("--spec_file", default=None, help="also write the spec YAML here (for gcloud --config)")
    common.add_argument("--dry_run", action="store_true", help="print the spec and gcloud command; submit nothing")
    common.add_argument("--local_run", action="store_true",
                        help="run the spec on this machine, one process per replica, instead of submitting it")
    common.add_argument("--local_run_timeout", type=float, default=None, help="with --local_run: stop after SECONDS")
    sub.add_parser("train", parents=[common], allow_abbrev=False, help="one CustomJob", epilog="Other flags go to the trainer.")
    tune = sub.add_parser("tune", parents=[common], allow_abbrev=False, help="a HyperparameterTuningJob",
                          epilog="Other flags go to every trial's trainer.")
    tune.add_argument("--search_space", default=None, help="YAML search space; default: the book's")
    tune.add_argument("--max_trials", type=int, default=None, help="default: the search space's")
    tune.add_argument("--parallel_trials", type=int, default=None, help="default: the search space's")
    tune.add_argument("--max_failed_trials", type=int, default=0, help="0 = Vertex's default")
    tune.add_argument("--local_seed", type=int, default=0, help="with --local_run: seed of the random parameter draws")


def make_trainer_args(ns: argparse.Namespace, trainer_flags: Sequence[str], tuning: bool, num_replicas: int = 1,
                      space: SearchSpace | None = None) -> list[str]:
    """The trainer's flags for every replica, checked by the trainer's own parser; every batch size
    the job can run (the fixed one, or each tuned value) must split evenly over num_replicas."""
    from trainer.config import parse_config

    for name in ("data", "job_dir"):
        if not ns.local_run and not getattr(ns, name).startswith("gs://"):
            raise CloudJobError(f"--{name} must be on gs:// (Vertex AI cannot read {getattr(ns, name)!r}); "
                                f"local paths work with --local_run")
    args = [f"--data={ns.data}", f"--strategy={ns.strategy}", *join_flag_values(trainer_flags)]
    if not tuning:
        args.insert(1, f"--job_dir={ns.job_dir}")
    saved = os.environ.get("AIP_MODEL_DIR")
    if tuning:  # what Vertex sets in each trial; the trainer's parser only requires --job_dir without it
        os.environ["AIP_MODEL_DIR"] = local_run.output_dirs(ns.job_dir, "1")["AIP_MODEL_DIR"]
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


def machine_count(ns: argparse.Namespace) -> int:
    """--workers, which only multi_worker takes: elsewhere a typed count would be dropped unseen."""
    if ns.workers is not None and ns.strategy != "multi_worker":
        raise CloudJobError(f"--workers {ns.workers} is for --strategy multi_worker; {ns.strategy} runs on one machine")
    return DEFAULT_WORKERS if ns.workers is None else ns.workers


def training_image(ns: argparse.Namespace, hw: vertex_specs.Hardware) -> str:
    """--image_uri, or the image `make push` pushed for this hardware, project and region."""
    if ns.image_uri:
        return ns.image_uri
    if hw.image_kind == "tpu":
        raise CloudJobError(images.TPU_IMAGE_PROBLEM)
    try:
        return images.image_uri(images.TRAINING_IMAGE_FOR[hw.image_kind], ns.project, ns.region, ns.repository)
    except images.ImageError as e:
        raise CloudJobError(str(e)) from None


def spec_file_name(ns: argparse.Namespace) -> str:
    """The file the gcloud command's --config names: --spec_file, or a default the user saves the spec to."""
    return ns.spec_file or ("hptuning_job.yaml" if ns.command == "tune" else "custom_job.yaml")


def build_job(ns: argparse.Namespace, trainer_flags: Sequence[str], package_uri: str | None = None):
    """(the message to submit, the message to print as the gcloud config, the gcloud command, the hardware)."""
    hw = vertex_specs.make_hardware(ns.strategy, ns.machine, ns.accelerator, machine_count(ns))
    tuning = ns.command == "tune"
    space = load_search_space(ns.search_space) if tuning else None
    if space is not None:
        if space.metric != hypertune_report.METRIC_TAG:  # no trial would report it, so none would have a result
            raise CloudJobError(f"metric {space.metric!r}: the trainer reports only {hypertune_report.METRIC_TAG!r} "
                                f"(validation accuracy) to Vertex AI; set `metric: {hypertune_report.METRIC_TAG}`")
        check_against_trainer(space, trainer_flags)
    args = make_trainer_args(ns, trainer_flags, tuning, hw.num_replicas, space)
    if package_uri is not None:
        image = vertex_specs.prebuilt_training_image(hw.image_kind, package_spec.image_tf_version(ns, hw), ns.region)
        task = vertex_specs.python_package_task(image, package_uri, args)
    else:
        task = vertex_specs.container_task(training_image(ns, hw), images.TRAINER_COMMAND, args)
    display_name = ns.display_name or "imagepipe-{}-{}-{}".format(
        ns.command, ns.strategy.replace("_", "-"), datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    spec = vertex_specs.build_custom_job_spec(hw, task, ns.job_dir)
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


def submit_job(job, project: str, region: str, client=None) -> str:
    """Creates the job with the aiplatform_v1 JobServiceClient; returns its resource name."""
    aip = vertex_specs.aip
    if client is None:
        client = aip.JobServiceClient(client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
    parent = f"projects/{project}/locations/{region}"
    if isinstance(job, aip.CustomJob):
        return client.create_custom_job(parent=parent, custom_job=job).name
    return client.create_hyperparameter_tuning_job(parent=parent, hyperparameter_tuning_job=job).name


def check_modes(ns: argparse.Namespace) -> None:
    if ns.executor_image:
        raise CloudJobError("--executor_image is gone: Vertex AI takes only its prebuilt images in a PythonPackageSpec; "
                            f"pass your image as --image_uri {ns.executor_image} (a custom container)")
    if ns.dry_run and ns.local_run:
        raise CloudJobError("--dry_run prints the spec and --local_run runs it: choose one")
    if ns.local_run and ns.python_package:
        raise CloudJobError("--local_run runs the container's command; drop --python_package")
    if ns.local_run and ns.strategy == "tpu":
        raise CloudJobError("--local_run of strategy tpu: there is no TPU here")
    if not ns.python_package and (ns.tf_version or ns.package_uri):
        raise CloudJobError("--tf_version and --package_uri are for --python_package (Google's prebuilt images)")


def run(argv: Sequence[str] | None = None, out=sys.stdout, client=None, ns=None, trainer_flags=None):
    """Builds the job, then prints it (--dry_run), runs it here (--local_run: returns the replicas, or
    the trials of a study) or submits it (returns the job's resource name)."""
    if ns is None:
        from trainer.cloud.cli import make_arg_parser

        ns, trainer_flags = make_arg_parser().parse_known_args(argv)
    check_modes(ns)
    with package_spec.PythonPackage(ns) as package:
        try:
            job, printed, command, hw = build_job(ns, trainer_flags, package.uri)
        except (vertex_specs.SpecError, SearchSpaceError) as e:
            raise CloudJobError(str(e)) from e
        package.check_installs_on_image(hw)
        text = vertex_specs.spec_to_yaml(printed)
        if ns.spec_file:
            Path(ns.spec_file).write_text(text)
        if ns.dry_run:
            kind = "CustomJobSpec" if ns.command == "train" else "HyperparameterTuningJob"
            saved = "" if ns.spec_file else \
                f"; --config names {spec_file_name(ns)}: save the spec above there, or pass --spec_file"
            upload = f" after uploading the sdist to {package.uri}" if package.uri else ""
            out.write(f"# {kind} (dry run: nothing submitted)\n{text}\n# Equivalent gcloud command"
                      f"{upload}{saved}:\n{command}\n")
            return None
        if ns.local_run:
            return run_locally(ns, job, out)
        package.upload()
        name = submit_job(job, ns.project, ns.region, client)
        out.write(f"submitted {name}\n")
        return name


def run_locally(ns: argparse.Namespace, job, out):
    try:
        if ns.command == "train":
            replicas = local_run.run_custom_job(job.job_spec, job.display_name, ns.job_dir, out, ns.local_run_timeout)
            export = os.path.join(ns.job_dir, run_folder.EXPORT_DIR)
            out.write(f"local run finished: {'export in ' + export if not is_remote(export) else export}\n")
            return replicas
        return local_tune.run_study(job, job.display_name, ns.job_dir, out, ns.local_seed, ns.local_run_timeout)
    except local_run.LocalRunError as e:
        raise CloudJobError(f"local run failed: {e}") from e
