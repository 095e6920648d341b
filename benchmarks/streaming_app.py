"""The deployment `benchmarks/streaming.py` measures: a generator of n fixed-size chunks (16 bytes each).

`ticks(n)` is the generator itself, importable so the benchmark can call the very same code in process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse

from celery_serve import deployment

CHUNK = b"token-0123456789"[:15] + b"\n"  # 16 bytes


async def ticks(n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield CHUNK
        await asyncio.sleep(0)


@deployment(max_ongoing_requests=256)
class Ticker:
    async def __call__(self, request: Request) -> StreamingResponse | PlainTextResponse:
        if request.query_params.get("plain"):  # the same request answered with one body: the reference
            return PlainTextResponse(CHUNK.decode())
        n = int(request.query_params.get("n", "1"))
        return StreamingResponse(ticks(n), media_type="text/plain")


app = Ticker.bind()
