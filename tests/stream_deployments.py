"""The application the streaming tests serve: `streams`, at route prefix /streamtest.

Ray's own streaming examples, ported with only the import line changed, plus deployments that let the
tests hold a stream at a chunk until they release it (so "the first chunk arrives long before the last"
is shown by order, not by timing), and record in Redis that a generator was closed.

    Textgen       Ray's HTTP example: `StreamingResponse(self.generate_numbers(n))` (sync generator)
    Streamer      handle streaming: generator methods (sync, async), a method returning a value, and
                  gated / failing / endless generators for resume, errors, caps and cancellation
    SSE           server-sent events (text/event-stream) from an async generator
    Api           a FastAPI ingress whose route returns a StreamingResponse
    Batched       Ray's batched streaming: a @batch async generator, one token stream per caller
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any

import redis
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import StreamingResponse

from celery_serve import DeploymentHandle, DeploymentResponseGenerator, batch, deployment, ingress

APP_NAME = "streams"
ROUTE_PREFIX = "/streamtest"
KEY_PREFIX = "serve-test-streams:"


def release_key(tag: str) -> str:
    return f"{KEY_PREFIX}release:{tag}"


def closed_key(tag: str) -> str:
    """Set when a generator was closed before it ended (its `finally` ran early)."""
    return f"{KEY_PREFIX}closed:{tag}"


def progress_key(tag: str) -> str:
    """How many items a generator has yielded."""
    return f"{KEY_PREFIX}progress:{tag}"


_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _client


@deployment
class Textgen:
    """Ray Serve's streaming example ("Streaming responses" in the HTTP guide)."""

    def generate_numbers(self, max: int) -> Generator[str, None, None]:
        for i in range(max):
            yield str(i)
            time.sleep(0.05)

    def __call__(self, request: Request) -> StreamingResponse:
        max = request.query_params.get("max", "25")
        gen = self.generate_numbers(int(max))
        return StreamingResponse(gen, status_code=200, media_type="text/plain")


@deployment(max_ongoing_requests=200)
class Streamer:
    """Generator methods called through handles, the client and POST /jobs."""

    def numbers(self, n: int) -> Generator[int, None, None]:
        yield from range(n)

    def scores(self, n: int) -> Generator[float, None, None]:
        """n finite scores, then NaN: a chunk with no JSON form."""
        for i in range(n):
            yield i / 2
        yield float("nan")

    async def words(self, text: str) -> AsyncGenerator[str, None]:
        for word in text.split():
            await asyncio.sleep(0)
            yield word

    def plain(self, x: int) -> int:
        return x * 2

    async def gated(self, tag: str, n: int, hold_at: int) -> AsyncGenerator[dict[str, Any], None]:
        """Yield n items; before item `hold_at` wait until the test releases the tag."""
        client = _redis()
        try:
            for i in range(n):
                if i == hold_at:
                    await asyncio.to_thread(client.blpop, [release_key(tag)], 60)
                client.incr(progress_key(tag))
                yield {"i": i}
        except GeneratorExit:
            client.set(closed_key(tag), 1, ex=600)
            raise

    def failing(self, n: int) -> Generator[str, None, None]:
        for i in range(n):
            yield f"chunk {i}"
        raise ValueError(f"model broke after {n} chunks")

    def endless(self, tag: str) -> Generator[str, None, None]:
        """Yields until it is stopped; records that it was closed."""
        client = _redis()
        try:
            i = 0
            while True:
                client.incr(progress_key(tag))
                yield f"tick {i}\n"
                i += 1
                time.sleep(0.05)
        finally:
            client.set(closed_key(tag), 1, ex=600)

    def big(self, n: int, size: int) -> Generator[str, None, None]:
        for _ in range(n):
            yield "x" * size

    def __call__(self, request: Request) -> Generator[str, None, None]:
        """Over HTTP: a plain generator streams as text; `?tag=` makes it gated."""
        endless = request.query_params.get("endless")
        if endless:
            yield from self.endless(endless)
            return
        tag = request.query_params.get("tag")
        n = int(request.query_params.get("n", "5"))
        client = _redis()
        for i in range(n):
            if tag and i == int(request.query_params.get("hold_at", "1")):
                client.blpop([release_key(tag)], 60)
            yield f"line {i}\n"


@deployment
class SSE:
    async def __call__(self, request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", "5"))
        fail = request.query_params.get("fail") == "1"
        tag = request.query_params.get("tag")

        async def events() -> AsyncGenerator[str, None]:
            for i in range(n):
                if tag and i == int(request.query_params.get("hold_at", "2")):
                    await asyncio.to_thread(_redis().blpop, [release_key(tag)], 60)
                yield f"data: token {i}\n\n"
            if fail:
                raise RuntimeError("generation failed")

        return StreamingResponse(events(), media_type="text/event-stream")


api = FastAPI()


@deployment
@ingress(api)
class Api:
    @api.get("/tokens")
    async def tokens(self, n: int = 3) -> StreamingResponse:
        async def gen() -> AsyncGenerator[bytes, None]:
            for i in range(n):
                yield f"tok{i} ".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(gen(), media_type="text/plain", headers={"X-Model": "tiny"})

    @api.get("/plain")
    def plain(self) -> dict[str, str]:
        return {"hello": "world"}


@deployment(max_ongoing_requests=16)
class Batched:
    """Ray's batched streaming example: each caller gets its own tokens; a stream ends on its own."""

    async def hold(self, tag: str) -> str:
        """Keep the replica busy until the test releases it, so requests queue up: async and blocking on purpose
        (a sync method would run in a thread, and the replica would go on taking requests)."""
        client = _redis()
        client.set(progress_key(tag), 1, ex=600)
        client.blpop([release_key(tag)], 30)
        return "released"

    @batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    async def generate(self, counts: list[int]) -> AsyncGenerator[list[Any], None]:
        _redis().rpush(f"{KEY_PREFIX}batch-sizes", len(counts))
        for step in range(max(counts)):
            yield [f"{n}:{step}" if step < n else StopIteration for n in counts]
            await asyncio.sleep(0.01)


@deployment(max_ongoing_requests=1200)
class Many:
    """Streams held open together: each sends its first chunk, then waits for the test's release."""

    def __init__(self) -> None:
        self._released: dict[str, asyncio.Event] = {}

    async def __call__(self, request: Request) -> StreamingResponse:
        tag, i = request.query_params["tag"], request.query_params["i"]

        async def gen() -> AsyncGenerator[str, None]:
            yield f"first {i}\n"
            await self._wait(tag)
            for part in range(3):
                yield f"{i}.{part}\n"

        return StreamingResponse(gen(), media_type="text/plain")

    async def _wait(self, tag: str) -> None:
        event = self._released.get(tag)
        if event is None:
            event = self._released[tag] = asyncio.Event()
            asyncio.get_running_loop().create_task(self._watch(tag, event))
        await event.wait()

    async def _watch(self, tag: str, event: asyncio.Event) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        try:
            while not await client.exists(release_key(tag)):
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        event.set()


@deployment(stream_max_chunks=20, stream_max_bytes=4096)
class NumberStreamer:
    """Ray's `DeploymentResponseGenerator` example, as in its API reference (plus caps, and `big` to pass them)."""

    def big(self, n: int, size: int) -> Generator[str, None, None]:
        for _ in range(n):
            yield "x" * size

    def generate_numbers(self, limit: int) -> Generator[int, None, None]:
        for i in range(limit):  # noqa: UP028 - Ray's example as it is written
            yield i


@deployment
class Caller:
    def __init__(self, handle: DeploymentHandle) -> None:
        # Set `stream=True` on the handle to enable streaming calls.
        self._streaming_handle = handle.options(stream=True)

    async def __call__(self, limit: int) -> AsyncGenerator[int, None]:
        gen: DeploymentResponseGenerator = self._streaming_handle.generate_numbers.remote(limit)

        # Inside a deployment: use `async for` to enable concurrency.
        async for i in gen:
            yield i


@deployment
def shout(request: Request) -> str:
    return request.query_params.get("text", "hi").upper()


@deployment
class Spell:
    """The last step of a chain: streams the previous step's text one letter at a time."""

    def __call__(self, text: str) -> Generator[str, None, None]:
        for letter in text:
            yield letter + "\n"


textgen_app = Textgen.bind()
chain_app = shout.bind() >> Spell.bind()
caller_app = Caller.bind(NumberStreamer.bind())
many_app = Many.bind()
app = Streamer.bind()
sse_app = SSE.bind()
api_app = Api.bind()
batched_app = Batched.bind()
