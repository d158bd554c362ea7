"""`python -m trainer.cloud train|tune|deploy|predict|build`: one parser, one error convention (exit 2)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from trainer.cloud import deploy, endpoint_predict, images, jobs, local_run

DESCRIPTION = """The trainer on Vertex AI, from images to a deployed endpoint:

  build    build and push the training, serving and Dataflow worker images (Cloud Build)
  train    a CustomJob running the training image      (--dry_run prints it, --local_run runs it here)
  tune     a HyperparameterTuningJob over the trainer   (--dry_run, --local_run)
  deploy   an export to a Vertex AI endpoint            (--dry_run)
  predict  image files to an endpoint, one JSON line per file

`python -m trainer.cloud COMMAND --help` for each command's flags.
"""
ERRORS = (jobs.CloudJobError, images.ImageError, deploy.DeployError, endpoint_predict.PredictError,
          local_run.LocalRunError)


def make_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.cloud", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    images.add_build_parser(sub)
    jobs.add_job_parsers(sub)
    deploy.add_command_parser(sub)
    endpoint_predict.add_command_parser(sub)
    return p


def run(argv: Sequence[str] | None = None, out=sys.stdout, client=None):
    """Dispatches to the command; `client` is the job client, deploy's clients or predict's post (tests)."""
    parser = make_arg_parser()
    ns, extra = parser.parse_known_args(argv)
    if ns.command in ("train", "tune"):
        return jobs.run(out=out, client=client, ns=ns, trainer_flags=extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if ns.command == "deploy":
        return deploy.run(ns, out, client)
    if ns.command == "predict":
        return endpoint_predict.run(ns, out, client)
    return images.run_build(ns, out)


def main() -> None:
    try:
        result = run()
    except ERRORS as e:
        print(f"trainer.cloud: error: {e}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)


if __name__ == "__main__":
    main()
