"""Server-side batching as TensorFlow Serving does it (`--enable_batching`): concurrent requests are
merged into one model call, and each gets its own share of the answer back.

A request joins the open batch if it fits (at most `max_batch_size` images and `max_batch_pixels`
pixels in all); else that batch closes and a new one opens. A closed (full) batch runs on one of
`num_batch_threads` threads as soon as one is free. The open batch runs once `batch_timeout_micros`
have passed since it opened and no model call is running: while one runs, the open batch keeps
filling, since that call already has every core (the export's tf.map_fn spreads its images over
TensorFlow's thread pool). So with a timeout of 0 a lone request runs at once, and under load
requests gather into one batch per call. With 16 clients of single images on 2 cores that served
1,353-1,361 images/s, where starting an open batch on any free thread (TF Serving's rule) served
1,020-1,083: two half-size batches side by side (measured as one batch thread against two, which
is what the two rules come to with 16 clients). At most `max_enqueued_batches` wait: a request
that would need one more is refused at once (QueueFull), never left to wait without bound.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's batching knobs (its names), plus the pixel budget of one call."""
    max_batch_size: int = 32  # images per model call
    # 0, as TF Serving's guide suggests starting with on CPU: batches still fill while a call runs.
    batch_timeout_micros: int = 0
    # Batches waiting for a thread, the open one included. As many as the server's default connection
    # limit (every batch holds a request), so by default only that limit refuses; lower it to fail fast.
    max_enqueued_batches: int = 64
    # Model calls in flight: one per core, as TF Serving advises on CPU. Only full batches run side by
    # side, though (`Batcher`): the export's call already spreads its images over every core.
    num_batch_threads: int = max(1, os.cpu_count() or 1)
    max_batch_pixels: int = 100_000_000  # decoded pixels of one call: bounds its memory (the server passes its per-request limit)

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads", "max_batch_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must be 0 or more, got {self.batch_timeout_micros}")


class QueueFull(Exception):
    """Every batch slot of the queue is taken; the message names the limit."""


@dataclasses.dataclass(frozen=True)
class BatchTiming:
    """When the batch a request rode in started and finished (time.perf_counter()), and its size."""
    started: float
    finished: float
    images: int


@dataclasses.dataclass
class _Batch:
    opened: float  # the event loop's clock
    payloads: list = dataclasses.field(default_factory=list)
    futures: list = dataclasses.field(default_factory=list)
    images: int = 0
    pixels: int = 0
    closed: bool = False


class Batcher:
    """Runs `process(payloads) -> one result or exception per payload` on batches of submitted payloads.

    `submit` is called from the event loop; `process` runs on the batcher's own threads and must
    return an exception (not raise it) for a payload that failed alone, so that the others of its
    batch still get their results. If `process` raises, every request of that batch gets the error.
    """

    def __init__(self, process: Callable[[list], Sequence[Any]], options: BatchingOptions):
        self._process = process
        self.options = options
        self._waiting: collections.deque[_Batch] = collections.deque()  # only the last can be open
        self._idle_threads = options.num_batch_threads
        self._threads = concurrent.futures.ThreadPoolExecutor(options.num_batch_threads, thread_name_prefix="batch")
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, payload: Any, images: int, pixels: int) -> tuple[Any, BatchTiming]:
        """The result `process` gave for `payload` (raised if it is an exception), and its batch's timing.
        Raises QueueFull at once when no batch can take it."""
        loop = asyncio.get_running_loop()
        batch = self._open_batch_for(images, pixels, loop)
        future = loop.create_future()
        batch.payloads.append(payload)
        batch.futures.append(future)
        batch.images += images
        batch.pixels += pixels
        if batch.images >= self.options.max_batch_size:
            batch.closed = True
        self._dispatch()
        return await future

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _open_batch_for(self, images: int, pixels: int, loop: asyncio.AbstractEventLoop) -> _Batch:
        last = self._waiting[-1] if self._waiting else None
        if last is not None and not last.closed:
            fits = (last.images + images <= self.options.max_batch_size
                    and last.pixels + pixels <= self.options.max_batch_pixels)
            if fits:
                return last
            last.closed = True
        if len(self._waiting) >= self.options.max_enqueued_batches:
            raise QueueFull(f"{len(self._waiting)} batches are waiting for a model call, the limit "
                            f"(--max_enqueued_batches {self.options.max_enqueued_batches}); retry later")
        batch = _Batch(opened=loop.time())
        self._waiting.append(batch)
        return batch

    def _dispatch(self) -> None:
        """Starts every batch that is due while a thread is free; arms a timer for an open one that is
        not due yet. An open batch that is due waits while a call runs: that call's end dispatches it."""
        loop = asyncio.get_running_loop()
        while self._idle_threads and self._waiting:
            front = self._waiting[0]
            if not front.closed:
                due = front.opened + self.options.batch_timeout_micros / 1e6
                if loop.time() < due:
                    if self._timer is None:
                        self._timer = loop.call_at(due, self._on_timer)
                    return
                if self._idle_threads < self.options.num_batch_threads:  # a call is running
                    return
            self._waiting.popleft()
            self._idle_threads -= 1
            running = loop.run_in_executor(self._threads, self._run, front.payloads)
            running.add_done_callback(lambda done, batch=front: self._finished(batch, done))

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _run(self, payloads: list) -> tuple[Sequence[Any], float, float]:
        started = time.perf_counter()
        results = self._process(payloads)
        return results, started, time.perf_counter()

    def _finished(self, batch: _Batch, done: asyncio.Future) -> None:
        self._idle_threads += 1
        error = None if done.cancelled() else done.exception()
        if error is None and not done.cancelled():
            results, started, finished = done.result()
            timing = BatchTiming(started, finished, batch.images)
        for index, future in enumerate(batch.futures):
            if future.done():  # its request was cancelled (the server is stopping)
                continue
            if done.cancelled():  # the batcher was closed before this batch ran
                future.cancel()
            elif error is not None:
                future.set_exception(error)
            elif isinstance(results[index], BaseException):
                future.set_exception(results[index])
            else:
                future.set_result((results[index], timing))
        self._dispatch()
