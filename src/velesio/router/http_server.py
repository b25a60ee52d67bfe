"""The router's HTTP connections: aiohttp's request handler with a deadline for request heads, and the HTTP
parser's own errors in the reference's JSON error shape.

- **Slow or silent clients.** A connection must deliver a complete request line and headers within
  ``router.header_timeout_s`` of opening, and within that long of the first byte of each later request on
  it; otherwise it gets ``408`` (the seed's error body) and is closed. An idle keep-alive connection is
  closed after ``router.keepalive_s`` (aiohttp's keep-alive timeout). A body that does not arrive within
  ``router.body_timeout_s`` is the handler's 408 (router/validation.py ``read_body``). So no client can
  hold a descriptor longer than those bounds by sending slowly, or by announcing a body it never sends.
- **Requests the HTTP parser refuses** (an unknown method, ``HTTP/9.9``, a header line over 64 KB, a
  duplicate ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``, a raw non-ASCII path, a
  ``Content-Encoding`` the router cannot decode ...) never reach the application: aiohttp answers them
  itself, in ``text/plain``. Here they get the seed's JSON error body (415 ``unsupported_media_type`` for
  an unknown Content-Encoding, else 400 ``invalid_request``) and one log line, no traceback. The request's
  path is not known there (the parser gave up before it, or it is not to be trusted), so the shape is
  always the seed's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong

from .dialects.base import seed_error
from .errors import ApiError

log = logging.getLogger("velesio.router")


def _reason(exc: BaseException | None, fallback: str | None = None) -> str:
    """The first line of a parser error's message, without the raw bytes it quotes (at most 160 characters)."""
    text = getattr(exc, "message", None) or (str(exc) if exc else "") or fallback or "bad request"
    text = re.sub(r"^\s*\d{3}, message:\s*", "", str(text))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "bad request")
    first = first.rstrip(":").strip()
    return first if len(first) <= 160 else first[:157] + "..."


def parser_error(exc: BaseException | None, message: str | None) -> ApiError:
    """The ApiError a request refused by the HTTP parser is answered with."""
    if isinstance(exc, ContentEncodingError):
        return ApiError("unsupported_media_type", "the request's Content-Encoding is not supported; send the "
                        "body uncompressed, or gzip or deflate encoded")
    if isinstance(exc, LineTooLong):
        return ApiError("invalid_request", "the request line or a header line is too long (at most 65536 bytes)")
    return ApiError("invalid_request", f"malformed HTTP request: {_reason(exc, message)}")


def error_bytes(err: ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying ``err`` in the seed's shape, for a connection about to close."""
    body = json.dumps(seed_error(err), separators=(",", ":")).encode()
    phrase = {408: "Request Timeout"}.get(err.status, "Error")
    head = (f"HTTP/1.1 {err.status} {phrase}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class RequestHandler(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol, with a deadline on request heads and JSON parser errors."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._head_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = -1  # requests parsed on this connection when the deadline was set

    # ---- the deadline on request heads ------------------------------------------------------------
    def _waiting_for_head(self) -> bool:
        """True while the connection waits for (the rest of) a request line and headers."""
        waiter = getattr(self, "_waiter", None)
        return waiter is not None and not waiter.done()

    def _arm(self) -> None:
        count = getattr(self, "_request_count", 0)
        if self._head_timer is not None and self._head_count == count:
            return  # this head's deadline is already running
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_count = count
        self._head_timer = asyncio.get_running_loop().call_later(self._head_timeout, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if getattr(self, "_request_count", 0) != self._head_count or not self._waiting_for_head():
            return  # the head arrived in time
        transport = self.transport
        if transport is not None and not transport.is_closing():
            peer = transport.get_extra_info("peername")
            log.info("closing a connection from %s: no complete request head within %gs",
                     peer[0] if isinstance(peer, tuple) and peer else "?", self._head_timeout)
            transport.write(error_bytes(ApiError(
                "request_timeout", f"the request line and headers did not arrive within {self._head_timeout:g} s")))
        self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # the first request's head

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():  # bytes of a request head, not of a body a handler is reading
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    # ---- errors of the HTTP parser ---------------------------------------------------------------
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:  # an exception outside the middlewares: a bug, logged with its traceback
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send the error")
        err = parser_error(exc, message)
        log.info("refused a malformed HTTP request from %s: %s (%d)", request.remote, _reason(exc, message),
                 err.status)
        response = web.Response(body=json.dumps(seed_error(err), separators=(",", ":")).encode(),
                                status=err.status, content_type="application/json", charset="utf-8")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, (HttpProcessingError, web_protocol.RequestPayloadError)):
            # the rest of a body that did not match its Content-Encoding, met while draining it after the
            # handler answered 400: the connection closes; nothing to report beyond a line
            log.info("closing a connection: %s", _reason(exc))
            return
        super().log_exception(*args, **kwargs)


async def listen(runner: web.AppRunner, host: str, port: int, *, header_timeout: float,
                 handler_kwargs: dict[str, Any]) -> asyncio.AbstractServer:
    """Listen on ``host:port`` with ``runner``'s application (``runner.setup()`` done) behind
    ``RequestHandler``. Close the returned server before ``runner.cleanup()``."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()

    def factory() -> RequestHandler:
        return RequestHandler(server, loop=loop, header_timeout=header_timeout, **handler_kwargs)

    return await loop.create_server(factory, host, port, reuse_address=True)
