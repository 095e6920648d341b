"""A thousand requests in flight at once through one gateway process, which keeps a handful of threads."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from tests.conftest import Served, thread_count

REQUESTS = 1000
MAX_GATEWAY_THREADS = 50


async def _get(host: str, port: int, path: str, opened: asyncio.Event, ready: list[int]) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection (raw sockets: the client must not be the bottleneck)."""
    reader, writer = await asyncio.open_connection(host, port)
    ready.append(1)
    if len(ready) == REQUESTS:
        opened.set()
    await opened.wait()  # every connection is open before any request is sent, so all are in flight together
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _load(served: Served) -> tuple[list[tuple[int, bytes]], int]:
    url = urlsplit(served.gateway_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    opened = asyncio.Event()
    ready: list[int] = []
    peak = thread_count(served.gateway_pid)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, thread_count(served.gateway_pid))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(*(_get(host, port, f"/load?i={i}", opened, ready) for i in range(REQUESTS)))
    finally:
        sampler.cancel()
    return results, peak


def test_a_thousand_concurrent_requests_all_succeed_with_few_gatewaythread_count(served: Served) -> None:
    results, peak_threads = asyncio.run(_load(served))

    statuses = [status for status, _ in results]
    failed = [(s, b) for s, b in results if s != 200]
    assert statuses.count(200) == REQUESTS, (len(failed), failed[:3])
    # Every caller got its own answer: exactly one response per request, none swapped or repeated.
    assert [body.decode() for _, body in results] == [str(i) for i in range(REQUESTS)]
    assert peak_threads < MAX_GATEWAY_THREADS, f"the gateway ran {peak_threads} threads under load"
