"""Streamed responses on the wire: one Redis Stream per request, written by the replica, followed by callers.

Layout of `serve:stream:<job id>` (entry ids are explicit, so an entry's id *is* its position):

    0-1        head   {"k": "h", "d": JSON {status_code, headers, media_type, mode}}
    0-(i+2)    chunk  {"k": "c", "t": "b"|"s"|"j", "d": bytes}     chunk i (0-based): raw bytes, text or JSON
    0-(n+2)    end    {"k": "e", "n": n}                          the stream ended after n chunks
               error  {"k": "x", "d": JSON error dict, "s": HTTP status}   the stream ended with an error

The end (or error) entry is written by the replica's COMPLETE script together with the request's result, so a
reader that saw it finds the job ended too.

Because ids are positions, "resume at chunk N" is `XREAD ... STREAMS key 0-(N+1)`, and a second producer for
the same request (a redelivery after a replica died mid-stream) cannot interleave: its head is refused.
The key expires with the request's retention. Producers are capped in chunks and bytes (`StreamLimits`):
passing a cap ends the stream with `StreamLimitError`, never by trimming chunks a reader may still want.

`StreamHub` is the reading side: one task and one Redis connection follow every stream this process
reads, with one blocking XREAD over all of them, and hand entries to per-reader bounded queues. A reader
whose queue is full is left out of the XREAD until it catches up, so a slow client holds its chunks in
Redis, not in the gateway's memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire import strictjson
from celery_serve._wire.connections import async_client, interrupt, is_cluster
from celery_serve._wire.slots import key_slot
from celery_serve.exceptions import DeploymentConfigError

logger = logging.getLogger(__name__)

PREFIX = _keys.STREAM_PREFIX  # + job id + "}": in the request's slot (see `_wire.keys`)
HEAD_ID = "0-1"
START = "0-0"  # read from here to get the head first
WAKE_PREFIX = "serve:stream-wake:"
READERS_PREFIX = "serve:stream-readers:{" + _keys.RESULT_PREFIX

HEAD, CHUNK, END, ERROR = b"h", b"c", b"e", b"x"
BYTES, TEXT, JSON = b"b", b"s", b"j"

DEFAULT_MAX_CHUNKS = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
STREAMING = "STREAMING"  # the status of the reply record that says "this response is a stream"


def key(job_id: str) -> str:
    return PREFIX + job_id + "}"


def tail(ttl: int, entry_id: str, fields: dict[str, str | int]) -> str:
    """A stream's last entry (its end or its error) as the replica's COMPLETE call takes it, to write it
    together with the request's result (see `celery_serve._wire.scripts.COMPLETE`)."""
    flat: list[str | int] = [ttl, entry_id]
    for name, value in fields.items():
        flat.extend((name, str(value)))
    return orjson.dumps(flat).decode()


def readers_key(job_id: str) -> str:
    """How many HTTP clients are attached to a stream now (for cancel-on-disconnect)."""
    return READERS_PREFIX + job_id + "}"


def chunk_id(index: int) -> str:
    return f"0-{index + 2}"


def after_chunk(index: int) -> str:
    """The XREAD position that yields chunk `index + 1` next (-1: chunk 0)."""
    return f"0-{index + 2}"


def index_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(seq) - 2 if ms == "0" else -1


def _env_int(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low:
        raise DeploymentConfigError(f"{name} must be an integer >= {low}, got {raw!r}")
    return value


@dataclass(frozen=True)
class StreamLimits:
    """How much one response stream may hold in Redis (`SERVE_STREAM_MAX_CHUNKS`, `SERVE_STREAM_MAX_BYTES`)."""

    max_chunks: int = DEFAULT_MAX_CHUNKS
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_env(cls) -> StreamLimits:
        return cls(
            _env_int("SERVE_STREAM_MAX_CHUNKS", DEFAULT_MAX_CHUNKS),
            _env_int("SERVE_STREAM_MAX_BYTES", DEFAULT_MAX_BYTES),
        )


def encode_chunk(value: Any) -> tuple[bytes, bytes]:
    """(type, data) of one yielded item: bytes stay bytes, str is UTF-8 text, anything else strict JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return BYTES, bytes(value)
    if isinstance(value, str):
        return TEXT, value.encode("utf-8")
    try:  # strict: a NaN or an infinity raises strictjson.NotJSONError instead of streaming `null`
        return JSON, strictjson.dumps(value)
    except TypeError:
        from fastapi.encoders import jsonable_encoder

        return JSON, strictjson.dumps(jsonable_encoder(value))


def record_chunk(kind: bytes, data: bytes) -> dict[str, str]:
    """A chunk inside a JSON record (the first chunk rides in the STREAMING reply)."""
    if kind == BYTES:
        return {"t": "b", "d": base64.b64encode(data).decode()}
    return {"t": kind.decode(), "d": data.decode("utf-8")}


def chunk_of_record(item: dict[str, str]) -> tuple[bytes, bytes]:
    if item["t"] == "b":
        return BYTES, base64.b64decode(item["d"])
    return item["t"].encode(), item["d"].encode("utf-8")


def decode_chunk(kind: bytes, data: bytes) -> Any:
    """A chunk as a handle caller gets it back: bytes, str or the JSON value."""
    if kind == BYTES:
        return data
    if kind == TEXT:
        return data.decode("utf-8")
    return orjson.loads(data)


def chunk_bytes(kind: bytes, data: bytes) -> bytes:
    """A chunk as an HTTP client gets it: bytes and text as they are, JSON values one per line (NDJSON)."""
    return data + b"\n" if kind == JSON else data


@dataclass
class Event:
    """One stream entry, decoded."""

    kind: bytes
    index: int = -1  # the chunk index (chunks only)
    type: bytes = b""
    data: bytes = b""
    head: dict[str, Any] = field(default_factory=dict)  # head only
    error: dict[str, Any] = field(default_factory=dict)  # error only
    http_status: int = 500
    chunks: int = 0  # end only

    @property
    def terminal(self) -> bool:
        return self.kind in (END, ERROR)


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    kind = fields.get(b"k", b"")
    if kind == CHUNK:
        return Event(CHUNK, index_of(entry_id), fields.get(b"t", BYTES), fields.get(b"d", b""))
    if kind == HEAD:
        return Event(HEAD, head=orjson.loads(fields[b"d"]))
    if kind == END:
        return Event(END, chunks=int(fields.get(b"n", b"0")))
    if kind == ERROR:
        return Event(ERROR, error=orjson.loads(fields[b"d"]), http_status=int(fields.get(b"s", b"500")))
    return Event(ERROR, error={"exc_type": "ServeError", "exc_message": f"unreadable stream entry {fields!r}"})


# --- the reading side -----------------------------------------------------------------------------------

_QUEUE = 256  # entries one reader may have waiting in memory
_COUNT = 64  # entries one XREAD takes per stream (a reader is followed only with this much room left)
_BLOCK_MS = 1000
IDLE_CHECK_S = 5.0  # a reader this long without an entry has its job's state checked
_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})


class Follower:
    """One reader of one stream: an async iterator of `Event`s, ending after the terminal one."""

    def __init__(self, hub: StreamHub, stream: str, last_id: str) -> None:
        self.hub = hub
        self.key = stream
        self.last_id = last_id.encode()
        self.items: deque[Event | BaseException] = deque()
        self._ready = asyncio.Event()
        self.finished = False
        self.paused = False
        self.active_at = time.monotonic()  # when an entry last arrived (for the hub's watchdog)

    @property
    def job_id(self) -> str:
        return self.key[len(PREFIX) : -1]

    @property
    def room(self) -> bool:
        return len(self.items) <= _QUEUE - _COUNT

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self.items:
            if self.finished:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        item = self.items.popleft()
        self._resume()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.terminal:
            self.close()
        return item

    def ready_chunks(self) -> list[Event]:
        """The chunks already here, in order, up to the next entry that is not a chunk (not waiting)."""
        taken: list[Event] = []
        while self.items and isinstance(self.items[0], Event) and self.items[0].kind == CHUNK:
            taken.append(self.items.popleft())  # type: ignore[arg-type]
        if taken:
            self._resume()
        return taken

    def _resume(self) -> None:
        if self.paused and self.room:
            self.paused = False
            self.hub.wake()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._ready.set()
            self.hub._remove(self)

    def _push(self, item: Event | BaseException) -> None:
        self.items.append(item)
        self._ready.set()

    def _put(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        if self.finished or not _newer(entry_id, self.last_id):
            return
        self.last_id = entry_id
        self.active_at = time.monotonic()
        self._push(decode_entry(entry_id, fields))


def _newer(a: bytes, b: bytes) -> bool:
    am, _, aseq = a.partition(b"-")
    bm, _, bseq = b.partition(b"-")
    return (int(am), int(aseq)) > (int(bm), int(bseq))


class StreamHub:
    """Follows many streams on one connection: one blocking XREAD over every followed stream at a time.

    The set of streams changes as readers come and go; a new reader wakes the blocked XREAD by adding to
    this hub's own wake-up stream (part of every XREAD), so its first chunk is not held back."""

    def __init__(self, url: str, slot_tag: str = "") -> None:
        self.url = url
        self.id = os.urandom(6).hex()
        # On a cluster a hub reads the streams of one slot: its wake-up stream carries their hash tag.
        self.wake_key = WAKE_PREFIX + (f"{slot_tag}:" if slot_tag else "") + self.id
        self._followers: dict[str, list[Follower]] = {}
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._conn: aioredis.Redis | None = None
        self.redis: aioredis.Redis | None = None
        self._wake_last = b"0-0"
        self._blocked = False
        self._woken = False
        self._closing = False

    @property
    def following(self) -> int:
        return sum(len(f) for f in self._followers.values())

    def follow(self, stream: str, after: str = START) -> Follower:
        """Follow `stream` from the entry after `after` (START: from the head)."""
        follower = Follower(self, stream, after)
        self._followers.setdefault(stream, []).append(follower)
        if self._task is None:
            self._conn = async_client(self.url, single_connection=True)
            self.redis = async_client(self.url)
            self._task = asyncio.create_task(self._run(), name=f"stream-hub {self.id}")
            self._watchdog = asyncio.create_task(self._watch(), name=f"stream-hub watchdog {self.id}")
        self.wake()
        return follower

    def wake(self) -> None:
        """Make the reader task re-issue its XREAD with the current set of streams."""
        if self._blocked and not self._woken and self.redis is not None:
            self._woken = True
            task = asyncio.ensure_future(self.redis.xadd(self.wake_key, {"w": 1}, maxlen=1, approximate=False))
            task.add_done_callback(_ignore)

    def _remove(self, follower: Follower) -> None:
        group = self._followers.get(follower.key)
        if group and follower in group:
            group.remove(follower)
            if not group:
                del self._followers[follower.key]

    async def close(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._task is not None:
            await interrupt(self._conn)
            await asyncio.wait([self._task], timeout=1.0)
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for client in (self._conn, self.redis):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        for group in list(self._followers.values()):
            for follower in list(group):
                follower._push(ConnectionError("the stream reader was closed"))
        self._followers.clear()

    async def _run(self) -> None:
        assert self._conn is not None and self.redis is not None
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.redis.delete(self.wake_key)
        while not self._closing:
            streams: dict[str, bytes] = {}
            for stream, group in self._followers.items():
                ready = [f for f in group if not f.finished]
                for f in ready:
                    if not f.room:
                        f.paused = True
                ready = [f for f in ready if not f.paused]
                if ready:
                    streams[stream] = min((f.last_id for f in ready), key=_order)
            streams[self.wake_key] = self._wake_last
            self._blocked, self._woken = True, False
            try:
                got = await self._conn.xread(streams, count=_COUNT, block=_BLOCK_MS)  # type: ignore[arg-type]
            except (redis.exceptions.RedisError, OSError, KeyError) as exc:
                self._blocked = False
                if self._closing:
                    return
                logger.warning("stream reader lost Redis (%r); reconnecting", exc)
                await asyncio.sleep(0.2)
                continue
            self._blocked = False
            for raw_key, entries in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], got or []):
                name = raw_key.decode()
                if name == self.wake_key:
                    self._wake_last = entries[-1][0]
                    continue
                read_from = _order(streams[name])
                for follower in list(self._followers.get(name, [])):
                    # Only readers this read was for: paused ones wait, and one that joined during the read
                    # from further back is read for next time (handing it these entries would skip some).
                    if follower.paused or _order(follower.last_id) < read_from:
                        continue
                    for entry_id, fields in entries:
                        follower._put(entry_id, fields)
        self._blocked = False

    async def _watch(self) -> None:
        """End the streams whose producer is gone: a reader idle for a while whose job has ended although
        its stream has no end (the replica died mid-stream and the request was dead-lettered, or its job
        was ended from outside) gets an error instead of waiting forever."""
        while not self._closing:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            idle = [
                f
                for group in list(self._followers.values())
                for f in group
                if not f.finished and not f.paused and not f.items and now - f.active_at > IDLE_CHECK_S
            ]
            if not idle or self.redis is None:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for f in idle:
                    pipe.hget(_keys.job(f.job_id), "status")
                    pipe.xrevrange(f.key, count=1)
                    pipe.get(_keys.result(f.job_id))
                found = await pipe.execute()
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning("stream watchdog could not read job states: %s", exc)
                continue
            for i, follower in enumerate(idle):
                status, last, record = found[3 * i : 3 * i + 3]
                state = status.decode() if isinstance(status, bytes) else status
                if state not in _TERMINAL:
                    continue
                if last and last[0][1].get(b"k") in (END, ERROR):
                    continue  # the end is there: the next read delivers it
                follower._push(Event(ERROR, error=_orphan_error(follower.job_id, state, record)))


def _orphan_error(job_id: str, status: str, record: bytes | None) -> dict[str, Any]:
    error: dict[str, Any] = {}
    if record is not None:
        decoded = _results.decode(record)
        if decoded.get("status") != _results.SUCCESS:
            error = dict(decoded.get("result") or {})
    message = f"the stream of job {job_id} stopped before its end: the job ended {status}"
    if error.get("exc_message"):
        message += f" ({error.get('exc_type')}: {error['exc_message']})"
    return {
        "exc_type": error.get("exc_type") or "ServeError",
        "exc_message": message,
        "exc_module": error.get("exc_module") or "celery_serve.exceptions",
    }


def _order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


def _ignore(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def read_head(client: aioredis.Redis, job_id: str) -> Event | None:
    """The stream's head (status and headers), or None when the stream does not exist (yet)."""
    entries = await client.xrange(key(job_id), HEAD_ID, HEAD_ID)
    if not entries:
        return None
    entry_id, fields = entries[0]
    return decode_entry(cast(bytes, entry_id), cast(dict[bytes, bytes], fields))


class SlotStreamHubs:
    """On a Redis Cluster one XREAD may only name streams of one slot: a `StreamHub` per slot followed
    (streams are in their request's slot, so one per deployment a process reads streams from)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._hubs: dict[int, StreamHub] = {}

    @property
    def following(self) -> int:
        return sum(hub.following for hub in self._hubs.values())

    def follow(self, stream: str, after: str = START) -> Follower:
        slot = key_slot(stream)
        hub = self._hubs.get(slot)
        if hub is None:
            tag = stream[stream.index("{") : stream.index("}") + 1]
            hub = self._hubs[slot] = StreamHub(self.url, slot_tag=tag)
        return hub.follow(stream, after)

    async def close(self) -> None:
        await asyncio.gather(*(hub.close() for hub in self._hubs.values()))


def stream_hub(url: str) -> StreamHub | SlotStreamHubs:
    """What follows streams for this process: one hub, or one per slot on a cluster."""
    return SlotStreamHubs(url) if is_cluster(url) else StreamHub(url)
