"""Pure units of streaming: chunk encoding and positions, HTTP framing, settings checked at the door, the
stream/value checks a replica makes, and a `@batch` generator split per caller. No Redis, no processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from celery_serve import StreamUsageError
from celery_serve._wire import streams as _streams
from celery_serve._wire.envelope import build_message, parse_message
from celery_serve.api.streaming import Framing, grace_from_env
from celery_serve.exceptions import DeploymentConfigError
from celery_serve.workers.batching import Outcome
from celery_serve.workers.generators import BatchStream
from celery_serve.workers.streaming import check


def event(index: int, value: Any) -> _streams.Event:
    kind, data = _streams.encode_chunk(value)
    return _streams.Event(_streams.CHUNK, index, kind, data)


def test_chunks_keep_their_type_and_their_position_is_their_id() -> None:
    for value in (b"\x00\xff", "héllo", {"a": [1, 2]}, 3, None):
        kind, data = _streams.encode_chunk(value)
        assert _streams.decode_chunk(kind, data) == value
        assert _streams.chunk_of_record(_streams.record_chunk(kind, data)) == (kind, data)
    assert _streams.chunk_id(0) == "0-2" and _streams.index_of(b"0-2") == 0
    assert _streams.after_chunk(-1) == _streams.HEAD_ID  # from chunk 0: right after the head
    assert _streams.index_of(_streams.after_chunk(4)) == 4  # reading after chunk 4 yields chunk 5 next


def test_http_framing_raw_sse_and_wrapped() -> None:
    assert Framing("raw").chunk(event(0, "a b")) == b"a b"
    assert Framing("raw").chunk(event(0, {"x": 1})) == b'{"x":1}\n'  # JSON values: one per line
    sse = Framing.choose({"headers": [["content-type", "text/event-stream"]]}, wants_sse=False)
    assert sse.chunk(event(0, "data: a\n\n")) == b"id: 0\ndata: a\n\n"
    assert sse.chunk(event(1, "data: b")) == b"id: 1\ndata: b"  # an event split over chunks: one id
    assert sse.chunk(event(2, "c\n\n")) == b"c\n\n"
    error = _streams.Event(_streams.ERROR, error={"exc_type": "ValueError", "exc_message": "bad"})
    assert (
        Framing("sse").error(error)
        == b'event: error\ndata: {"error":"ValueError","message":"bad","deployment":null}\n\n'
    )
    wrap = Framing.choose({"headers": [["content-type", "text/plain"]]}, wants_sse=True)
    assert wrap.chunk(event(7, "two\nlines")) == b"id: 7\ndata: two\ndata: lines\n\n"
    items = Framing.choose({}, wants_sse=False, items=True)
    assert items.chunk(event(3, b"\x01")) == b'{"i":3,"t":"b","v":"AQ=="}\n'
    assert items.chunk(event(4, [1])) == b'{"i":4,"t":"j","v":[1]}\n'


def test_settings_are_checked_at_the_door(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_STREAM_MAX_CHUNKS", "0")
    with pytest.raises(DeploymentConfigError, match="SERVE_STREAM_MAX_CHUNKS"):
        _streams.StreamLimits.from_env()
    monkeypatch.setenv("SERVE_STREAM_MAX_CHUNKS", "10")
    monkeypatch.setenv("SERVE_STREAM_MAX_BYTES", "1k")
    with pytest.raises(DeploymentConfigError, match="SERVE_STREAM_MAX_BYTES"):
        _streams.StreamLimits.from_env()
    monkeypatch.setenv("SERVE_STREAM_DISCONNECT_GRACE_S", "-1")
    with pytest.raises(DeploymentConfigError, match="SERVE_STREAM_DISCONNECT_GRACE_S"):
        grace_from_env()
    monkeypatch.setenv("SERVE_STREAM_DISCONNECT_GRACE_S", "0.5")
    assert grace_from_env() == 0.5


def _env(stream: str | None = None, http: bool = False) -> Any:
    raw = build_message(
        task_id="t",
        app="a",
        deployment="D",
        method="m",
        stream=stream,
        http={"method": "GET", "path": "/"} if http else None,
    )
    return parse_message(raw)


def _numbers() -> Any:
    yield 1


def test_a_replica_refuses_a_stream_nobody_asked_for_and_a_value_where_a_stream_was_asked() -> None:
    unasked = check(_env(), Outcome(value=_numbers()), "D")
    assert isinstance(unasked.error, StreamUsageError) and "options(stream=True)" in str(unasked.error)
    wanted = check(_env("require"), Outcome(value=5), "D")
    assert isinstance(wanted.error, StreamUsageError) and "not a generator" in str(wanted.error)
    assert check(_env("require"), Outcome(value=_numbers()), "D").ok
    assert check(_env(http=True), Outcome(value=_numbers()), "D").ok  # an HTTP caller takes either
    assert check(_env("allow"), Outcome(value=5), "D").value == 5


def test_a_batch_generator_streams_each_caller_its_own_items_and_ends_each_on_its_own() -> None:
    async def generate(counts: list[int]) -> AsyncIterator[list[Any]]:
        for step in range(max(counts)):
            yield [f"{n}:{step}" if step < n else StopIteration for n in counts]

    async def run() -> list[list[str]]:
        streams = BatchStream(generate([1, 3, 2]), 3).streams()

        async def collect(stream: AsyncIterator[str]) -> list[str]:
            return [item async for item in stream]

        return list(await asyncio.gather(*(collect(s) for s in streams)))

    assert asyncio.run(run()) == [["1:0"], ["3:0", "3:1", "3:2"], ["2:0", "2:1"]]


def test_a_batch_generator_that_yields_the_wrong_shape_fails_every_caller() -> None:
    async def generate(_: list[int]) -> AsyncIterator[list[Any]]:
        yield ["only one"]

    async def run() -> list[BaseException | list[str]]:
        streams = BatchStream(generate([1, 1]), 2).streams()

        async def collect(stream: AsyncIterator[str]) -> list[str]:
            return [item async for item in stream]

        return list(await asyncio.gather(*(collect(s) for s in streams), return_exceptions=True))

    results = asyncio.run(run())
    assert all(isinstance(r, StreamUsageError) and "one item per request (2)" in str(r) for r in results)
