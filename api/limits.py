"""Connection-level limits for the gateway: what one slow or malicious client may hold.

uvicorn's HTTP protocol has no deadline for reading a request's headers and no limit on their size or number
(a connection that sends nothing, or one header byte a second, stays open for ever; a 1 MiB header is accepted).
`guarded_protocol()` returns uvicorn's httptools protocol with those limits added where they must live, before
any request reaches the app:

- a header deadline (`SERVE_HEADER_TIMEOUT_S`, 10 s): from the connection's start, or a request's first byte,
  to the end of its headers; a connection that misses it gets `408` and is closed;
- header size (`SERVE_MAX_HEADER_BYTES`, 16 KiB for the request line and all headers) and number
  (`SERVE_MAX_HEADERS`, 100): `431`, then the connection is closed;
- open connections: at most `SERVE_MAX_CONNECTIONS` (10,000) in all and `SERVE_MAX_CONNECTIONS_PER_CLIENT`
  (2048) from one address; one more gets `503` at once and is closed. (Idle sockets cost little once the
  header deadline closes those that send nothing.)

The body's deadline (`SERVE_BODY_TIMEOUT_S`) is kept where the body is read (`celery_serve.api.proxy.read_body`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    max_connections: int = 10_000
    max_connections_per_client: int = 2048


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing a request that has been answered and closed."""


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` (one class per gateway: the counts are the gateway's)."""
    per_client: collections.Counter[str] = collections.Counter()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._in_headers = True
            self._rejected = False
            self._peer: str | None = None

        # --- connections ---------------------------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._peer = self.client[0] if self.client else None
            if self._peer is not None:
                per_client[self._peer] += 1
            if len(self.connections) > limits.max_connections:
                self._reject(503, f"the gateway holds its limit of {limits.max_connections} connections")
            elif self._peer is not None and per_client[self._peer] > limits.max_connections_per_client:
                self._reject(503, f"this client holds its limit of {limits.max_connections_per_client} connections")
            else:
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            if self._peer is not None:
                per_client[self._peer] -= 1
                if per_client[self._peer] <= 0:
                    del per_client[self._peer]
                self._peer = None
            super().connection_lost(exc)

        # --- the header deadline and sizes ---------------------------------------------------------

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_deadline_passed)

        def _disarm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline_passed(self) -> None:
            self._header_timer = None
            if self._in_headers and not self.transport.is_closing():
                self._reject(408, f"the request's headers did not arrive within {limits.header_timeout_s:g} s")

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                return
            if self._in_headers:
                self._header_bytes += len(data)
            try:
                super().data_received(data)
            except _Rejected:  # pragma: no cover - uvicorn catches parser errors itself; kept for safety
                return
            if (
                not self._rejected
                and self._in_headers
                and self._header_bytes > limits.max_header_bytes + 4  # + the blank line ending them
            ):
                self._reject(431, f"request headers pass the limit of {limits.max_header_bytes} bytes")

        def send_400_response(self, msg: str) -> None:
            if self._rejected:  # the parser stopped because we answered already (a callback raised _Rejected)
                return
            super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:  # the next request on a kept-alive connection
                self._in_headers = True
                self._header_bytes = 0
                self._arm_header_deadline()

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            if len(self.headers) > limits.max_headers:
                self._reject(431, f"the request has more than {limits.max_headers} headers")
                raise _Rejected

        def on_headers_complete(self) -> None:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > limits.max_header_bytes:
                self._reject(431, f"request headers pass the limit of {limits.max_header_bytes} bytes")
                raise _Rejected
            self._in_headers = False
            self._disarm_header_deadline()
            super().on_headers_complete()

        # --- answering without the app ------------------------------------------------------------

        def _reject(self, status: int, message: str) -> None:
            """Answer `status` with a JSON error and close the connection (nothing reached the app)."""
            if self._rejected:
                return
            self._rejected = True
            self._disarm_header_deadline()
            logger.warning("%s from %s: %s", status, self._peer or "?", message)
            error = {408: "RequestTimeoutError", 431: "HeadersTooLargeError", 503: "ServiceUnavailableError"}[status]
            body = json.dumps({"error": error, "message": message}).encode()
            head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
            headers = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)
            if status == 503:
                headers += b"retry-after: 1\r\n"
            if not self.transport.is_closing():
                self.transport.write(head + headers + b"\r\n" + body)
                self.transport.close()

    return GuardedHttpToolsProtocol
