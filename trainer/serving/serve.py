"""Serves an export over TF Serving's REST API on this machine:

    python -m trainer.serve --model runs/r1/export [--host 127.0.0.1] [--port 8501] [--model_name model]
        [--allow_root DIR] [--max_body_mb 10] [--max_instances 64]

then POST {"instances": [{"image_bytes": {"b64": "..."}}]} to /v1/models/model:predict.
The same request works against TF Serving's Docker image (see the README).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Sequence

from shared import image_check
from trainer.serving.request_checks import ServingLimits

DEFAULT_PORT = 8501  # TF Serving's REST port


def make_arg_parser() -> argparse.ArgumentParser:
    defaults = ServingLimits()
    p = argparse.ArgumentParser(prog="python -m trainer.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="the export folder a training run wrote (runs/<run>/export)")
    # Loopback by default: this server has no authentication; bind 0.0.0.0 only behind one.
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s, TF Serving's REST port")
    p.add_argument("--model_name", default="model", help="the <name> in /v1/models/<name> (default: %(default)s)")
    p.add_argument("--allow_root", default=None,
                   help='accept {"filenames": ...} instances for files whose real path lies under this folder '
                        "(default: filenames are refused)")
    p.add_argument("--max_body_mb", type=float, default=defaults.max_body_bytes / 2**20,
                   help="largest request body, and largest total of files one request reads (default: %(default)s)")
    p.add_argument("--max_instances", type=int, default=defaults.max_instances,
                   help="most images per request (default: %(default)s)")
    p.add_argument("--max_pixels", type=int, default=image_check.DEFAULT_MAX_PIXELS,
                   help="most pixels one image's header may claim (default: %(default)s, the ETL's)")
    p.add_argument("--max_request_pixels", type=int, default=defaults.max_request_pixels,
                   help="most pixels of all images of one request (default: %(default)s)")
    p.add_argument("--thread_spinning", action="store_true",
                   help="let TensorFlow's thread pools spin between model calls (default: they sleep, which "
                        "was faster on 2 cores; see trainer.serving.exported_model.disable_thread_spinning)")
    return p


def run(argv: Sequence[str] | None = None) -> None:
    parser = make_arg_parser()
    args = parser.parse_args(argv)
    if not math.isfinite(args.max_body_mb):
        parser.error(f"--max_body_mb {args.max_body_mb} is not a finite number of megabytes")
    try:
        limits = ServingLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_instances=args.max_instances,
                               max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                               allow_root=args.allow_root)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer.serve").info(
        "serving %s as %r on http://%s:%d with %s; TensorFlow's thread pools %s between model calls", args.model,
        args.model_name, args.host, args.port, limits, "spin" if args.thread_spinning else "sleep")

    import uvicorn

    from trainer.serving.exported_model import ExportError, disable_thread_spinning
    from trainer.serving.app import make_app

    if not args.thread_spinning:
        disable_thread_spinning()

    try:
        app = make_app(args.model, args.model_name, limits)
    except ExportError as e:
        sys.exit(f"error: {e}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run()
