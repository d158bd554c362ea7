"""Serves an export over TF Serving's REST API on this machine:

    python -m trainer.serve --model runs/r1/export [--host 127.0.0.1] [--port 8501] [--model_name model]
        [--allow_root DIR] [--max_body_mb 10] [--max_instances 64]
        [--enable_batching true] [--max_batch_size 32] [--batch_timeout_micros 0] [--max_enqueued_batches 64]
        [--num_batch_threads <cores>]
        [--max_connections 64] [--header_timeout_s 10] [--body_timeout_s 60] [--keep_alive_timeout_s 5] [--access_log]

then POST {"instances": [{"image_bytes": {"b64": "..."}}]} to /v1/models/model:predict.
The same request works against TF Serving's Docker image (see the README).

As a Vertex AI custom container: with AIP_HTTP_PORT set it listens on 0.0.0.0:$AIP_HTTP_PORT, answers
health checks on $AIP_HEALTH_ROUTE and predictions on $AIP_PREDICT_ROUTE, and serves $AIP_STORAGE_URI
when --model is not given.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from typing import Mapping, Sequence

from shared import image_check, native_log
from trainer.serving.batching import BatchingOptions
from trainer.serving.request_checks import ServingLimits
from trainer.serving.resources import ConnectionLimits

DEFAULT_PORT = 8501  # TF Serving's REST port


@dataclasses.dataclass(frozen=True)
class VertexEnvironment:
    """What Vertex AI tells a custom container in its environment (None where a variable is unset)."""
    http_port: int | None
    health_route: str | None
    predict_route: str | None
    storage_uri: str | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "VertexEnvironment":
        port = environ.get("AIP_HTTP_PORT") or None
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"AIP_HTTP_PORT {port[:20]!r} is not a TCP port number")
        routes = {name: environ.get(name) or None for name in ("AIP_HEALTH_ROUTE", "AIP_PREDICT_ROUTE")}
        for name, route in routes.items():
            if route is not None and not route.startswith("/"):
                raise ValueError(f"{name} {route[:100]!r} must be a path starting with '/'")
        return cls(None if port is None else int(port), routes["AIP_HEALTH_ROUTE"], routes["AIP_PREDICT_ROUTE"],
                   environ.get("AIP_STORAGE_URI") or None)


def true_or_false(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def make_arg_parser() -> argparse.ArgumentParser:
    limits, batching, connections = ServingLimits(), BatchingOptions(), ConnectionLimits()
    p = argparse.ArgumentParser(prog="python -m trainer.serve", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="the export folder a training run wrote (runs/<run>/export); default: $AIP_STORAGE_URI")
    # Loopback by default: this server has no authentication; bind 0.0.0.0 only behind one (Vertex AI's
    # front end is one: with AIP_HTTP_PORT set, as inside its container, the default is 0.0.0.0).
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1; 0.0.0.0 with AIP_HTTP_PORT set)")
    p.add_argument("--port", type=int, default=None,
                   help=f"default: $AIP_HTTP_PORT, else {DEFAULT_PORT}, TF Serving's REST port")
    p.add_argument("--model_name", default="model", help="the <name> in /v1/models/<name> (default: %(default)s)")
    p.add_argument("--allow_root", default=None,
                   help='accept {"filenames": ...} instances for files whose real path lies under this folder '
                        "(default: filenames are refused)")
    p.add_argument("--max_body_mb", type=float, default=limits.max_body_bytes / 2**20,
                   help="largest request body, and largest total of files one request reads (default: %(default)s)")
    p.add_argument("--max_instances", type=int, default=limits.max_instances,
                   help="most images per request (default: %(default)s)")
    p.add_argument("--max_pixels", type=int, default=image_check.DEFAULT_MAX_PIXELS,
                   help="most pixels one image's header may claim (default: %(default)s, the ETL's)")
    p.add_argument("--max_request_pixels", type=int, default=limits.max_request_pixels,
                   help="most pixels of all images of one request, and of one batched model call (default: %(default)s)")
    b = p.add_argument_group("batching (TF Serving's flags)")
    b.add_argument("--enable_batching", type=true_or_false, default=True,
                   help="merge concurrent requests' images into one model call (default: true)")
    b.add_argument("--max_batch_size", type=int, default=batching.max_batch_size,
                   help="most images per model call; a larger request is a call of its own (default: %(default)s)")
    b.add_argument("--batch_timeout_micros", type=int, default=batching.batch_timeout_micros,
                   help="least wait for more requests before a batch that is not full runs, once no model "
                        "call is running; 0: as soon as none is (default: %(default)s)")
    b.add_argument("--max_enqueued_batches", type=int, default=batching.max_enqueued_batches,
                   help="batches that may wait for a model call; a request past them gets 503 at once "
                        "(default: %(default)s)")
    b.add_argument("--num_batch_threads", type=int, default=batching.num_batch_threads,
                   help=f"batched model calls in flight, at most one per core ({os.cpu_count() or 1} here) "
                        f"(default: %(default)s)")
    c = p.add_argument_group("connections")
    c.add_argument("--max_connections", type=int, default=connections.max_connections,
                   help="open connections, and requests in progress; more get 503 (default: %(default)s)")
    c.add_argument("--header_timeout_s", type=float, default=connections.header_timeout_s,
                   help="a request's headers must all arrive within this (default: %(default)s)")
    c.add_argument("--body_timeout_s", type=float, default=connections.body_timeout_s,
                   help="a request's body must all arrive within this after its headers; else 408 "
                        "(default: %(default)s)")
    c.add_argument("--keep_alive_timeout_s", type=float, default=connections.keep_alive_timeout_s,
                   help="an idle keep-alive connection is closed after this (default: %(default)s)")
    p.add_argument("--access_log", action="store_true", help="log a line per request (default: off, as TF Serving)")
    p.add_argument("--thread_spinning", action="store_true",
                   help="let TensorFlow's thread pools spin between model calls (default: they sleep, which "
                        "was faster on 2 cores; see trainer.serving.exported_model.disable_thread_spinning)")
    return p


def run(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> None:
    parser = make_arg_parser()
    args = parser.parse_args(argv)
    try:
        vertex = VertexEnvironment.from_environ(environ)
    except ValueError as e:
        parser.error(str(e))
    model = args.model or vertex.storage_uri
    if model is None:
        parser.error("--model is required (or AIP_STORAGE_URI, as Vertex AI sets it)")
    host = args.host or ("0.0.0.0" if vertex.http_port is not None else "127.0.0.1")
    port = args.port if args.port is not None else vertex.http_port or DEFAULT_PORT
    if not math.isfinite(args.max_body_mb):
        parser.error(f"--max_body_mb {args.max_body_mb} is not a finite number of megabytes")
    if args.enable_batching and not 0 < args.num_batch_threads <= (os.cpu_count() or 1):
        parser.error(f"--num_batch_threads {args.num_batch_threads} must be 1 to {os.cpu_count() or 1}, the "
                     f"cores here: each batched call may hold --max_request_pixels decoded, one per core at most")
    try:
        limits = ServingLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_instances=args.max_instances,
                               max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                               allow_root=args.allow_root)
        batching = BatchingOptions(max_batch_size=args.max_batch_size, batch_timeout_micros=args.batch_timeout_micros,
                                   max_enqueued_batches=args.max_enqueued_batches,
                                   num_batch_threads=args.num_batch_threads, max_batch_pixels=args.max_request_pixels) if args.enable_batching else None
        connections = ConnectionLimits(max_connections=args.max_connections, header_timeout_s=args.header_timeout_s,
                                       body_timeout_s=args.body_timeout_s,
                                       keep_alive_timeout_s=args.keep_alive_timeout_s)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("trainer.serve")
    log.info("serving %s as %r on http://%s:%d with %s, %s, %s; TensorFlow's thread pools %s between model calls",
             model, args.model_name, host, port, limits, connections, batching or "batching off",
             "spin" if args.thread_spinning else "sleep")

    native_log.load_tensorflow()
    import uvicorn

    from trainer.serving.app import VertexRoutes, make_app
    from trainer.serving.exported_model import ExportError, disable_thread_spinning
    from trainer.serving.resources import uvicorn_config

    if not args.thread_spinning:
        disable_thread_spinning()
    routes = None
    if vertex.health_route or vertex.predict_route:
        if not (vertex.health_route and vertex.predict_route):
            parser.error("AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE are set together, as Vertex AI sets them")
        routes = VertexRoutes(health=vertex.health_route, predict=vertex.predict_route)
        log.info("Vertex AI routes: health GET %s, predict POST %s", routes.health, routes.predict)
    try:
        app = make_app(model, args.model_name, limits, connections, batching, routes)
    except ExportError as e:
        sys.exit(f"error: {e}")
    uvicorn.Server(uvicorn_config(app, host, port, connections, args.access_log)).run()


if __name__ == "__main__":
    run()
