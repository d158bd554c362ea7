"""What the server may hold at once: its connection limits, the uvicorn protocol that enforces the
ones uvicorn lacks, and the most memory those limits allow.

uvicorn (0.55, httptools) answers 503 past `limit_concurrency` and closes idle keep-alive
connections, but it accepts every connection, never times out one that has not sent a whole request
head, and buffers a head of any size (a 20 MB header grew a bare uvicorn app by 20 MB). So
`LimitedHttpToolsProtocol` adds, per connection: a cap on open connections (503 and close at once),
a deadline and a size limit for each request head, and the body deadline for the rest of a body
answered before it all arrived (a 413 from Content-Length). The app keeps the body deadline of the
bodies it reads (`app.read_body_within`), so that it can answer 408.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from trainer.serving.request_checks import ServingLimits

log = logging.getLogger("trainer.serve")

# A request line and headers still unfinished past this are refused: h11's limit (uvicorn's other parser).
# A head that arrives whole in one read is parsed, so it may hold up to that read (256 KiB).
MAX_HEAD_BYTES = 16 * 2**10
# What one connection holds besides its body: its request head (MAX_HEAD_BYTES plus one read of up
# to 256 KiB), uvicorn's buffer of body bytes (it stops reading past 64 KiB, plus one read), and the
# connection's own objects and its response.
CONNECTION_BUFFER_BYTES = (MAX_HEAD_BYTES + 256 * 2**10) + (64 * 2**10 + 256 * 2**10) + 64 * 2**10
# Parsing one body holds the JSON's base64 strings and the decoded images next to the body: 2 bodies more.
PARSE_BODIES = 2
# One model slot's decode: TF's uint8 RGB (3 bytes a pixel) of every image of the call, the PNG that
# formats TF cannot read become (up to 3 bytes a pixel, held for the call), and PIL's working copies
# while converting one image (decoded RGBA, its RGB copy, a white canvas: up to 10 bytes a pixel).
DECODE_BYTES_PER_PIXEL = 3 + 3 + 10


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 64  # open connections, and requests in progress (uvicorn's limit_concurrency)
    header_timeout_s: float = 10.0  # from a connection's opening, or a request's first byte, to its last header
    body_timeout_s: float = 60.0  # from the last header to the last body byte: 10 MiB at ~1.4 Mbit/s
    keep_alive_timeout_s: float = 5.0  # idle time between requests: uvicorn's default

    def __post_init__(self):
        for name in ("max_connections", "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MemoryBound:
    """The most memory (RSS) the server can use, term by term, in bytes."""
    at_start: int  # the process once the model is loaded and warmed up
    connections: int  # max_connections x (head and buffers + the body)
    parsing: int  # parse slots x the two bodies' worth a parse holds besides the body
    decoding: int  # model slots x decode bytes a pixel x the pixels of one model call

    @property
    def total(self) -> int:
        return self.at_start + self.connections + self.parsing + self.decoding

    def describe(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        return (f"{mib(self.total)} = {mib(self.at_start)} at start + {mib(self.connections)} for connections "
                f"+ {mib(self.parsing)} for parsing + {mib(self.decoding)} for decoding")


def memory_bound(at_start: int, connections: ConnectionLimits, limits: ServingLimits,
                 parse_slots: int, model_slots: int) -> MemoryBound:
    """The bound from the limits: at_start + C x (672 KiB + B) + P x 2B + S x 16 bytes x R, for C
    connections, P parse slots, S model slots, B the body limit and R the pixels of one model call."""
    body = limits.max_body_bytes
    return MemoryBound(
        at_start=at_start,
        connections=connections.max_connections * (CONNECTION_BUFFER_BYTES + body),
        parsing=parse_slots * PARSE_BODIES * body,
        decoding=model_slots * DECODE_BYTES_PER_PIXEL * limits.max_request_pixels)


def resident_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def _plain_response(status: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


_UNAVAILABLE = _plain_response("503 Service Unavailable", "too many connections (--max_connections); retry later")
_HEAD_TIMEOUT = _plain_response("408 Request Timeout", "the request head came too slowly (--header_timeout_s)")
_HEAD_TOO_LARGE = _plain_response("431 Request Header Fields Too Large",
                                  f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")


class OneWritePerStep:
    """A transport whose writes of one event-loop step leave in one send, at the end of that step.

    uvicorn writes a response's head and its body separately, so each answer cost two sends, two TCP
    segments and two wake-ups of the client; a Starlette response sends both in one step. Closing
    sends what is pending first. Everything else is the wrapped transport's.
    """

    def __init__(self, transport, loop):
        self._transport, self._loop, self._pending = transport, loop, []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)  # uvloop: one writev

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def make_protocol_class(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` on connections and request heads (uvicorn.Config(http=...))."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        reading_head = True  # from a connection's start, or a request's first byte, to the request's last header
        head_bytes = 0
        head_deadline = None
        discard_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.transport = OneWritePerStep(transport, self.loop)  # the request cycles write through it
            if len(self.connections) > limits.max_connections:
                log.warning("refused a connection: %d are open (--max_connections)", limits.max_connections)
                transport.write(_UNAVAILABLE)
                transport.close()
                return
            self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            self._disarm_head_deadline()
            if self.discard_deadline is not None:
                self.discard_deadline.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Counted after parsing, so a head and body in one read count only if the head is unfinished.
            # httptools buffers an unfinished header itself: this bounds that to one read past the limit.
            if self.reading_head and not self.transport.is_closing():
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES:
                    log.warning("closed a connection whose request head exceeds %d bytes", MAX_HEAD_BYTES)
                    self._answer_and_close(_HEAD_TOO_LARGE)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.reading_head, self.head_bytes = True, 0
            self._arm_head_deadline()

        def on_headers_complete(self) -> None:
            self.reading_head = False
            self._disarm_head_deadline()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
                # Answered before its body arrived (413 from Content-Length, 404): uvicorn discards the
                # rest. Closing now would reset the connection under a client still sending, which then
                # never reads the answer; so it may finish within the body timeout.
                self.discard_deadline = self.loop.call_later(limits.body_timeout_s, self._discard_timed_out)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self.discard_deadline is not None:
                self.discard_deadline.cancel()
                self.discard_deadline = None

        def _discard_timed_out(self) -> None:
            self.discard_deadline = None
            if not self.transport.is_closing():
                log.info("closed a connection whose unwanted body did not end within %g s (--body_timeout_s)",
                         limits.body_timeout_s)
                self.transport.close()

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            self.head_deadline = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def _disarm_head_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _head_timed_out(self) -> None:
            self.head_deadline = None
            if not self.transport.is_closing():
                log.info("closed a connection that sent no whole request head within %g s (--header_timeout_s)",
                         limits.header_timeout_s)
                self._answer_and_close(_HEAD_TIMEOUT)

        def _answer_and_close(self, response: bytes) -> None:
            self._disarm_head_deadline()
            if self.cycle is None or self.cycle.response_complete:  # not into a response going out
                self.transport.write(response)
            self.transport.close()

    return LimitedHttpToolsProtocol


def uvicorn_config(app, host: str, port: int, limits: ConnectionLimits, access_log: bool = False):
    """The uvicorn.Config that serves `app` within `limits` (`uvicorn.Server(config).run()`). No access
    log by default, as TF Serving: a line per request cost 0.1-0.2 ms of a single image's 1.4 ms of CPU."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="info", http=make_protocol_class(limits),
                          access_log=access_log,
                          limit_concurrency=limits.max_connections,
                          timeout_keep_alive=limits.keep_alive_timeout_s)
