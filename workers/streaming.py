"""Streaming in the replica: a generator's items go to the request's Redis Stream as the user code yields them.

What streams: a sync or async generator (or any iterator) returned by a method, a Starlette
`StreamingResponse`, and a FastAPI ingress route whose response body comes in several parts. The head
(status and headers) goes out first, together with a `STREAMING` reply record that tells a waiting caller
to follow the stream; then one entry per chunk; then an end or error entry, written with the request's result
in one call (see `celery_serve._wire.streams`).

A stream runs as its own task, registered like a running async request, so `DELETE /jobs/{id}` and the
gateway's cancel-on-disconnect stop it: the generator is closed (its `finally` runs) and the stream ends
with `JobCancelledError`. Sync generators are advanced on a worker thread, one item at a time, so a slow
model step never holds the replica's event loop. Writes are pipelined (a chunk is written while the next
is computed) with at most `INFLIGHT` chunks waiting: a producer never runs far ahead of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message

from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire import scripts as _scripts
from celery_serve._wire import streams as _streams
from celery_serve._wire import strictjson
from celery_serve._wire.envelope import Envelope
from celery_serve.exceptions import JobCancelledError, ResultNotJSONError, StreamLimitError, StreamUsageError
from celery_serve.workers.batching import Outcome
from celery_serve.workers.generators import INFLIGHT, sync_items
from celery_serve.workers.http import response_dict
from celery_serve.workers.running_marks import RunningMarks

logger = logging.getLogger(__name__)

FIRST_CHUNK_WINDOW_S = 0.002  # how long the head waits for the first chunk to go out with it
_DONE = object()
REQUIRE = "require"  # the caller iterates the response (handle.options(stream=True), Client.stream)
ALLOW = "allow"  # the caller takes a stream or a value (HTTP, POST /jobs)


@dataclass
class AsgiStream:
    """An ASGI app (FastAPI ingress) that answered with a body in several parts and is still running."""

    status: int
    headers: list[tuple[bytes, bytes]]
    first: bytes
    messages: asyncio.Queue[Message | BaseException]
    task: asyncio.Task[None]
    disconnect: asyncio.Event

    async def body(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        while True:
            message = await self.messages.get()
            if isinstance(message, BaseException):
                raise message
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return

    def stop(self) -> None:
        self.disconnect.set()
        self.task.cancel()


async def run_asgi(app: ASGIApp, scope: dict[str, Any], body: bytes) -> dict[str, Any] | AsgiStream:
    """Run one request through an ASGI app: the whole response, or an `AsgiStream` once it sends a body
    part with more to come. The app sees the client as connected until the stream is stopped."""
    messages: asyncio.Queue[Message | BaseException] = asyncio.Queue(maxsize=INFLIGHT)
    disconnect = asyncio.Event()
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the response
            await messages.put(exc)
            raise
        finally:
            await messages.put({"type": "http.response.body", "body": b"", "more_body": False, "final": True})

    task = asyncio.create_task(call())
    status, headers = 500, []
    while True:
        message = await messages.get()
        if isinstance(message, BaseException):
            with contextlib.suppress(BaseException):
                await task
            raise message
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
            continue
        if message["type"] != "http.response.body":
            continue
        if message.get("more_body", False):
            return AsgiStream(status, headers, message.get("body", b""), messages, task, disconnect)
        with contextlib.suppress(BaseException):
            await task
        return response_dict(status, headers, message.get("body", b""))


def is_stream(value: Any) -> bool:
    return isinstance(value, (StreamingResponse, AsgiStream)) or inspect.isgenerator(value) or inspect.isasyncgen(value)


def check(env: Envelope, outcome: Outcome, deployment: str) -> Outcome:
    """The outcome a caller gets, given how it asked: a stream it did not ask for (or no stream when it
    asked for one) becomes a `StreamUsageError` that says how to call the method."""
    if not outcome.ok:
        return outcome
    streamed = is_stream(outcome.value)
    where = f"'{deployment}.{env.method}'"
    if streamed and (env.chain or env.chord):
        _close(outcome.value)
        return Outcome(error=StreamUsageError(f"{where} returned a stream, but only the last step of a pipeline can"))
    may = bool(env.stream or env.http_reply)  # "allow" (HTTP, POST /jobs) takes a stream or a value
    error = usage_error(where, env.method, outcome.value, asked=env.stream == REQUIRE, may=may)
    if error is not None:
        if streamed:
            _close(outcome.value)
        return Outcome(error=error)
    return outcome


def usage_error(where: str, method: str, value: Any, *, asked: bool, may: bool = False) -> StreamUsageError | None:
    """The error for a caller that asked for a stream and got a value, or got a stream it did not ask for
    (and may not take: `may`, an HTTP caller); None when the call fits the method. Shared with local
    testing mode, so both say the same."""
    streamed = is_stream(value)
    if asked and not streamed:
        return StreamUsageError(
            f"{where} returned {type(value).__name__}, not a generator: call it without stream=True "
            "(handle.options(stream=True) and Client.stream are for generator methods)"
        )
    if streamed and not asked and not may:
        return StreamUsageError(
            f"{where} returned a generator: call it with handle.options(stream=True).{method}.remote(...) "
            "and iterate the DeploymentResponseGenerator (or Client.stream)"
        )
    return None


def _close(value: Any) -> None:
    if inspect.isgenerator(value):
        value.close()
    elif isinstance(value, AsgiStream):
        value.stop()
    elif inspect.isasyncgen(value):
        task = asyncio.ensure_future(value.aclose())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _media_type(first: Any) -> str:
    if isinstance(first, str):
        return "text/plain; charset=utf-8"
    if isinstance(first, (bytes, bytearray, memoryview)):
        return "application/octet-stream"
    return "application/x-ndjson"


def _items(value: Any) -> tuple[AsyncIterator[Any], dict[str, Any] | None]:
    """The items to stream and, when the value fixes them, the status and headers (else decided from the
    first item)."""
    if isinstance(value, StreamingResponse):
        head = {
            "status_code": value.status_code,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in value.raw_headers],
        }
        return _charset_items(value.body_iterator, value.charset), head
    if isinstance(value, AsgiStream):
        head = {
            "status_code": value.status,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in value.headers],
        }
        return value.body(), head
    if inspect.isasyncgen(value):
        return value, None
    return sync_items(value), None


async def _charset_items(body: AsyncIterable[Any], charset: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield bytes(chunk) if isinstance(chunk, (bytes, memoryview)) else chunk.encode(charset)
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class StreamWriter:
    """Writes one request's stream: head, chunks (pipelined, bounded), then its end or error."""

    def __init__(
        self,
        client: aioredis.Redis,
        env: Envelope,
        limits: _streams.StreamLimits,
        opener: AsyncScript | None = None,
        marks: RunningMarks | None = None,
    ) -> None:
        self.redis = client
        self.marks = marks  # the replica's running marks: the head marks the job running instead
        self.env = env
        self.key = _streams.key(env.job_id)
        self.limits = limits
        self.ttl = int(env.retention_s + max((env.deadline or time.time()) - time.time(), 0) + 60)
        self.chunks = 0
        self.bytes = 0
        self.tail = ""  # the stream's last entry, once it ended (see `end`)
        self.head_going = asyncio.Event()  # set as the head is sent (see `StreamRunner.heads_out`)
        self._pending: list[tuple[str, dict[str, bytes]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._open = opener or client.register_script(_scripts.STREAM_HEAD)  # STREAM_HEAD, registered once per client

    async def head(self, head: dict[str, Any], first: Any = _DONE) -> bool:
        """Open the stream and tell a waiting caller to follow it; False if this request already streamed
        (a redelivery after a replica died mid-stream), whose stream cannot be restarted.

        A `first` chunk already produced goes out in the same round trip, and rides in the reply record
        too, so a caller writes it without a read of the stream (time to first chunk = one request's)."""
        kind = data = b""
        record: dict[str, Any] = {}
        if first is not _DONE:
            kind, data = self._admit(first)
            record["first"] = _streams.record_chunk(kind, data)
        reply = self.env.reply_to if self.env.reply_to and self.env.reply_to.startswith(_keys.REPLY_PREFIX) else ""
        told = _results._record(self.env.job_id, _streams.STREAMING, head, **record) if reply else ""
        readers = _streams.readers_key(self.env.job_id)
        started = self.marks.answered(self.env.job_id) if self.marks is not None else ""
        # The call below writes the head before it first waits: the replica's next take goes out after it.
        self.head_going.set()
        opened = False
        try:
            opened = bool(
                await self._open(
                    keys=[self.key, _keys.job(self.env.job_id), reply or self.key, readers],
                    # the waiting HTTP client is the stream's first reader (see api.streaming)
                    args=[orjson.dumps(head), self.ttl, kind, data, told, 1 if self.env.http_reply else 0, started],
                    client=self.redis,
                )
            )
        finally:
            # a head that failed, or could not open (a stream that cannot restart), recorded no start: the mark will
            if not opened and self.marks is not None:
                self.marks.restore(self.env.job_id, started)
        return opened

    def _admit(self, value: Any) -> tuple[bytes, bytes]:
        """Encode one chunk and count it against the caps (`StreamLimitError` past them)."""
        try:
            kind, data = _streams.encode_chunk(value)
        except strictjson.NotJSONError as exc:
            raise ResultNotJSONError(f"chunk {self.chunks} of the stream is not valid JSON: {exc}") from None
        if self.chunks + 1 > self.limits.max_chunks:
            raise StreamLimitError(
                f"the stream passed its cap of {self.limits.max_chunks} chunks (the deployment's "
                "stream_max_chunks, or SERVE_STREAM_MAX_CHUNKS): yield fewer, larger chunks or raise the cap"
            )
        if self.bytes + len(data) > self.limits.max_bytes:
            raise StreamLimitError(
                f"the stream passed its cap of {self.limits.max_bytes} bytes (the deployment's "
                "stream_max_bytes, or SERVE_STREAM_MAX_BYTES): stream less, or raise the cap"
            )
        self.chunks += 1
        self.bytes += len(data)
        return kind, data

    async def chunk(self, value: Any) -> None:
        kind, data = self._admit(value)
        self._pending.append((_streams.chunk_id(self.chunks - 1), {"k": _streams.CHUNK, "t": kind, "d": data}))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        if len(self._pending) >= INFLIGHT:
            self._room.clear()
            await self._room.wait()
            if self._flushing.done() and self._flushing.exception() is not None:
                raise self._flushing.exception()  # type: ignore[misc]

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            self._room.set()
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, fields in batch:
                pipe.xadd(self.key, fields, id=entry_id, maxlen=self.limits.max_chunks + 2, approximate=False)  # type: ignore[arg-type]
            await pipe.execute()
        self._room.set()

    async def drain(self) -> None:
        if self._flushing is not None:
            await self._flushing
        if self._pending:
            await self._flush()

    async def end(self) -> None:
        """Write the chunks still pending and make the end entry the stream's `tail`.

        The tail is written by the replica's COMPLETE call, with the request's result, so a client that read
        the stream to its end finds the job ended (and a Redis fault here is retried with the result)."""
        await self.drain()
        self.tail = _streams.tail(
            self.ttl, _streams.chunk_id(self.chunks), {"k": _streams.END.decode(), "n": self.chunks}
        )

    async def error(self, error: dict[str, Any], status: int, *, opened: bool = True) -> None:
        """As `end`, with an error entry: after the last chunk written; "*" when a previous attempt's stream is
        there (its length is unknown)."""
        with contextlib.suppress(Exception):
            await self.drain()
        entry_id = _streams.chunk_id(self.chunks) if opened else "*"
        fields: dict[str, str | int] = {"k": _streams.ERROR.decode(), "d": orjson.dumps(error).decode(), "s": status}
        self.tail = _streams.tail(self.ttl, entry_id, fields)


def failure_of(record: str) -> tuple[dict[str, Any], int]:
    decoded = _results.decode(record)
    return decoded.get("result") or {}, int(decoded.get("http_status") or 500)


async def stream(writer: StreamWriter, value: Any, failure: Any) -> tuple[Outcome, bool]:
    """Run one stream to its end; returns the request's outcome and whether the stream was opened (the
    caller was told to follow it; if not, it still waits for the result record).

    `failure(exc)` turns an exception into the replica's failure record (error dict and HTTP status)."""
    items, head = _items(value)
    opened = False
    first_item: asyncio.Future[Any] | None = None
    try:
        if head is None:  # a plain generator: the first item decides the content type
            first = await anext(items, _DONE)
            head = {"status_code": 200, "headers": [["content-type", _media_type(first)]]}
        else:  # status and headers are known: send them with the first item if it comes at once, else alone
            first_item = asyncio.ensure_future(anext(items, _DONE))
            await asyncio.sleep(0)  # an item that is ready at once is taken in this one turn of the loop
            if not first_item.done():
                await asyncio.wait([first_item], timeout=FIRST_CHUNK_WINDOW_S)
            first = first_item.result() if first_item.done() else _DONE
            if first_item.done():
                first_item = None  # it goes with the head
        if not await writer.head(head, first):
            raise StreamUsageError("this request's stream was already started by a replica that died mid-stream")
        opened = True
        if first_item is not None:  # it came after the head was sent, or is still to come
            first = await first_item
            if first is not _DONE:
                await writer.chunk(first)
        async for item in items:
            await writer.chunk(item)
        await writer.end()
        return Outcome(value={"stream": f"/jobs/{writer.env.job_id}/stream", "chunks": writer.chunks}), True
    except asyncio.CancelledError:
        if first_item is not None:
            first_item.cancel()
        error = JobCancelledError(
            f"job {writer.env.job_id} was cancelled; its stream stopped after {writer.chunks} chunks"
        )
        await _end_with(writer, error.to_dict(), 409, opened, value, items)
        return Outcome(error=error), opened
    except Exception as exc:  # noqa: BLE001 - the stream ends with the error, the job fails with it
        error_dict, status = failure(exc)
        await _end_with(writer, error_dict, status, opened, value, items)
        return Outcome(error=exc), opened


async def _end_with(
    writer: StreamWriter, error: dict[str, Any], status: int, opened: bool, value: Any, items: Any
) -> None:
    if isinstance(value, AsgiStream):
        value.stop()
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(aclose(), timeout=5)
    await writer.error(error, status, opened=opened)


class StreamRunner:
    """Runs a replica's streams as tasks it can cancel, and answers each request once its stream ends."""

    def __init__(self, server: Any) -> None:
        self.server = server  # the ReplicaServer (consumer); its task bookkeeping is reused as it is
        defaults = _streams.StreamLimits.from_env()
        config = server.config
        self.limits = _streams.StreamLimits(
            int(config.get("stream_max_chunks") or defaults.max_chunks),
            int(config.get("stream_max_bytes") or defaults.max_bytes),
        )
        self.opener = server.ops.redis.register_script(_scripts.STREAM_HEAD)
        self.streams = 0
        self.chunks = 0
        self._starting: list[asyncio.Event] = []  # streams started whose heads may not be out yet

    def start(self, token: Any, env: Envelope, value: Any) -> None:
        server = self.server
        writer = StreamWriter(server.ops.redis, env, self.limits, self.opener, server.ops.marks)
        task = asyncio.create_task(self._run(token, env, value, writer), name=f"stream {env.job_id}")
        server._ongoing.add(task)
        server._running[env.job_id] = task
        task.add_done_callback(server._finished)
        task.add_done_callback(lambda _: writer.head_going.set())  # a stream that failed before its head
        self._starting.append(writer.head_going)

    async def heads_out(self) -> None:
        """Wait until the streams just started have sent their heads (at most `FIRST_CHUNK_WINDOW_S`), so that
        the replica's next take does not go to Redis ahead of them: a head is what its client waits for."""
        starting, self._starting = self._starting, []
        pending = [asyncio.ensure_future(event.wait()) for event in starting if not event.is_set()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=FIRST_CHUNK_WINDOW_S)
            for waiter in late:
                waiter.cancel()

    async def _run(self, token: Any, env: Envelope, value: Any, writer: StreamWriter) -> None:
        server = self.server
        self.streams += 1
        try:
            outcome, opened = await stream(writer, value, lambda exc: failure_of(server.replica._failure(env, exc)))
        finally:
            server._running.pop(env.job_id, None)
            self.chunks += writer.chunks
        server.events.finished(env, outcome)
        answered = replace(env, reply_to=None) if opened else env  # the caller already follows the stream
        if isinstance(outcome.error, JobCancelledError):
            record = _results.cancelled(env.job_id)
        else:
            record = await server.replica.record(answered, outcome)
        server._answer(token, answered, record, stream_tail=writer.tail)
