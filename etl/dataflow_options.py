"""Beam flags for running the ETL on Dataflow, checked before anything is submitted.

    python -m etl.dataflow_options --project P --region R --bucket B [--job_name N] [--max_workers 10] \
        [--machine_type n1-standard-4] [--worker_image IMAGE] [--input gs://... --output gs://...]

prints the flags (shell-quoted, one line) for `python -m etl ... $(...)`; `make etl
RUNNER=DataflowRunner PROJECT=P REGION=R BUCKET=B [WORKER_IMAGE=...]` uses it. A missing or
malformed value is an error that names the Makefile variable and the flag, before any job is built.

Workers get the ETL's code and dependencies one of two ways:
  --setup_file (default)   each worker pip-installs this package (TensorFlow included) when it starts
  --worker_image IMAGE     they start from containers/dataflow_worker.Dockerfile's image, which holds
                           them already (--sdk_container_image; --sdk_location=container so the
                           launcher stages no SDK; Runner v2, which custom containers need). The image
                           must carry the launcher's Beam version, as `make image` builds it.
"""
from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
from pathlib import Path

SETUP_FILE = Path(__file__).resolve().parents[1] / "setup.py"  # ships etl/ and shared/ to the workers
DEFAULT_MAX_WORKERS = 10  # Dataflow's autoscaling cap; raise it for corpora of millions of images
# Dataflow job names: lower-case letters, digits and '-', starting with a letter (max 63 here).
_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")  # e.g. us-central1, europe-west4


class DataflowOptionsError(ValueError):
    """A Dataflow setting is missing or malformed; the message names each one."""


def default_job_name(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return "imagepipe-etl-" + now.strftime("%Y%m%d-%H%M%S")


def dataflow_args(project: str | None, region: str | None, bucket: str | None, job_name: str | None = None,
                  setup_file: str | Path = SETUP_FILE, max_workers: int = DEFAULT_MAX_WORKERS,
                  machine_type: str | None = None, input_path: str | None = None,
                  output_path: str | None = None, worker_image: str | None = None) -> list[str]:
    """The Beam argv for DataflowRunner: project, region, temp and staging under gs://bucket/dataflow/,
    job name, the autoscaling cap, and the workers' code: the worker image when given, else the
    setup file. The ETL's own --input and --output, when given, are checked too: workers cannot see
    local files."""
    problems = []
    for name, path in (("INPUT (--input)", input_path), ("OUTPUT (--output)", output_path)):
        if path is not None and not path.startswith("gs://"):
            problems.append(f"{name} {path!r} is not on gs://: Dataflow workers cannot reach this machine's files")
    if not project:
        problems.append("PROJECT (--project) is missing: the Google Cloud project to run in")
    if not region:
        problems.append("REGION (--region) is missing, e.g. us-central1")
    elif not _REGION.match(region):
        problems.append(f"REGION (--region) {region!r} does not look like a region, e.g. us-central1")
    bucket_name = (bucket or "").removeprefix("gs://").strip("/")
    if not bucket_name:
        problems.append("BUCKET (--bucket) is missing: temp and staging files go to gs://BUCKET/dataflow/")
    elif not _BUCKET.match(bucket_name):
        problems.append(f"BUCKET (--bucket) {bucket!r} is not a bucket name (give the name, not a path)")
    job_name = job_name or default_job_name()
    if not _JOB_NAME.match(job_name):
        problems.append(f"JOB_NAME (--job_name) {job_name!r}: Dataflow wants lower-case letters, digits and '-', "
                        f"starting with a letter")
    if worker_image is not None and (not worker_image.strip() or any(c.isspace() for c in worker_image)):
        problems.append(f"WORKER_IMAGE (--worker_image) {worker_image!r} is not an image address")
    if worker_image is None and not Path(setup_file).is_file():
        problems.append(f"setup file {setup_file} does not exist: workers would not get the etl and shared packages")
    if not isinstance(max_workers, int) or max_workers < 1:
        problems.append(f"MAX_WORKERS (--max_workers) must be a positive integer, got {max_workers!r}")
    if problems:
        raise DataflowOptionsError("cannot run on Dataflow: " + "; ".join(problems))
    root = f"gs://{bucket_name}/dataflow"
    args = ["--runner=DataflowRunner", f"--project={project}", f"--region={region}", f"--job_name={job_name}",
            f"--temp_location={root}/temp", f"--staging_location={root}/staging",
            f"--max_num_workers={max_workers}", "--autoscaling_algorithm=THROUGHPUT_BASED"]
    if worker_image:
        args += [f"--sdk_container_image={worker_image}", "--sdk_location=container", "--experiments=use_runner_v2"]
    else:
        args.append(f"--setup_file={Path(setup_file).resolve()}")
    if machine_type:
        args.append(f"--worker_machine_type={machine_type}")
    return args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m etl.dataflow_options", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--project", default="")
    p.add_argument("--region", default="")
    p.add_argument("--bucket", default="")
    p.add_argument("--job_name", default="")
    p.add_argument("--max_workers", type=int, default=DEFAULT_MAX_WORKERS)
    p.add_argument("--machine_type", default="")
    p.add_argument("--worker_image", default="", help="the workers' container image (--sdk_container_image); "
                   "default: workers install the package from --setup_file")
    p.add_argument("--input", default=None, help="the ETL's --input, checked only (must be gs://)")
    p.add_argument("--output", default=None, help="the ETL's --output, checked only (must be gs://)")
    ns = p.parse_args(argv)
    try:
        args = dataflow_args(ns.project, ns.region, ns.bucket, ns.job_name or None, max_workers=ns.max_workers,
                             machine_type=ns.machine_type or None, input_path=ns.input, output_path=ns.output,
                             worker_image=ns.worker_image or None)
    except DataflowOptionsError as e:
        print(f"etl.dataflow_options: error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
