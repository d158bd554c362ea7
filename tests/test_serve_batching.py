"""Server-side batching: concurrent requests share one model call, and each still gets exactly its
own predictions, or its own 4xx for its own bad instance; a full queue answers 503 at once."""
from __future__ import annotations

import asyncio
import base64
import threading

import httpx
import pytest

from tests.serving_fixtures import make_image_bytes, test_export  # noqa: F401
from tests.test_serve import LIMITS, assert_predictions_equal
from trainer.serving import app as serving_app
from trainer.serving.app import make_app
from trainer.serving.batching import Batcher, BatchingOptions
from trainer.serving.exported_model import ExportedModel
from trainer.serving.request_checks import ServingLimits

RED, GREEN, BLUE = (make_image_bytes((250, 10, 10)), make_image_bytes((10, 230, 10), "JPEG"),
                    make_image_bytes((10, 10, 240), "JPEG"))
TRUNCATED = make_image_bytes((10, 200, 10), "JPEG", size=(200, 150))[:-300]


def body(*images: bytes) -> dict:
    return {"instances": [{"b64": base64.b64encode(d).decode()} for d in images]}


async def post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
        return await asyncio.gather(*[c.post("/v1/models/model:predict", json=b) for b in bodies])


@pytest.fixture()
def model_calls(monkeypatch) -> list[int]:
    """The number of images of each call of the model (the calls that find a corrupt image are TF's own)."""
    calls = []
    predict = ExportedModel.predict
    monkeypatch.setattr(ExportedModel, "predict", lambda self, images: calls.append(len(images)) or predict(self, images))
    return calls


@pytest.mark.parametrize("batching", ["on", "off"])
def test_each_request_gets_its_own_predictions_or_its_own_400(test_export, model_calls, batching):
    import tensorflow as tf

    # A long timeout, so that the three requests surely meet in one batch.
    options = BatchingOptions(batch_timeout_micros=1_000_000) if batching == "on" else None
    app = make_app(test_export, "model", ServingLimits(**LIMITS), batching=options)
    first, corrupt, last = asyncio.run(post_all(app, [body(RED, GREEN), body(BLUE, TRUNCATED, RED), body(GREEN)]))
    assert corrupt.status_code == 400
    assert corrupt.json()["error"].startswith("instance 1: the image does not decode (corrupt or truncated")
    serve = tf.saved_model.load(test_export).signatures["serving_default"]

    def direct(images):
        out = {k: v.numpy() for k, v in serve(image_bytes=tf.constant(images)).items()}
        return [{k: out[k][i] for k in out} for i in range(len(images))]
    assert first.status_code == 200 and last.status_code == 200, (first.text, last.text)
    assert_predictions_equal(first.json()["predictions"], direct([RED, GREEN]))
    assert_predictions_equal(last.json()["predictions"], direct([GREEN]))
    if batching == "on":  # one call for all six images, then one without the corrupt request's three
        assert model_calls == [6, 3]
    else:
        assert sorted(model_calls) == [1, 2, 3]


def test_a_full_batch_queue_answers_503_at_once(test_export, monkeypatch):
    release = threading.Event()
    predict = ExportedModel.predict

    def blocked_predict(self, images):
        release.wait(60)
        return predict(self, images)

    monkeypatch.setattr(ExportedModel, "predict", blocked_predict)
    monkeypatch.setattr(serving_app, "MODEL_CALLS_IN_FLIGHT", 1)
    app = make_app(test_export, "model", ServingLimits(**LIMITS),
                   batching=BatchingOptions(max_batch_size=1, max_enqueued_batches=1, num_batch_threads=1))

    async def three_requests():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
            posts = [asyncio.create_task(c.post("/v1/models/model:predict", json=body(RED))) for _ in range(3)]
            # One request runs (blocked), one batch waits, the third cannot be queued: its answer comes first.
            done, _ = await asyncio.wait(posts, return_when=asyncio.FIRST_COMPLETED)
            first_answer = done.pop().result()
            release.set()
            return first_answer, await asyncio.gather(*posts)

    first_answer, answers = asyncio.run(three_requests())
    assert first_answer.status_code == 503, first_answer.text
    assert "--max_enqueued_batches 1" in first_answer.json()["error"]
    assert sorted(r.status_code for r in answers) == [200, 200, 503]


def test_batches_close_when_full_or_over_their_pixels_and_a_failed_payload_fails_alone():
    batches = []

    def process(payloads):
        batches.append(list(payloads))
        return [ValueError(f"{p} is bad") if p == "bad" else p.upper() for p in payloads]

    options = BatchingOptions(max_batch_size=4, batch_timeout_micros=50_000, num_batch_threads=1,
                              max_enqueued_batches=8, max_batch_pixels=100)

    async def submit_all():
        batcher = Batcher(process, options)
        jobs = [("a", 2, 10), ("b", 2, 10),  # 4 images: full, runs at once
                ("big", 5, 10),  # more images than a batch: a batch of its own
                ("c", 1, 60), ("bad", 1, 30), ("d", 1, 60)]  # c + bad fit 100 pixels; d does not
        results = await asyncio.gather(*[batcher.submit(p, n, px) for p, n, px in jobs], return_exceptions=True)
        batcher.close()
        return results

    results = asyncio.run(submit_all())
    assert batches == [["a", "b"], ["big"], ["c", "bad"], ["d"]]
    assert [r[0] for r in results[:4]] == ["A", "B", "BIG", "C"] and results[5][0] == "D"
    assert isinstance(results[4], ValueError) and str(results[4]) == "bad is bad"
    assert results[0][1].images == 4 and results[3][1].images == 2


def test_an_open_batch_fills_while_a_call_runs_and_only_full_batches_run_side_by_side():
    """Two threads: a lone request runs at once; requests that come while it runs wait in the open
    batch (TF Serving would start them on the free thread, in a smaller batch) until that batch is
    full, which then runs beside the first; the rest run when a call ends."""
    started, first_may_end = [], threading.Event()

    def process(payloads):
        started.append(list(payloads))
        if payloads == ["a"]:
            assert first_may_end.wait(30), "the test never released the first call"
        return [p.upper() for p in payloads]

    options = BatchingOptions(max_batch_size=3, batch_timeout_micros=0, num_batch_threads=2, max_enqueued_batches=8)

    async def until(condition):
        for _ in range(3000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out; batches started: {started}")

    async def scenario():
        batcher = Batcher(process, options)
        jobs = [asyncio.create_task(batcher.submit("a", 1, 1))]
        await until(lambda: len(started) == 1)
        jobs += [asyncio.create_task(batcher.submit(p, 1, 1)) for p in "bc"]
        await asyncio.sleep(0.2)  # a free thread, but the first call runs: b and c keep waiting
        assert started == [["a"]]
        jobs.append(asyncio.create_task(batcher.submit("d", 1, 1)))  # fills the batch: it runs beside "a"
        await until(lambda: len(started) == 2)
        assert started[1] == ["b", "c", "d"] and not first_may_end.is_set()
        jobs.append(asyncio.create_task(batcher.submit("e", 1, 1)))
        await until(lambda: all(job.done() for job in jobs[1:4]))
        await asyncio.sleep(0.2)  # "b c d" ended, "a" still runs: "e" keeps waiting
        assert started == [["a"], ["b", "c", "d"]]
        first_may_end.set()
        results = await asyncio.gather(*jobs)
        batcher.close()
        return [result for result, _ in results]

    assert asyncio.run(scenario()) == ["A", "B", "C", "D", "E"]
    assert started == [["a"], ["b", "c", "d"], ["e"]]


def test_more_batch_threads_than_model_slots_are_refused_by_the_app_too(test_export, monkeypatch):
    monkeypatch.setattr(serving_app, "MODEL_CALLS_IN_FLIGHT", 1)
    with pytest.raises(ValueError, match="num_batch_threads 2 is more than the 1 model calls"):
        make_app(test_export, "model", ServingLimits(**LIMITS), batching=BatchingOptions(num_batch_threads=2))
