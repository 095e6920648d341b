"""Streamed HTTP responses: relaying a replica's stream to the client as it comes, and resuming it.

    (any route)                  a deployment that streams answers with its status and headers (and
                                 X-Request-ID) at once, then each chunk as the replica yields it
    GET /jobs/{id}/stream        replays the stream from its first chunk and follows it to its end;
                                 ?from=N starts at chunk N (0-based); with `Accept: text/event-stream`
                                 the chunks come as server-sent events whose ids are the chunk indices, and
                                 `Last-Event-ID: K` resumes after chunk K

Chunks are read from Redis by the transport's `StreamHub` (one connection and one blocking XREAD for every
stream this gateway relays), so a stream costs no thread and no connection here. A stream that ends with an
error ends a server-sent-event response with an `error` event; any other response is cut off without its
final chunk, which every HTTP client reports as an incomplete body (never a silent short 200).

When the client of a synchronous request goes away and no client is attached to its stream again within
the grace period (`SERVE_STREAM_DISCONNECT_GRACE_S`, default 5 s), the request is cancelled, which stops
the generator in the replica. A stream submitted as a job (`POST /jobs/...`) runs to its end.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis.exceptions
from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import Receive, Scope, Send

from celery_serve._wire import keys as _keys
from celery_serve._wire import streams as _streams
from celery_serve._wire.jobs import TERMINAL, JobStore, check_job_id
from celery_serve._wire.transport import QueueTransport
from celery_serve.exceptions import BadRequestError, DeploymentConfigError, ServeError

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 5.0
FIRST_CHUNK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SKIP_HEADERS = {"content-length", "transfer-encoding", "x-request-id"}
_SSE = "text/event-stream"


def grace_from_env() -> float:
    raw = os.environ.get("SERVE_STREAM_DISCONNECT_GRACE_S")
    if raw in (None, ""):
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise DeploymentConfigError(f"SERVE_STREAM_DISCONNECT_GRACE_S must be seconds from 0 to 86400, got {raw!r}")
    return value


def _content_type(head: dict[str, Any]) -> str:
    return next((v for k, v in head.get("headers", []) if k.lower() == "content-type"), "")


class Framing:
    """How chunks are written: as they are, as the user's server-sent events (each given its chunk index as
    its id), or wrapped into server-sent events (one event per chunk)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "raw", "sse" (the response already is SSE), "wrap"
        self._at_boundary = True

    @classmethod
    def choose(cls, head: dict[str, Any], wants_sse: bool, items: bool = False) -> Framing:
        if items:
            return cls("items")
        if _content_type(head).startswith(_SSE):
            return cls("sse")
        return cls("wrap" if wants_sse else "raw")

    @property
    def sse(self) -> bool:
        return self.mode in ("sse", "wrap")

    @property
    def reports_errors(self) -> bool:
        return self.mode != "raw"

    def chunk(self, event: _streams.Event) -> bytes:
        if self.mode == "items":  # typed items for the Python client: one JSON object per line
            kind = event.type.decode()
            value: Any = event.data.decode("utf-8") if kind == "s" else base64.b64encode(event.data).decode()
            if kind == "j":
                return b'{"i":%d,"t":"j","v":%s}\n' % (event.index, event.data)
            return orjson.dumps({"i": event.index, "t": kind, "v": value}) + b"\n"
        data = _streams.chunk_bytes(event.type, event.data)
        if self.mode == "raw":
            return data
        if self.mode == "sse":
            prefix = f"id: {event.index}\n".encode() if self._at_boundary else b""
            self._at_boundary = data.endswith(b"\n")
            return prefix + data
        lines = data.decode("utf-8", "replace").rstrip("\n").split("\n")
        return f"id: {event.index}\n".encode() + "".join(f"data: {line}\n" for line in lines).encode() + b"\n"

    def error(self, event: _streams.Event) -> bytes:
        payload = {
            "error": event.error.get("exc_type", "Exception"),
            "message": event.error.get("exc_message", ""),
            "deployment": event.error.get("deployment"),
        }
        if self.mode == "items":
            return orjson.dumps({"error": event.error}) + b"\n"
        lead = b"" if self._at_boundary else b"\n\n"
        return lead + b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"

    def end(self, event: _streams.Event) -> bytes:
        if self.mode == "items":
            return orjson.dumps({"end": event.chunks}) + b"\n"
        return b"event: end\ndata: " + orjson.dumps({"chunks": event.chunks}) + b"\n\n" if self.mode == "wrap" else b""


class StreamStats(Collector):
    """What the gateway relayed, as /metrics series: streams in flight, streams and chunks relayed (their
    rate is chunks per second), streams that ended with an error, and time to first chunk (from the
    request's arrival at the gateway for a live stream, from the GET for a replay)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.started = 0
        self.chunks = 0
        self.errors = 0
        self._first = [0] * (len(FIRST_CHUNK_BUCKETS_S) + 1)
        self._first_sum = 0.0

    def first_chunk(self, seconds: float) -> None:
        self._first[bisect.bisect_left(FIRST_CHUNK_BUCKETS_S, seconds)] += 1
        self._first_sum += seconds

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("serve_streams_in_flight", "Streamed responses being relayed now", value=self.in_flight)
        yield CounterMetricFamily("serve_streams", "Streamed responses relayed (live and replays)", value=self.started)
        yield CounterMetricFamily("serve_stream_chunks", "Chunks of streamed responses relayed", value=self.chunks)
        yield CounterMetricFamily("serve_stream_errors", "Relayed streams that ended with an error", value=self.errors)
        cumulative, buckets = 0, []
        for bound, n in zip([*FIRST_CHUNK_BUCKETS_S, float("inf")], self._first, strict=True):
            cumulative += n
            buckets.append((floatToGoString(bound), float(cumulative)))
        yield HistogramMetricFamily(
            "serve_stream_first_chunk_seconds",
            "Time to the first chunk of a streamed response, at the gateway",
            buckets=buckets,
            sum_value=self._first_sum,
        )


class StreamRelay:
    """Writes streams to HTTP clients, and cancels abandoned synchronous streams after the grace period."""

    def __init__(self, transport: QueueTransport, jobs: JobStore, grace_s: float | None = None) -> None:
        self.transport = transport
        self.hub = transport.streams
        self.jobs = jobs
        self.grace_s = grace_from_env() if grace_s is None else grace_s
        self.stats = StreamStats()
        self._timers: set[asyncio.Task[None]] = set()

    async def live(
        self, send: Send, receive: Receive, record: dict[str, Any], started: float, request_id: str | None = None
    ) -> None:
        """Answer a request whose replica began streaming (`record` is its STREAMING reply); `request_id` is the
        id its caller knows it by, when not the one it is stored under (a chosen id on a cluster)."""
        job_id = record["task_id"]
        head = record.get("result") or {}
        framing = Framing.choose(head, wants_sse=False)
        first = None
        if record.get("first"):  # the first chunk came with the reply: write it, follow from the next
            kind, data = _streams.chunk_of_record(record["first"])
            first = _streams.Event(_streams.CHUNK, 0, kind, data)
        follower = self.hub.follow(_streams.key(job_id), _streams.chunk_id(0) if first else _streams.HEAD_ID)
        # counted as a reader by the replica when it opened the stream (no extra round trip here)
        await self._relay(
            send, receive, job_id, head, follower, framing, started, first=first, counted=True, request_id=request_id
        )

    async def replay(
        self,
        send: Send,
        receive: Receive,
        job_id: str,
        start: int,
        wants_sse: bool,
        head: _streams.Event,
        items: bool,
        request_id: str | None = None,
    ) -> None:
        framing = Framing.choose(head.head, wants_sse, items)
        follower = self.hub.follow(_streams.key(job_id), _streams.after_chunk(start - 1))
        extra = [(b"x-stream-from", str(start).encode())]
        await self._relay(
            send, receive, job_id, head.head, follower, framing, time.perf_counter(), extra, request_id=request_id
        )

    async def _relay(
        self,
        send: Send,
        receive: Receive,
        job_id: str,
        head: dict[str, Any],
        follower: _streams.Follower,
        framing: Framing,
        started: float,
        extra: list[tuple[bytes, bytes]] | None = None,
        first: _streams.Event | None = None,
        counted: bool = False,
        request_id: str | None = None,
    ) -> None:
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in head.get("headers", [])
            if k.lower() not in _SKIP_HEADERS
        ]
        if framing.mode == "wrap":
            headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
            headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
        if framing.mode == "items":
            headers = [(b"content-type", b"application/x-ndjson")]
        if framing.sse:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        headers += [(b"x-request-id", (request_id or job_id).encode()), *(extra or [])]
        status = int(head.get("status_code", 200))
        main = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if main is not None:
                        main.cancel()
                    return

        attached: asyncio.Future[None] | None = None
        watcher: asyncio.Task[None] | None = None
        self.stats.in_flight += 1
        self.stats.started += 1
        complete = False
        sent_first = first is not None
        try:
            # the head and a first chunk that came with the reply go out before anything else is set up
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if first is not None:
                await send({"type": "http.response.body", "body": framing.chunk(first), "more_body": True})
                self.stats.chunks += 1
                self.stats.first_chunk(time.perf_counter() - started)
            attached = None if counted else asyncio.ensure_future(self._attach(job_id))
            watcher = asyncio.create_task(watch())
            async for event in follower:
                if event.kind == _streams.CHUNK:
                    # what already arrived goes out in one write: a slow client or a fast producer costs
                    # one send per batch, not per chunk
                    ready = [event, *follower.ready_chunks()]
                    body = b"".join(framing.chunk(e) for e in ready)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    if not sent_first:
                        sent_first = True
                        self.stats.first_chunk(time.perf_counter() - started)
                    self.stats.chunks += len(ready)
                elif event.kind == _streams.END:
                    await send({"type": "http.response.body", "body": framing.end(event), "more_body": False})
                    complete = True
                elif event.kind == _streams.ERROR:
                    self.stats.errors += 1
                    if framing.reports_errors:
                        await send({"type": "http.response.body", "body": framing.error(event), "more_body": False})
                        complete = True
                    else:  # cut off: the client sees an incomplete body, never a short success
                        logger.warning(
                            "stream %s ended with %s: %s; closing the response without its last chunk",
                            job_id,
                            event.error.get("exc_type"),
                            event.error.get("exc_message"),
                        )
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            if main is not None:
                main.uncancel()
        except OSError:  # the client went away while we wrote
            gone.set()
        finally:
            follower.close()
            if watcher is not None:
                watcher.cancel()
            self.stats.in_flight -= 1
            if attached is not None:
                with contextlib.suppress(BaseException):
                    await attached
            if not complete:  # a stream that ended needs no count: nothing is left to cancel
                await self._detach(job_id, abandoned=gone.is_set())

    async def _attach(self, job_id: str) -> None:
        try:
            pipe = self.transport.redis.pipeline(transaction=False)
            pipe.incr(_streams.readers_key(job_id))
            pipe.expire(_streams.readers_key(job_id), 86400)
            await pipe.execute()
        except redis.exceptions.RedisError as exc:
            logger.warning("could not count a reader of stream %s: %s", job_id, exc)

    async def _detach(self, job_id: str, *, abandoned: bool) -> None:
        try:
            left = await self.transport.redis.decr(_streams.readers_key(job_id))
        except redis.exceptions.RedisError as exc:
            logger.warning("could not count a reader of stream %s leaving: %s", job_id, exc)
            return
        if abandoned and int(left) <= 0:
            timer = asyncio.create_task(self._cancel_if_abandoned(job_id), name=f"stream-grace {job_id}")
            self._timers.add(timer)
            timer.add_done_callback(self._timers.discard)

    async def _cancel_if_abandoned(self, job_id: str) -> None:
        """After the grace period, cancel a synchronous request whose stream nobody reads any more."""
        await asyncio.sleep(self.grace_s)
        try:
            readers = await self.transport.redis.get(_streams.readers_key(job_id))
            if readers is not None and int(readers) > 0:
                return
            kind, status = await self.transport.redis.hmget(_keys.job(job_id), ["kind", "status"])
            if kind != b"sync" or status is None or _text(status) in TERMINAL:
                return
            logger.info(
                "stream %s: its client left %.1f s ago and nobody re-attached; cancelling", job_id, self.grace_s
            )
            await self.jobs.finish(job_id, "cancelled")
        except redis.exceptions.RedisError as exc:
            logger.warning("could not cancel abandoned stream %s: %s", job_id, exc)

    async def close(self) -> None:
        for timer in list(self._timers):
            timer.cancel()


class _RelayResponse(Response):
    """The response that replays a stream (returned from the FastAPI route, which then sends it as is)."""

    def __init__(
        self,
        relay: StreamRelay,
        job_id: str,
        start: int,
        wants_sse: bool,
        head: _streams.Event,
        items: bool,
        request_id: str,
    ) -> None:
        self.args = (job_id, start, wants_sse, head, items, request_id)
        self.relay = relay
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.relay.replay(send, receive, *self.args)


def _error(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status)


def stream_router(relay: StreamRelay) -> APIRouter:
    router = APIRouter(prefix="/jobs", tags=["jobs"])

    @router.get(
        "/{job_id}/stream",
        summary="Replay a streamed response from chunk N and follow it to its end",
        response_model=None,
    )
    async def stream(
        job_id: str,
        start: int = Query(0, alias="from", ge=0, description="the 0-based index of the first chunk to send"),
        accept: str = Header(""),
        last_event_id: str | None = Header(None, alias="Last-Event-ID"),
        format: str = Query(
            "http", pattern="^(http|items)$", description="items: typed items as JSON lines (the Python client's)"
        ),
    ) -> Any:
        try:
            request_id = check_job_id(job_id)
            job_id = await relay.jobs.resolve(request_id)  # on a cluster a chosen id may lead to another
            if last_event_id not in (None, ""):
                try:
                    start = int(last_event_id) + 1
                except ValueError:
                    raise BadRequestError(
                        f"Last-Event-ID must be a chunk index (an integer), got {last_event_id!r}"
                    ) from None
                if start < 0:
                    raise BadRequestError(f"Last-Event-ID must be -1 or more, got {last_event_id!r}")
            wants_sse = _SSE in accept or last_event_id is not None
            found = await _streams.read_head(relay.transport.redis, job_id)
            head = found if found is not None else await _await_head(relay, job_id)
            if isinstance(head, JSONResponse):
                return head
        except ServeError as exc:
            return _error(exc.http_status, type(exc).__name__, exc.message)
        except redis.exceptions.RedisError as exc:
            return _error(503, "ServeError", f"the queue service (Redis) is unavailable: {exc}; retry shortly")
        return _RelayResponse(relay, job_id, start, wants_sse, head, format == "items", request_id)

    return router


async def _await_head(relay: StreamRelay, job_id: str) -> _streams.Event | JSONResponse:
    """The head of a stream not started yet: wait while its job is queued or running (until it starts
    streaming or ends); a job that ended without a stream answers 409 with what became of it."""
    job = await relay.jobs.get(job_id)  # 404 for an unknown job
    while job["status"] not in TERMINAL:
        follower = relay.hub.follow(_streams.key(job_id), _streams.START)
        first = asyncio.ensure_future(anext(follower))
        ended = asyncio.ensure_future(relay.jobs.wait(job_id, 30.0))
        try:
            await asyncio.wait([first, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            follower.close()
            ended.cancel()
            if not first.done():
                first.cancel()
        if (
            first.done()
            and not first.cancelled()
            and first.exception() is None
            and first.result().kind == _streams.HEAD
        ):
            return first.result()
        head = await _streams.read_head(relay.transport.redis, job_id)
        if head is not None:
            return head
        job = await relay.jobs.get(job_id)
    head = await _streams.read_head(relay.transport.redis, job_id)
    if head is not None:
        return head
    error = job.get("error")
    detail = f" ({error['type']}: {error['message']})" if error else ""
    return _error(
        409,
        "NoStreamError",
        f"job {job_id} ended {job['status']} without streaming{detail}; GET /jobs/{job_id} for its result",
        job=job,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
