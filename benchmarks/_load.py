"""A small, fast HTTP/1.1 load generator for the benchmarks (keep-alive connections, asyncio streams).

Python HTTP clients spend more CPU per request than the servers we measure, and on a 2-core machine
the client's CPU is taken from the server's. This one parses only the status line and Content-Length,
so the figures describe the server. Every run is bounded by a request count and a time limit.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    label: str
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def pct(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        data = sorted(self.latencies_s)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000 if self.latencies_s else float("nan")

    @property
    def p99_ms(self) -> float:
        return self.pct(0.99)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def row(self) -> dict[str, object]:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "requests": self.ok,
            "errors": self.errors,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "rps": round(self.rps, 1),
        }


class _Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def build_request(
    host: str, port: int, path: str, method: str = "GET", body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run_load(
    label: str,
    host: str,
    port: int,
    raw: bytes,
    *,
    concurrency: int,
    requests: int,
    max_seconds: float,
    warmup: int = 50,
) -> Result:
    """Send `requests` requests from `concurrency` connections (stopping at `max_seconds`)."""
    result = Result(label, concurrency)
    conns = [_Conn(host, port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    for i in range(warmup):
        await conns[i % concurrency].request(raw)
    remaining = requests
    stop_at = time.perf_counter() + max_seconds

    async def worker(conn: _Conn) -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                status = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                await conn.open()
                continue
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.latencies_s.append(time.perf_counter() - t0)
            else:
                result.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    result.elapsed_s = time.perf_counter() - started
    for c in conns:
        c.close()
    return result


def print_table(results: list[Result]) -> None:
    print(f"{'scenario':<44} {'conc':>4} {'ok':>7} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
    for r in results:
        print(
            f"{r.label:<44} {r.concurrency:>4} {r.ok:>7} {r.errors:>4} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.rps:>9.1f}"
        )


def dump_json(results: list[Result], path: str) -> None:
    with open(path, "w") as fh:
        json.dump([r.row() for r in results], fh, indent=2)


async def latency_and_throughput(label: str, port: int, path: str, seconds: float) -> list[Result]:
    """The two figures every overhead benchmark reports: latency at concurrency 1, req/s at 32."""
    raw = build_request("127.0.0.1", port, path)
    c1 = await run_load(
        f"{label} (concurrency 1)", "127.0.0.1", port, raw, concurrency=1, requests=100_000, max_seconds=seconds
    )
    c32 = await run_load(
        f"{label} (concurrency 32)", "127.0.0.1", port, raw, concurrency=32, requests=1_000_000, max_seconds=seconds
    )
    return [c1, c32]
