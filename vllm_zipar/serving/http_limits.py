"""Bounds on the request head of vLLM's HTTP server: its size and header count (431), and a read timeout.

vLLM 0.32 serves with uvicorn, whose `http="auto"` picks httptools' parser when it is installed (it is
here) and h11 otherwise. vLLM's `--h11-max-incomplete-event-size` and `--h11-max-header-count` reach h11
only (and uvicorn never reads the count), so a 64 KiB header was accepted; and neither protocol times out a
connection whose request head never ends: uvicorn arms its keep-alive timer only after a response. The
protocols here subclass uvicorn's two, so the same bounds hold whichever one serves:

- the head (request line and header lines) may be at most `max_bytes`, and carry at most `max_count`
  headers; beyond either the client gets 431 with OpenAI's error body before the application sees the
  request, and the connection closes (the parser cannot resynchronise). A head that is still incomplete
  after `max_bytes` is refused as soon as that many bytes arrived, so neither parser buffers more.
- from the moment a connection opens, or the first byte of a later request on it arrives, its head must be
  complete within `timeout` seconds; otherwise the connection closes (with 408 if part of a head came).
  Between requests uvicorn's keep-alive timer applies, as before.

After a refusal the server stops sending, reads and drops what the client still sends for a moment
(`LINGER_SECONDS`) and then closes, so a client still writing its headers reads the answer instead of a
connection reset.
"""

from __future__ import annotations

import asyncio
import http
import json
import os
import select
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# 32 KiB: nginx's default for a whole request head (4 buffers of 8 KiB), so anything a default nginx in
# front of us forwards is accepted; an OpenAI client's head is well under 1 KiB and a browser's with cookies
# a few KiB; Node.js allows 16 KiB. Large enough for long bearer tokens, small enough that 1000 connections
# stalled at the limit hold 32 MiB.
DEFAULT_MAX_HEADER_BYTES = 32 << 10
# vLLM's own default for `--h11-max-header-count`, which now holds under httptools too.
DEFAULT_MAX_HEADER_COUNT = 256
# A client on a slow link sends a head (< 1 KiB) in well under a second; 10 s matches the request body's
# default timeout (`--request-body-timeout`) and bounds a slowloris connection.
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
MAX_HEADER_BYTES_ENV = "VLLM_ZIPAR_MAX_HEADER_BYTES"  # set by `vllm serve --max-header-bytes`
HEADER_TIMEOUT_ENV = "VLLM_ZIPAR_REQUEST_HEADER_TIMEOUT"  # set by `vllm serve --request-header-timeout`
LINGER_SECONDS = 2.0
LATE_LOOP_GRACE_SECONDS = 1.0
LINGER_MAX_BYTES = 1 << 20
LOGGER_NAME = "vllm.zipar.http"


@dataclass(frozen=True)
class HeadLimits:
    max_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_count: int = DEFAULT_MAX_HEADER_COUNT
    timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_count < 1 or not self.timeout > 0:
            raise ValueError(f"request head limits must be positive, got {self}")


def head_limits_from_env(max_count: int | None = None, environ: dict[str, str] | None = None) -> HeadLimits:
    """The limits our `vllm serve` flags set (environment variables); `max_count` is vLLM's
    `--h11-max-header-count` (None: its default)."""
    environ = dict(os.environ) if environ is None else environ
    return HeadLimits(
        max_bytes=int(environ.get(MAX_HEADER_BYTES_ENV, DEFAULT_MAX_HEADER_BYTES)),
        max_count=DEFAULT_MAX_HEADER_COUNT if max_count is None else int(max_count),
        timeout=float(environ.get(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_SECONDS)),
    )


def http_logger() -> Any:
    from vllm.logger import init_logger

    return init_logger(LOGGER_NAME)


def _bytes_waiting(transport: asyncio.BaseTransport) -> bool:
    """Whether the connection's socket has unread bytes (or an EOF) the loop has not delivered yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class HeadRefused(Exception):
    """Raised from a parser callback once the head was refused (the answer is already written)."""


def error_response(
    status: int, code: str, message: str, default_headers: Iterable[tuple[bytes, bytes]]
) -> bytes:
    """A whole HTTP/1.1 response carrying OpenAI's error body, closing the connection."""
    from vllm_zipar.serving.images_protocol import ImageAPIError

    body = json.dumps(ImageAPIError(message, code=code, status=status).body()).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    lines += [
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n\r\n",
    ]
    return b"".join(lines) + body


class HeadWatch:
    """One connection's current request head: bytes and headers so far, and the timer that closes it.

    `awaiting` is true from the connection's start, and again after each request's body, until the next
    head is complete; `raw_bytes` counts what arrived meanwhile."""

    def __init__(self, limits: HeadLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.default_headers: list[tuple[bytes, bytes]] = []
        self.client: Any = None
        self.awaiting = True
        self.raw_bytes = 0
        self.size = 0
        self.count = 0
        self.refused = False
        self.discarded = 0
        self.timer: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ connection

    def start(
        self, transport: asyncio.Transport, default_headers: list[tuple[bytes, bytes]], client: Any
    ) -> None:
        self.transport = transport
        self.default_headers = default_headers
        self.client = client
        self._arm()  # a fresh connection owes us its first head

    def stop(self) -> None:
        for handle in (self.timer, self.linger):
            if handle is not None:
                handle.cancel()
        self.timer = self.linger = None

    def received(self, nbytes: int) -> bool:
        """Before the parser sees `nbytes` more: False when they are to be dropped (after a refusal)."""
        if self.refused:
            self.discarded += nbytes
            if self.discarded > LINGER_MAX_BYTES and self.transport is not None:
                self.transport.close()
            return False
        if self.awaiting:
            self._arm()  # the first byte of a request after an idle keep-alive connection starts the clock
            self.raw_bytes += nbytes
        return True

    def after_feed(self) -> None:
        """The parser has taken the data: a head still incomplete beyond the limit is refused now."""
        if self.awaiting and not self.refused and self.raw_bytes > self.limits.max_bytes:
            self._refuse_size(self.raw_bytes, complete=False)

    # ------------------------------------------------------------ the parsed head

    def begin(self) -> None:
        self.size = 0
        self.count = 0

    def add(self, nbytes: int, headers: int = 0) -> None:
        """`nbytes` more of the head, `headers` more header lines; raises HeadRefused beyond a limit."""
        self.size += nbytes
        self.count += headers
        if self.count > self.limits.max_count:
            self._refuse(
                431,
                "request_header_fields_too_large",
                f"The request has more than {self.limits.max_count} headers, this server's limit "
                "(vllm serve --h11-max-header-count).",
            )
            raise HeadRefused()
        if self.size > self.limits.max_bytes:
            self._refuse_size(self.size, complete=True)
            raise HeadRefused()

    def complete(self) -> None:
        """The head is complete and within bounds: the request goes to the application."""
        self.awaiting = False
        self.raw_bytes = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def message_complete(self) -> None:
        """The request's body ended: whatever arrives next starts a new head (idle time is keep-alive's)."""
        self.awaiting = True
        self.raw_bytes = 0

    # ------------------------------------------------------------ answers

    def _arm(self) -> None:
        if self.timer is None and not self.refused:
            self.timer = self.loop.call_later(self.limits.timeout, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if not self.awaiting or self.refused or self.transport is None or self.transport.is_closing():
            return
        if _bytes_waiting(self.transport):
            # The loop ran late (uvloop runs due timers before it polls sockets): the head may be waiting
            # in the kernel, sent in time. Let the loop read it, then look again.
            self.timer = self.loop.call_later(LATE_LOOP_GRACE_SECONDS, self._expired)
            return
        if self.raw_bytes == 0:  # opened and never used (a browser's preconnect): close, nothing to answer
            self.refused = True
            self.transport.close()
            return
        self._refuse(
            408,
            "request_timeout",
            f"The request headers did not arrive within {self.limits.timeout:g} s "
            "(vllm serve --request-header-timeout).",
        )

    def _refuse_size(self, nbytes: int, complete: bool) -> None:
        so_far = "" if complete else " so far"
        self._refuse(
            431,
            "request_header_fields_too_large",
            f"The request line and headers ({nbytes} bytes{so_far}) are larger than this server's limit of "
            f"{self.limits.max_bytes} bytes (vllm serve --max-header-bytes).",
        )

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer, stop sending, drop what still arrives for a moment, then close."""
        self.refused = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        http_logger().info("HTTP %d to %s: %s", status, client, message)
        transport.write(error_response(status, code, message, self.default_headers))
        if transport.can_write_eof():
            transport.write_eof()
            self.linger = self.loop.call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn 0.55's httptools protocol with `HeadLimits` (the class attribute is set per server)."""

    limits: ClassVar[HeadLimits] = HeadLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head = HeadWatch(self.limits, self.loop)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head.start(transport, self.server_state.default_headers, self.client)

    def connection_lost(self, exc: Exception | None) -> None:
        self.head.stop()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn 0.55's `data_received`, with the head counted and our refusals told from parse errors.
        if not self.head.received(len(data)):
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            if isinstance(err.__context__, HeadRefused):
                return  # answered with 431 already
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        self.head.after_feed()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head.begin()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.head.add(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.add(len(name) + len(value) + 4, headers=1)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # The method, " HTTP/1.1\r\n" and the blank line, then the same bound as while the head came in.
        self.head.add(len(self.parser.get_method()) + 13)
        self.head.complete()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head.message_complete()


class LimitedH11Protocol(H11Protocol):
    """uvicorn 0.55's h11 protocol with `HeadLimits` (h11 hands over a head once it is complete)."""

    limits: ClassVar[HeadLimits] = HeadLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head = HeadWatch(self.limits, self.loop)
        self._next_h11_event = self.conn.next_event
        self.conn.next_event = self._next_event  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head.start(transport, self.server_state.default_headers, self.client)

    def connection_lost(self, exc: Exception | None) -> None:
        self.head.stop()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.head.received(len(data)):
            return
        super().data_received(data)
        self.head.after_feed()

    def _next_event(self) -> Any:
        event = self._next_h11_event()
        if isinstance(event, h11.Request):
            self.head.begin()
            line = len(event.method) + len(event.target) + len(event.http_version) + 9  # " ", " HTTP/", CRLFs
            try:
                self.head.add(
                    line + sum(len(name) + len(value) + 4 for name, value in event.headers),
                    headers=len(event.headers),
                )
            except HeadRefused:
                return h11.NEED_DATA  # answered with 431 already; uvicorn's loop stops here
            self.head.complete()
        elif isinstance(event, h11.EndOfMessage):
            self.head.message_complete()
        return event


def limited_protocol_class(http: Any, limits: HeadLimits) -> type[asyncio.Protocol] | None:
    """uvicorn's protocol class for `http` ("auto", "h11", "httptools" or a class) with `limits`, or None
    for a protocol we do not wrap (uvicorn's "zttp", a custom class)."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base = import_from_string(HTTP_PROTOCOLS.get(http, http)) if isinstance(http, str) else http
    limited: type[LimitedHttpToolsProtocol] | type[LimitedH11Protocol]
    if base is HttpToolsProtocol:
        limited = LimitedHttpToolsProtocol
    elif base is H11Protocol:
        limited = LimitedH11Protocol
    else:
        return None
    return type(limited.__name__, (limited,), {"limits": limits})
