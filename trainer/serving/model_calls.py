"""One model call for the images of several requests, each request answered with its own
predictions or its own error; and the warm-up call a server makes before it accepts requests."""
from __future__ import annotations

import bisect
import io
import itertools
import logging
import time
from typing import Sequence

from trainer.serving.exported_model import BatchDecodeError, ExportedModel, ExportError
from trainer.serving.request_checks import RequestRejected, to_model_inputs

log = logging.getLogger("trainer.serve")

CheckedRequest = list  # check_predict_request's [(image bytes, header), ...]: one request's images


def predict_requests(model: ExportedModel, requests: Sequence[CheckedRequest]) -> list[list[dict] | RequestRejected]:
    """Each request's predictions, from one call of the model on all their images; or, for a request
    with an image that cannot be converted or decoded, RequestRejected(400) naming that request's own
    instance: the call then runs again without that request, so the others still get their answers.

    Run it in a model slot: converting formats TF cannot read decodes them in full."""
    outcomes: list = [None] * len(requests)
    inputs: dict[int, list[bytes]] = {}
    for number, checked in enumerate(requests):
        try:
            inputs[number] = to_model_inputs(checked)
        except RequestRejected as e:
            outcomes[number] = e
    while inputs:
        numbers = list(inputs)
        try:
            predictions = model.predict([image for number in numbers for image in inputs[number]])
        except BatchDecodeError as e:
            if e.index < 0 and len(numbers) > 1:  # only the batch fails: answer each request alone
                for number in numbers:
                    outcomes[number] = predict_requests(model, [requests[number]])[0]
                return outcomes
            ends = list(itertools.accumulate(len(inputs[number]) for number in numbers))
            owner = bisect.bisect_right(ends, e.index) if e.index >= 0 else 0
            instance = e.index - (ends[owner - 1] if owner else 0) if e.index >= 0 else e.index
            outcomes[numbers[owner]] = RequestRejected(400, f"instance {instance}: {e.detail}")
            del inputs[numbers[owner]]
            continue
        start = 0
        for number in numbers:
            outcomes[number] = predictions[start:start + len(inputs[number])]
            start += len(inputs[number])
        break
    return outcomes


def warm_up(model: ExportedModel) -> None:
    """One prediction on a small generated JPEG when the server starts, through the request threads as a
    request goes: TensorFlow's first call of a loaded signature optimizes its graph and sets up its
    kernels, and the pool starts its first thread; without it the first client pays for both (80 ms
    instead of ~3 ms on the digits export). TF Serving does the same with its warm-up records."""
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


def pixels_of(checked: CheckedRequest) -> int:
    return sum(header.width * header.height for _, header in checked)

