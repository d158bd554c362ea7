"""The Starlette app behind `trainer.serve`: TF Serving's REST contract for one exported model.

  GET  /v1/models/<name>                 version status
  GET  /v1/models/<name>/metadata        the serving signature
  POST /v1/models/<name>:predict         {"instances": [...]} -> {"predictions": [...]}
(also under /v1/models/<name>/versions/1/...), and Vertex AI's custom-container routes when given
(`VertexRoutes`: the same bodies). Errors are {"error": "..."} with a 4xx or 5xx status, as TF
Serving sends them, so one client works against this server, TF Serving or a managed endpoint.

The event loop only reads bodies (counting bytes, so an oversized body is refused before it is all
read, and within a deadline); parsing runs in the threadpool, at most PARSE_SLOTS at once. With
batching (`trainer.serving.batching`) the checked images of concurrent requests then go to one model
call; without it each request takes a model slot of its own. All full decodes (the model's, and
PIL's of formats TF cannot read) run in one of MODEL_CALLS_IN_FLIGHT model calls, each within the
per-request pixel limit, so memory is bounded by the limits, not by the client count
(`resources.memory_bound`).

Starlette rather than FastAPI: this app validates requests itself and serves no OpenAPI docs, so
FastAPI's layers would only cost time (docs/serving.md).

Every prediction carries a W3C `Server-Timing` header (milliseconds; browsers' dev tools and
`trainer.serving.bench` read it), so a client can see where a slow request went:
  read   receiving the body          parse  JSON, base64, header checks
  queue  waiting for a model call    model  the (batched) call: converting formats TF cannot read,
                                            the model, its input and output conversion
  total  from the handler's start to the encoded response: total minus the four is the thread
         hand-offs and encoding the response
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trainer.serving import resources
from trainer.serving.batching import Batcher, BatchingOptions, QueueFull
from trainer.serving.contract import SERVING_SIGNATURE
from trainer.serving.exported_model import ExportedModel, load_exported_model
from trainer.serving.model_calls import pixels_of, predict_requests, warm_up
from trainer.serving.request_checks import RequestRejected, ServingLimits, check_predict_request

MODEL_VERSION = "1"  # TF Serving's layout: export/ mounted as /models/<name>/1
# One model call per core. Each may hold up to max_request_pixels decoded, so this bounds memory;
# and on 2 cores with 4 clients sending 32-image requests, 8 in flight was within run-to-run noise
# of 2 (810-890 vs 650-860 images/s with the test model).
MODEL_CALLS_IN_FLIGHT = max(1, os.cpu_count() or 1)
# Bodies parsed at once: each parse holds two more bodies' worth (resources.PARSE_BODIES).
PARSE_SLOTS = max(1, os.cpu_count() or 1)
WORKER_THREADS = 40  # anyio's default thread limit, which the server used before it had its own pool
CLOSES_CONNECTION = (408,)  # the client stalled mid-body: its connection is of no further use

log = logging.getLogger("trainer.serve")


@dataclasses.dataclass(frozen=True)
class VertexRoutes:
    """Vertex AI's custom-container routes (its AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE)."""
    health: str
    predict: str


def make_app(model_path: str, model_name: str = "model", limits: ServingLimits = ServingLimits(),
             connections: resources.ConnectionLimits = resources.ConnectionLimits(),
             batching: BatchingOptions | None = BatchingOptions(), vertex: VertexRoutes | None = None) -> Starlette:
    """Loads the export at `model_path` (ExportError if it does not fit the contract) and returns the app,
    which warms the model up when it starts (`warm_up`; ExportError there if that prediction fails).
    `batching` None: each request is its own model call."""
    model = load_exported_model(model_path)
    answer = Answerer(model, limits, batching)
    predict = make_predict_handler(answer, model_name, limits, connections)
    routes = tf_serving_routes(model, model_name, predict) + (vertex_routes(vertex, predict) if vertex else [])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # The path requests take: the request threads, then the model.
        await asyncio.get_running_loop().run_in_executor(answer.workers, warm_up, model)
        bound = resources.memory_bound(resources.resident_bytes(), connections, limits,
                                       PARSE_SLOTS, MODEL_CALLS_IN_FLIGHT)
        log.info("memory bound: %s", bound.describe())
        yield
        answer.close()

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        RequestRejected: rejected, HTTPException: http_error, Exception: failed})


class Answerer:
    """A request body -> (its predictions, seconds by phase): parsed in a parse slot, then predicted
    in a batch with other requests' images, or in a model slot of its own when batching is off."""

    def __init__(self, model: ExportedModel, limits: ServingLimits, batching: BatchingOptions | None):
        self.model = model
        self.limits = limits
        self.parse_slots = threading.BoundedSemaphore(PARSE_SLOTS)
        # Threads that parse (and without batching wait for a model slot): as many as anyio's default
        # 40, so that requests waiting for a model slot never hold up the parse of others.
        self.workers = concurrent.futures.ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="request")
        self.model_slots = threading.BoundedSemaphore(MODEL_CALLS_IN_FLIGHT)
        self.batcher = None
        if batching is not None:
            # At most one batch thread per model slot (each call may hold a request's pixels decoded:
            # resources.memory_bound counts MODEL_CALLS_IN_FLIGHT of them), and a batch holds no more
            # pixels than one request may.
            if batching.num_batch_threads > MODEL_CALLS_IN_FLIGHT:
                raise ValueError(f"num_batch_threads {batching.num_batch_threads} is more than the "
                                 f"{MODEL_CALLS_IN_FLIGHT} model calls this machine runs at once (one per core)")
            batching = dataclasses.replace(batching, max_batch_pixels=limits.max_request_pixels)
            self.batcher = Batcher(lambda requests: predict_requests(model, requests), batching)

    async def __call__(self, body: list[bytes]) -> tuple[list[dict], dict[str, float]]:
        """`body` is a list holding the body, which parsing takes out of it: from then on the request
        holds only its decoded images, not the body as well (resources.memory_bound counts one of them)."""
        loop = asyncio.get_running_loop()
        if self.batcher is None:
            return await loop.run_in_executor(self.workers, self.parse_and_predict, body)
        # Not on the event loop, although that cost 0.1-0.2 ms less CPU per single-image request: with
        # 200 concurrent requests, 3 of 15 runs saw a client's connection reset (none with a thread).
        # The server's own pool rather than anyio.to_thread, whose cancel scope and capacity limiter
        # this pool needs neither of. With the body read below, that took the event loop's CPU per
        # single-image request from 0.37-0.44 ms to 0.31-0.33 (16 clients, 2 cores).
        checked, parse_seconds = await loop.run_in_executor(self.workers, self.parse, body)
        enqueued = time.perf_counter()
        try:
            predictions, timing = await self.batcher.submit(checked, len(checked), pixels_of(checked))
        except QueueFull as e:
            raise RequestRejected(503, str(e)) from None
        return predictions, {"parse": parse_seconds, "queue": timing.started - enqueued,
                             "model": timing.finished - timing.started}

    def parse(self, body: list[bytes]) -> tuple[list, float]:
        started = time.perf_counter()
        with self.parse_slots:
            checked = check_predict_request(body.pop(), self.limits)
        return checked, time.perf_counter() - started

    def parse_and_predict(self, body: list[bytes]) -> tuple[list[dict], dict[str, float]]:
        checked, parse_seconds = self.parse(body)
        queue_start = time.perf_counter()
        with self.model_slots:
            model_start = time.perf_counter()
            [outcome] = predict_requests(self.model, [checked])
        if isinstance(outcome, RequestRejected):
            raise outcome
        return outcome, {"parse": parse_seconds, "queue": model_start - queue_start,
                         "model": time.perf_counter() - model_start}

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.workers.shutdown(wait=False, cancel_futures=True)


def make_predict_handler(answer: Answerer, model_name: str, limits: ServingLimits,
                         connections: resources.ConnectionLimits):
    """The POST handler of TF Serving's :predict and Vertex AI's predict route: {"instances"} -> {"predictions"}."""

    async def predict(request: Request) -> Response:
        if "name" in request.path_params:
            check_model(request, model_name)
        started = time.perf_counter()
        body = [await read_body_within(request, limits.max_body_bytes, connections.body_timeout_s)]
        seconds = {"read": time.perf_counter() - started}
        predictions, phases = await answer(body)
        content = orjson.dumps({"predictions": predictions})  # 4x faster than JSONResponse's json.dumps
        seconds.update(phases, total=time.perf_counter() - started)
        return Response(content, media_type="application/json", headers={"server-timing": server_timing(seconds)})

    return predict


def check_model(request: Request, model_name: str) -> None:
    name, version = request.path_params["name"], request.path_params.get("version")
    if name != model_name:
        raise RequestRejected(404, f"Servable not found for request: Latest({name[:100]}); this server serves {model_name!r}")
    if version is not None and version != MODEL_VERSION:
        raise RequestRejected(404, f"Servable not found for request: Specific({name[:100]}, {version[:20]}); "
                                   f"the only version is {MODEL_VERSION}")


def model_status() -> dict:
    return {"model_version_status": [{"version": MODEL_VERSION, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


def tf_serving_routes(model: ExportedModel, model_name: str, predict) -> list[Route]:
    async def status(request: Request) -> Response:
        check_model(request, model_name)
        return JSONResponse(model_status())

    async def metadata(request: Request) -> Response:
        check_model(request, model_name)
        return JSONResponse({"model_spec": {"name": model_name, "signature_name": "", "version": MODEL_VERSION},
                             "metadata": {"signature_def": {"signature_def": signature_defs(model)}}})

    prefixes = ("/v1/models/{name}", "/v1/models/{name}/versions/{version}")  # the second names a version
    # Predict first: Starlette tries routes in order, so every prediction would otherwise be matched
    # against the four GET routes' patterns before its own (route matching was 8% of the event loop's
    # time with 16 clients of single images). No path of one route is another's: a GET of ".../model:predict"
    # still reaches the status route (as the servable "model:predict", which is not found).
    return ([Route(f"{prefix}:predict", predict, methods=["POST"]) for prefix in prefixes]
            + [Route(prefix, status, methods=["GET"]) for prefix in prefixes]
            + [Route(f"{prefix}/metadata", metadata, methods=["GET"]) for prefix in prefixes])


def vertex_routes(vertex: VertexRoutes, predict) -> list[Route]:
    """Vertex AI's health check and predict route. Health is 200 whenever the server answers: it
    listens only once the model is loaded and warmed up (uvicorn runs the lifespan first)."""
    async def health(request: Request) -> Response:
        return JSONResponse(model_status())

    return [Route(vertex.health, health, methods=["GET"]), Route(vertex.predict, predict, methods=["POST"])]


async def rejected(request: Request, e: RequestRejected) -> JSONResponse:
    headers = {"connection": "close"} if e.status in CLOSES_CONNECTION else None
    return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    # Unknown paths and wrong methods get TF Serving's {"error"} shape too.
    return JSONResponse({"error": f"{e.detail}: {request.method} {request.url.path[:200]}"}, status_code=e.status_code)


async def failed(request: Request, e: Exception) -> JSONResponse:
    log.exception("predict failed on %s", request.url.path)
    return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)


async def read_body_within(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or RequestRejected(413) as soon as it is known to exceed `max_bytes`: from
    Content-Length before reading anything, else while streaming (chunked uploads); RequestRejected(408)
    if it has not all arrived `timeout_s` after the handler started (a client that trickles or stalls)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestRejected(400, f"Content-Length {declared[:30]!r} is not a number")
        if int(declared) > max_bytes:
            raise RequestRejected(413, f"the body has {int(declared):,} bytes, over the limit of {max_bytes:,} "
                                       f"(--max_body_mb); send fewer or smaller images per request")
    chunks = []
    received = 0
    try:
        # The ASGI messages themselves, under asyncio's timeout: Starlette's request.stream() and
        # anyio's fail_after cost more event-loop CPU per request (Answerer.__call__ has the numbers).
        async with asyncio.timeout(timeout_s):
            more = True
            while more:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > max_bytes:
                    raise RequestRejected(413, f"the body exceeds the limit of {max_bytes:,} bytes (--max_body_mb); "
                                               f"send fewer or smaller images per request")
                chunks.append(chunk)
                more = message.get("more_body", False)
    except TimeoutError:
        log.info("dropped a client whose body did not arrive within %g s (--body_timeout_s): %d of %s bytes",
                 timeout_s, received, declared or "unknown")
        raise RequestRejected(408, f"the body did not arrive within {timeout_s:g} s (--body_timeout_s): "
                                   f"{received:,} of {declared or 'unknown'} bytes") from None
    except ClientDisconnect:
        # An aborted upload or a client's timeout, not a server fault: no 500 and no traceback in the
        # log (a client could fill it so). The answer goes nowhere; uvicorn drops it.
        log.info("client closed the connection after %d of %s body bytes", received, declared or "unknown")
        raise RequestRejected(400, f"the client closed the connection after {received:,} body bytes") from None
    return b"".join(chunks)


def server_timing(seconds: dict[str, float]) -> str:
    """{"parse": 0.00065, ...} -> 'parse;dur=0.650, ...': the W3C Server-Timing header, in milliseconds."""
    return ", ".join(f"{name};dur={value * 1e3:.3f}" for name, value in seconds.items())


def parse_server_timing(header: str) -> dict[str, float]:
    """'parse;dur=0.650, model;dur=10.1' -> {"parse": 0.65, "model": 10.1} (milliseconds); entries
    without a duration are skipped, as the W3C grammar allows them."""
    durations = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                try:
                    durations[name] = float(value.strip().strip('"'))
                except ValueError:
                    raise ValueError(f"Server-Timing entry {entry.strip()!r} has a duration that is not "
                                     f"a number") from None
    return durations


def signature_defs(model: ExportedModel) -> dict:
    """The serving signature in TF Serving's metadata JSON. Only `serving_default` is listed:
    it is the only one this server runs (predict_filenames would read client paths in the graph)."""
    def tensors(descriptions):
        out = {}
        for name, d in descriptions.items():
            shape = ({"dim": [], "unknown_rank": True} if d.shape is None else
                     {"dim": [{"size": str(-1 if n is None else n), "name": ""} for n in d.shape], "unknown_rank": False})
            out[name] = {"dtype": d.dtype, "tensor_shape": shape, "name": f"{SERVING_SIGNATURE}_{name}"}
        return out

    inputs, outputs = model.signatures[SERVING_SIGNATURE]
    return {SERVING_SIGNATURE: {"inputs": tensors(inputs), "outputs": tensors(outputs),
                                "method_name": "tensorflow/serving/predict"}}
