"""The data plane: an HTTP request in, a task message on the deployment's queue, the result back out.

Plain ASGI rather than a FastAPI route, because this path runs for every request and needs control that
routing would hide: the body is refused as soon as it passes the size limit (before it is read whole),
and the response is written from the replica's result record exactly as the replica built it.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import redis.exceptions
from starlette.types import Receive, Scope, Send

from app import _results
from app._envelope import new_task_id
from app._transport import QueueTransport
from app.exceptions import (
    BackpressureError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServeError,
)
from api.routes import RouteTable

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_CALL_METHOD_HEADER = b"x-serve-call-method"
_JSON = (b"content-type", b"application/json")


async def send_json(send: Send, status: int, payload: Any, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_payload(exc: ServeError, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"error": type(exc).__name__, "message": exc.message, **extra}
    if request_id:
        payload["request_id"] = request_id
    return payload


class Proxy:
    def __init__(self, transport: QueueTransport, routes: RouteTable, max_body_bytes: int) -> None:
        self.transport = transport
        self.routes = routes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1003})
            return
        path = scope["path"]
        found = await self.routes.match_fresh(path)
        if found is None:
            await send_json(
                send,
                404,
                {
                    "error": "DeploymentNotFoundError",
                    "message": f"no application serves {path}; known route prefixes are listed in 'routes'",
                    "routes": self.routes.routes,
                },
            )
            return
        app_spec, dep = found
        method = "__call__"
        content_length = None
        headers: list[list[str]] = []
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = value
            elif name == _CALL_METHOD_HEADER:
                method = value.decode("latin-1").strip()
            headers.append([name.decode("latin-1"), value.decode("latin-1")])
        try:
            body = await self._read_body(receive, content_length)
        except PayloadTooLargeError as exc:
            await send_json(send, 413, error_payload(exc), [(b"connection", b"close")])
            return

        task_id = new_task_id()
        id_header = (REQUEST_ID_HEADER, task_id.encode())
        client = scope.get("client")
        server = scope.get("server")
        http = {
            "method": scope["method"],
            "path": path,
            "query_string": scope.get("query_string", b"").decode("latin-1"),
            "headers": headers,
            "body": base64.b64encode(body).decode() if body else "",
            "scheme": scope.get("scheme", "http"),
            "http_version": scope.get("http_version", "1.1"),
            "client": list(client) if client else None,
            "server": list(server) if server else None,
        }
        try:
            _, fut, deadline = await self.transport.submit(dep, method, http=http, task_id=task_id)
            record = await self.transport.wait(task_id, fut, deadline, dep.name)
        except redis.exceptions.RedisError as exc:
            logger.error("Redis unavailable for %s: %s", path, exc)
            unavailable = ServeError(f"the queue service (Redis) is unavailable: {exc}; retry shortly")
            await send_json(send, 503, error_payload(unavailable, task_id), [(b"retry-after", b"1"), id_header])
            return
        except BackpressureError as exc:
            await send_json(send, 503, error_payload(exc, task_id), [(b"retry-after", b"1"), id_header])
            return
        except RequestTimeoutError as exc:
            await send_json(send, 504, error_payload(exc, task_id), [id_header])
            return
        await self._respond(send, record, id_header, app_spec.name, dep.name)

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.max_body_bytes
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                declared = 0
            if declared > limit:
                raise PayloadTooLargeError(
                    f"request body is {declared} bytes; the limit is {limit} bytes (SERVE_MAX_BODY_BYTES)"
                )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"request body passed the limit of {limit} bytes (SERVE_MAX_BODY_BYTES)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _respond(self, send: Send, record: dict[str, Any], id_header: tuple[bytes, bytes], app: str, dep: str) -> None:
        if record["status"] == _results.SUCCESS:
            response = record["result"]
            body = response["body"].encode() if response["body_encoding"] == "utf-8" else base64.b64decode(response["body"])
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response["headers"] if k.lower() != "content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            headers.append(id_header)
            await send({"type": "http.response.start", "status": response["status_code"], "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        error = record.get("result") or {}
        status = int(record.get("http_status") or 500)
        payload = {
            "error": error.get("exc_type", "Exception"),
            "message": error.get("exc_message", ""),
            "deployment": error.get("deployment", dep),
            "request_id": record.get("task_id"),
        }
        await send_json(send, status, payload, [id_header])
