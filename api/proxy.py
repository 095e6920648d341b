"""The data plane: an HTTP request in, a task message on the deployment's queue, the result back out.

Plain ASGI rather than a FastAPI route, because this path runs for every request and needs control that
routing would hide: the body is refused as soon as it passes the size limit (before it is read whole),
and the response is written from the replica's result record exactly as the replica built it.

Every request is also a job: its id comes back in `X-Request-ID`, and `GET /jobs/{id}` finds its result
if the connection broke. `Prefer: respond-async, wait=N` turns a request still running after N seconds
into a `202` with the job's address.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import RedisCluster
from starlette.types import Receive, Scope, Send

from celery_serve._runtime.spec import AppSpec, DeploymentSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire import stopped_apps as _stopped_apps
from celery_serve._wire import strictjson
from celery_serve._wire.connections import REDIS_FAULTS
from celery_serve._wire.jobs import client_request_id
from celery_serve._wire.streams import STREAMING
from celery_serve._wire.transport import QueueTransport, Submitted, target_name
from celery_serve.api.routes import RouteTable
from celery_serve.exceptions import (
    BackpressureError,
    BadRequestError,
    PayloadTooLargeError,
    RequestIdInUseError,
    RequestTimeoutError,
    ServeError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from celery_serve.api.streaming import StreamRelay

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_CALL_METHOD_HEADER = b"x-serve-call-method"
_PREFER_HEADER = b"prefer"
_JSON = (b"content-type", b"application/json")
_PREFER_WAIT = re.compile(r"\bwait\s*=\s*(\d+(?:\.\d+)?)")


async def send_json(
    send: Send, status: int, payload: Any, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_payload(exc: ServeError, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"error": type(exc).__name__, "message": exc.message, **extra}
    if request_id:
        payload["request_id"] = request_id
    return payload


def accepted_payload(job_id: str) -> tuple[dict[str, Any], list[tuple[bytes, bytes]]]:
    """The body and headers of a `202 Accepted` for a job."""
    url = f"/jobs/{job_id}"
    return {"job_id": job_id, "status_url": url, "status": "queued"}, [
        (b"location", url.encode()),
        (REQUEST_ID_HEADER, job_id.encode()),
    ]


async def read_body(receive: Receive, content_length: bytes | None, limit: int, timeout_s: float = 30.0) -> bytes:
    """Read the request body, refusing it as soon as it is known to pass `limit` bytes (413), or when it has not
    all arrived `timeout_s` after the headers (408: a body trickled a byte at a time holds nothing for long).
    A client that disconnects before the end raises `ClientDisconnectedError`: a partial body is never queued."""
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
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnectedError("the client disconnected before its request body ended")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"request body passed the limit of {limit} bytes (SERVE_MAX_BODY_BYTES)")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise BodyTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s (SERVE_BODY_TIMEOUT_S); {size} bytes came"
        ) from None
    return b"".join(chunks)


class ClientDisconnectedError(ServeError):
    """The client went away while its request was being read: nothing is queued and nothing can be answered."""

    http_status = 499


class BodyTimeoutError(ServeError):
    """The request body did not arrive in time (408)."""

    http_status = 408


def check_json_body(scope: Scope, body: bytes) -> None:
    """Refuse a body that says it is JSON and is not strict JSON, before it is queued (`BadRequestError`)."""
    if not body:
        return
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media == b"application/json" or media.endswith(b"+json"):
                try:
                    strictjson.loads(body)
                except strictjson.NotJSONError as exc:
                    raise BadRequestError(f"request body is not valid JSON: {exc}") from None
            return


def http_envelope(scope: Scope, body: bytes, *, path: str | None = None, method: str | None = None) -> dict[str, Any]:
    """The HTTP request as it travels in the task message (the replica rebuilds a Starlette Request).

    A body declared as JSON must be strict JSON (`BadRequestError` otherwise): bad input is answered at the door.
    """
    check_json_body(scope, body)
    client = scope.get("client")
    server = scope.get("server")
    return {
        "method": method or scope["method"],
        "path": path or scope["path"],
        "query_string": scope.get("query_string", b"").decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body": base64.b64encode(body).decode() if body else "",
        "scheme": scope.get("scheme", "http"),
        "http_version": scope.get("http_version", "1.1"),
        "client": list(client) if client else None,
        "server": list(server) if server else None,
    }


ROUTED_SCOPE_KEY = "celery_serve.routed"


async def claim_request_id(redis: Any, chosen: bytes | str | None) -> str | None:
    """The caller's `X-Request-ID` when it sent a valid, unused one; None when it sent none (the transport
    then chooses one: on a Redis Cluster, one in the request's hash slot).

    A caller that chose its id knows it before any byte of the answer, so after a lost connection it can still
    `GET /jobs/{id}`. An id that already names a job is refused (409): it would read someone else's result. (On
    a cluster the request is usually stored under another id, which the chosen one leads to: `keys.alias`; the
    transport claims that atomically, and refuses a race's loser with 409 too.)
    """
    if chosen is None:
        return None
    task_id = client_request_id(chosen)
    taken = await redis.exists(_keys.job(task_id))
    if not taken and isinstance(redis, RedisCluster):  # the keys are in different slots: one EXISTS each
        taken = await redis.exists(_keys.alias(task_id))
    if taken:
        raise RequestIdInUseError(
            f"request id '{task_id}' already names a job; choose a new X-Request-ID "
            f"(GET /jobs/{task_id} reads the existing one)"
        )
    return task_id


class Proxy:
    def __init__(
        self, transport: QueueTransport, routes: RouteTable, max_body_bytes: int, body_timeout_s: float = 30.0
    ) -> None:
        self.transport = transport
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.streams: StreamRelay | None = None  # set by the gateway: relays streamed responses
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1003})
            return
        path = scope["path"]
        try:
            found = await self.routes.match_fresh(path, pick=True)  # a path no cached route matches reads Redis
        except REDIS_FAULTS as exc:
            await send_unavailable(send, path, exc)
            return
        if found is None:
            stopped = self.routes.stopped_for(path)
            if stopped is not None:  # its run is stopping or restarting: retry, rather than "no such thing"
                error = stopped.error()
                await send_json(send, error.http_status, error_payload(error), [_stopped_apps.RETRY_AFTER])
                return
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
        scope[ROUTED_SCOPE_KEY] = found  # which application the split picked, for the metrics
        _, dep = found
        method = "__call__"
        content_length = prefer = chosen_id = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = value
            elif name == REQUEST_ID_HEADER:
                chosen_id = value
            elif name == _CALL_METHOD_HEADER:
                method = value.decode("latin-1").strip()
            elif name == _PREFER_HEADER:
                prefer = value.decode("latin-1")
        try:
            body = await read_body(receive, content_length, self.max_body_bytes, self.body_timeout_s)
        except ClientDisconnectedError:
            return
        except (PayloadTooLargeError, BodyTimeoutError) as exc:
            await send_json(send, exc.http_status, error_payload(exc), [(b"connection", b"close")])
            return
        try:
            http = http_envelope(scope, body)
            task_id = await claim_request_id(self.transport.redis, chosen_id)
        except ServeError as exc:
            await send_json(send, exc.http_status, error_payload(exc))
            return
        except REDIS_FAULTS as exc:
            await send_unavailable(send, path, exc)
            return
        await self.forward(
            send, dep, method, http, spill_after_s=_spill_after(prefer), receive=receive, task_id=task_id
        )

    async def forward(
        self,
        send: Send,
        dep: DeploymentSpec | AppSpec,
        method: str,
        http: dict[str, Any],
        spill_after_s: float | None = None,
        receive: Receive | None = None,
        task_id: str | None = None,
    ) -> None:
        """Enqueue one HTTP request for a deployment and answer with its result (or relay its stream)."""
        started = time.perf_counter()
        task_id = task_id or self.transport.new_id(dep)
        id_header = (REQUEST_ID_HEADER, task_id.encode())
        try:
            sub = await self.transport.submit(dep, method, http=http, task_id=task_id)
            record = await self.transport.wait(sub, target_name(dep), timeout_s=spill_after_s)
        except BackpressureError as exc:
            await send_json(send, 503, error_payload(exc, task_id), [(b"retry-after", b"1"), id_header])
            return
        except RequestTimeoutError as exc:
            await send_json(send, 504, error_payload(exc, task_id), [id_header])
            return
        except ServeError as exc:  # e.g. the request was lost with Redis's data
            await send_json(send, exc.http_status, error_payload(exc, task_id), [id_header])
            return
        except REDIS_FAULTS as exc:  # after its one retry on a closed connection (see _wire.connections)
            self.routes.mark_stale()
            await send_unavailable(send, http["path"], exc, task_id)
            return
        if record is None:
            await self._accepted(send, sub)
            return
        if record.get("status") == STREAMING and self.streams is not None and receive is not None:
            await self.streams.live(send, receive, record, started, request_id=task_id)
            return
        await send_record(send, record, id_header, target_name(dep))

    async def _accepted(self, send: Send, sub: Submitted) -> None:
        payload, headers = accepted_payload(sub.request_id)
        del payload["status"]  # queued or already running: GET the status_url to know
        await send_json(send, 202, payload, headers)


async def send_unavailable(send: Send, path: str, exc: Exception, task_id: str | None = None) -> None:
    logger.error("Redis unavailable for %s: %s", path, exc)
    unavailable = ServiceUnavailableError(f"the queue service (Redis) is unavailable: {exc!r}; retry shortly")
    headers = [(b"retry-after", b"1")]
    if task_id:
        headers.append((REQUEST_ID_HEADER, task_id.encode()))
    await send_json(send, 503, error_payload(unavailable, task_id), headers)


async def send_record(send: Send, record: dict[str, Any], id_header: tuple[bytes, bytes], dep: str) -> None:
    """Write a result record as the HTTP response the replica built (or the error it carries)."""
    if record["status"] == _results.SUCCESS:
        response = record["result"]
        body = response["body"].encode() if response["body_encoding"] == "utf-8" else base64.b64decode(response["body"])
        headers = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in response["headers"] if k.lower() != "content-length"
        ]
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


def _spill_after(prefer: str | None) -> float | None:
    """`Prefer: respond-async, wait=N` -> N (seconds); None when the caller did not ask to spill."""
    if not prefer or "respond-async" not in prefer:
        return None
    match = _PREFER_WAIT.search(prefer)
    return float(match.group(1)) if match else 0.0
