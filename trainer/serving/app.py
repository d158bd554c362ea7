"""The Starlette app behind `trainer.serve`: TF Serving's REST contract for one exported model.

  GET  /v1/models/<name>                 version status
  GET  /v1/models/<name>/metadata        the serving signature
  POST /v1/models/<name>:predict         {"instances": [...]} -> {"predictions": [...]}
(also under /v1/models/<name>/versions/1/...). Errors are {"error": "..."} with a 4xx or 5xx status,
as TF Serving sends them, so one client works against this server, TF Serving or a managed endpoint.

TensorFlow calls block, so parsing, checking and predicting run in the threadpool; the event loop
only reads bodies (counting bytes, so an oversized body is refused before it is all read). All
full decodes (the model's, and PIL's of formats TF cannot read) run in one of a bounded number of
model slots, so memory is bounded by slots x the per-request pixel limit, not by the client count.

Starlette rather than FastAPI (built on it): this app validates requests itself and has no OpenAPI
docs, so FastAPI's extra layers (dependency solving, telemetry and body-limit middleware) only cost
time: 0.18 ms of a single-image request's 1.80 ms and 0.32 ms of a 32-image one's 10.96 ms, five
interleaved runs each on 2 cores with the digits export.

Every prediction carries a W3C `Server-Timing` header (milliseconds; browsers' dev tools and
`trainer.serving.bench` read it), so a client can see where a slow request went:
  read   receiving the body          parse  JSON, base64, header checks, converting formats TF cannot read
  queue  waiting for a model slot    model  the batched call, with its input and output conversion
  total  from the handler's start to the encoded response: total minus the four is the two thread
         hand-offs and encoding the response
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import anyio
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trainer.serving.contract import SERVING_SIGNATURE
from trainer.serving.exported_model import BatchDecodeError, ExportedModel, ExportError, load_exported_model
from trainer.serving.request_checks import RequestRejected, ServingLimits, check_predict_request, to_model_inputs

MODEL_VERSION = "1"  # TF Serving's layout: export/ mounted as /models/<name>/1
# One batch per core. Each batch in flight may hold up to max_request_pixels decoded, so this bounds
# memory; and on 2 cores with 4 clients sending 32-image requests, 8 in flight was within run-to-run
# noise of 2 (810-890 vs 650-860 images/s with the test model).
MODEL_CALLS_IN_FLIGHT = max(1, os.cpu_count() or 1)

log = logging.getLogger("trainer.serve")


def make_app(model_path: str, model_name: str = "model", limits: ServingLimits = ServingLimits()) -> Starlette:
    """Loads the export at `model_path` (ExportError if it does not fit the contract) and returns the app,
    which warms the model up when it starts (`warm_up`; ExportError there if that prediction fails)."""
    model = load_exported_model(model_path)
    model_calls = threading.BoundedSemaphore(MODEL_CALLS_IN_FLIGHT)

    def check_model(request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != model_name:
            raise RequestRejected(404, f"Servable not found for request: Latest({name[:100]}); this server serves {model_name!r}")
        if version is not None and version != MODEL_VERSION:
            raise RequestRejected(404, f"Servable not found for request: Specific({name[:100]}, {version[:20]}); "
                                       f"the only version is {MODEL_VERSION}")

    async def status(request: Request) -> Response:
        check_model(request)
        return JSONResponse({"model_version_status": [{"version": MODEL_VERSION, "state": "AVAILABLE",
                                                       "status": {"error_code": "OK", "error_message": ""}}]})

    async def metadata(request: Request) -> Response:
        check_model(request)
        return JSONResponse({"model_spec": {"name": model_name, "signature_name": "", "version": MODEL_VERSION},
                             "metadata": {"signature_def": {"signature_def": signature_defs(model)}}})

    async def predict(request: Request) -> Response:
        check_model(request)
        started = time.perf_counter()
        body = await read_body_within(request, limits.max_body_bytes)
        seconds = {"read": time.perf_counter() - started}

        def parse_and_predict() -> list[dict]:
            parse_start = time.perf_counter()
            checked = check_predict_request(body, limits)
            queue_start = time.perf_counter()
            with model_calls:
                convert_start = time.perf_counter()
                # Formats TF cannot read are decoded here: in a slot, so their memory is bounded like
                # the model's (outside, 6 requests of two 40 MP TIFFs took the server from 0.7 to 3.3 GB).
                images = to_model_inputs(checked)
                model_start = time.perf_counter()
                try:
                    predictions = model.predict(images)
                except BatchDecodeError as e:
                    raise RequestRejected(400, f"instance {e.index}: {e.detail}") from None
            seconds.update(parse=(queue_start - parse_start) + (model_start - convert_start),
                           queue=convert_start - queue_start, model=time.perf_counter() - model_start)
            return predictions

        predictions = await anyio.to_thread.run_sync(parse_and_predict)
        content = orjson.dumps({"predictions": predictions})  # 4x faster than JSONResponse's json.dumps
        seconds["total"] = time.perf_counter() - started
        return Response(content, media_type="application/json", headers={"server-timing": server_timing(seconds)})

    async def rejected(request: Request, e: RequestRejected) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        # Unknown paths and wrong methods get TF Serving's {"error"} shape too.
        return JSONResponse({"error": f"{e.detail}: {request.method} {request.url.path[:200]}"}, status_code=e.status_code)

    async def failed(request: Request, e: Exception) -> JSONResponse:
        log.exception("predict failed on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    prefixes = ("/v1/models/{name}", "/v1/models/{name}/versions/{version}")  # the second names a version
    routes = ([Route(prefix, status, methods=["GET"]) for prefix in prefixes]
              + [Route(f"{prefix}/metadata", metadata, methods=["GET"]) for prefix in prefixes]
              + [Route(f"{prefix}:predict", predict, methods=["POST"]) for prefix in prefixes])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await anyio.to_thread.run_sync(warm_up, model)  # the path requests take: the threadpool, then the model
        yield

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={RequestRejected: rejected, HTTPException: http_error, Exception: failed})


def warm_up(model: ExportedModel) -> None:
    """One prediction on a small generated JPEG when the server starts, through the threadpool as a
    request goes: TensorFlow's first call of a loaded signature optimizes its graph and sets up its
    kernels, and anyio starts its worker thread. Without it the first client's single-image request
    took 80 ms in the handler, 28 ms with the model warmed outside the threadpool, 2.8 ms so (the next
    ones ~2.3 ms; digits export, 2 cores). TF Serving does the same with its warm-up records."""
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(jpeg, format="JPEG")
    started = time.perf_counter()
    try:
        model.predict([jpeg.getvalue()])
    except Exception as e:  # a model that cannot answer a plain JPEG would fail every request: refuse to start
        raise ExportError(f"{model.path} failed its warm-up prediction on a 32x32 JPEG: "
                          f"{type(e).__name__}: {e}") from e
    log.info("warmed up %s with one prediction in %.0f ms", model.path, (time.perf_counter() - started) * 1e3)


async def read_body_within(request: Request, max_bytes: int) -> bytes:
    """The whole body, or RequestRejected(413) as soon as it is known to exceed `max_bytes`:
    from Content-Length before reading anything, else while streaming (chunked uploads)."""
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
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise RequestRejected(413, f"the body exceeds the limit of {max_bytes:,} bytes (--max_body_mb); "
                                           f"send fewer or smaller images per request")
            chunks.append(chunk)
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
