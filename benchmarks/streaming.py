"""Streaming through celery-serve against the same generator called in process, in one run.

    python benchmarks/streaming.py [--seconds 10] [--chunks 200] [--json out.json]

The generator (`benchmarks/streaming_app.py`: n chunks of 16 bytes) is served behind the gateway and read
over HTTP with a raw asyncio client (one connection per stream, chunked transfer parsed as it arrives):

- time to first chunk (TTFC) at concurrency 1: request sent -> first chunk's bytes received, against the
  time the same generator takes to produce its first item in this process;
- per-chunk overhead at concurrency 1: (time to last chunk - TTFC) / (n - 1), against the in-process time
  per item;
- chunks per second with 100 streams open at once, each reading n chunks, for --seconds.

The path of a chunk: replica (XADD, pipelined) -> Redis Stream -> the gateway's one XREAD over all streams
-> the client's socket. Bounded in time: each scenario stops at --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pct(data: list[float], q: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def in_process(chunks: int, seconds: float) -> tuple[list[float], list[float]]:
    from benchmarks.streaming_app import ticks

    firsts, per_chunk = [], []
    until = time.monotonic() + seconds
    while time.monotonic() < until and len(firsts) < 2000:
        started = time.perf_counter()
        gen = ticks(chunks)
        await anext(gen)
        first = time.perf_counter()
        async for _ in gen:
            pass
        last = time.perf_counter()
        firsts.append(first - started)
        per_chunk.append((last - first) / (chunks - 1))
    return firsts, per_chunk


async def one_stream(port: int, chunks: int) -> tuple[float, float, int]:
    """(TTFC, time to last chunk, bytes of body) for one streamed request on its own connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.perf_counter()
        writer.write(f"GET /?n={chunks} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {head[:200]!r}")
        first = 0.0
        body = 0
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                break
            await reader.readexactly(size + 2)
            if not first:
                first = time.perf_counter()
            body += size
        return first - started, time.perf_counter() - started, body
    finally:
        writer.close()


async def one_plain(port: int) -> float:
    """Latency of the same request answered in one body (not streamed), on its own connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.perf_counter()
        writer.write(b"GET /?plain=1 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
        if not raw.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {raw[:200]!r}")
        return time.perf_counter() - started
    finally:
        writer.close()


async def plain_requests(port: int, seconds: float) -> list[float]:
    latencies = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        latencies.append(await one_plain(port))
    return latencies


async def sequential(port: int, chunks: int, seconds: float) -> tuple[list[float], list[float]]:
    firsts, per_chunk = [], []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        first, last, body = await one_stream(port, chunks)
        assert body == 16 * chunks, body
        firsts.append(first)
        per_chunk.append((last - first) / (chunks - 1))
    return firsts, per_chunk


async def concurrent(port: int, chunks: int, streams: int, seconds: float) -> tuple[int, int, float, list[float]]:
    received = completed = 0
    firsts: list[float] = []
    until = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal received, completed
        while time.monotonic() < until:
            first, _, body = await one_stream(port, chunks)
            received += body // 16
            completed += 1
            firsts.append(first)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(streams)))
    return received, completed, time.perf_counter() - started, firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per scenario")
    parser.add_argument("--chunks", type=int, default=200, help="chunks per stream")
    parser.add_argument("--streams", type=int, default=100, help="streams open at once in the last scenario")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    import celery_serve as serve
    from benchmarks.streaming_app import app
    from celery_serve._runtime.launcher import free_port

    local_first, local_chunk = asyncio.run(in_process(args.chunks, args.seconds / 2))
    port = free_port()
    serve.run(app, port=port)
    try:
        asyncio.run(sequential(port, args.chunks, 1.0))  # warm up
        plain = asyncio.run(plain_requests(port, args.seconds / 2))
        http_first, http_chunk = asyncio.run(sequential(port, args.chunks, args.seconds))
        received, completed, elapsed, loaded_first = asyncio.run(
            concurrent(port, args.chunks, args.streams, args.seconds)
        )
    finally:
        serve.shutdown()

    ms = 1000.0
    us = 1e6
    rows = {
        "in_process_ttfc_ms_p50": statistics.median(local_first) * ms,
        "in_process_per_chunk_us_p50": statistics.median(local_chunk) * us,
        "served_unstreamed_request_ms_p50": statistics.median(plain) * ms,
        "served_ttfc_ms_p50": statistics.median(http_first) * ms,
        "served_ttfc_ms_p99": pct(http_first, 0.99) * ms,
        "served_per_chunk_us_p50": statistics.median(http_chunk) * us,
        "streams_measured_c1": len(http_first),
        f"chunks_per_s_c{args.streams}": received / elapsed,
        f"streams_completed_c{args.streams}": completed,
        f"ttfc_ms_p50_c{args.streams}": statistics.median(loaded_first) * ms if loaded_first else float("nan"),
    }
    print()
    print(f"chunks per stream: {args.chunks} x 16 bytes; {args.seconds:.0f} s per scenario")
    print(f"{'scenario':<44} {'p50':>10} {'p99':>10}")
    print(
        f"{'in process: time to first chunk (ms)':<44} {rows['in_process_ttfc_ms_p50']:>10.4f} {pct(local_first, 0.99) * ms:>10.4f}"
    )
    print(
        f"{'served:     time to first chunk (ms)':<44} {rows['served_ttfc_ms_p50']:>10.3f} {rows['served_ttfc_ms_p99']:>10.3f}"
    )
    print(
        f"{'served, not streamed: whole response (ms)':<44} {rows['served_unstreamed_request_ms_p50']:>10.3f} "
        f"{pct(plain, 0.99) * ms:>10.3f}"
    )
    print(
        f"{'in process: per chunk (us)':<44} {rows['in_process_per_chunk_us_p50']:>10.2f} {pct(local_chunk, 0.99) * us:>10.2f}"
    )
    print(
        f"{'served:     per chunk (us)':<44} {rows['served_per_chunk_us_p50']:>10.2f} {pct(http_chunk, 0.99) * us:>10.2f}"
    )
    print()
    added = rows["served_ttfc_ms_p50"] - rows["in_process_ttfc_ms_p50"]
    print(f"time to first chunk added at concurrency 1: {added:.3f} ms (target: within 2 ms)")
    print(
        f"time to first chunk minus a whole unstreamed response: "
        f"{rows['served_ttfc_ms_p50'] - rows['served_unstreamed_request_ms_p50']:.3f} ms"
    )
    print(f"per-chunk overhead: {rows['served_per_chunk_us_p50'] - rows['in_process_per_chunk_us_p50']:.1f} us")
    print(
        f"{args.streams} concurrent streams: {rows[f'chunks_per_s_c{args.streams}']:,.0f} chunks/s, "
        f"{completed} streams completed, TTFC p50 {rows[f'ttfc_ms_p50_c{args.streams}']:.2f} ms"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
