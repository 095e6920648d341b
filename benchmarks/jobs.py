"""Async jobs at volume: 10,000 small jobs through HTTP (POST /jobs) and through the direct Redis client.

    python benchmarks/jobs.py [--jobs 10000] [--concurrency 64] [--timeout-s 240] [--json out.json]

Starts what it needs with `app.run()`: an embedded Redis (unless REDIS_URL is set), the gateway, and
`benchmarks/jobs_app.py` (3 replicas squaring a number). Then, for each path in turn:

1. submit every job (job i computes i*i), at most `--concurrency` submissions in flight: over HTTP with a
   small keep-alive client (Python HTTP clients cost more CPU than the gateway, and the machine is
   shared), directly with `AsyncClient(redis_url=...).submit`;
2. wait for every job (long-poll: `GET /jobs/{id}?wait=60`, or `AsyncJob.result()`) and check its value.

Reported per path: submission rate (all submits answered), completion rate (first submit to the last
job's `finished_at`, as the replicas recorded it), and that none was lost: succeeded == jobs, each value
right. Bounded in time: each path stops at `--timeout-s`. Exits non-zero when a job was lost or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._load import build_request  # noqa: E402

APP_NAME = "jobsbench"
TARGET = "Square"
WARMUP_JOBS = 100
LONG_POLL_S = 60


@dataclass
class PathResult:
    label: str
    jobs: int
    concurrency: int
    submit_s: float = float("nan")  # first submit to the last 202 / submit() return
    complete_s: float = float("nan")  # first submit to the last job's finished_at (replica's clock)
    fetched_s: float = float("nan")  # first submit to the last result read
    succeeded: int = 0
    wrong: int = 0  # succeeded with a value other than i*i
    rejected: int = 0  # submits that did not return a job
    outcomes: Counter[str] = field(default_factory=Counter)  # statuses other than succeeded
    timed_out: bool = False

    @property
    def lost(self) -> int:
        return self.jobs - self.succeeded

    def rate(self, seconds: float) -> float:
        return self.jobs / seconds if seconds and seconds == seconds else float("nan")

    def row(self) -> dict[str, Any]:
        return {
            "path": self.label,
            "jobs": self.jobs,
            "concurrency": self.concurrency,
            "submit_s": round(self.submit_s, 3),
            "submitted_per_s": round(self.rate(self.submit_s), 1),
            "complete_s": round(self.complete_s, 3),
            "completed_per_s": round(self.rate(self.complete_s), 1),
            "fetched_s": round(self.fetched_s, 3),
            "succeeded": self.succeeded,
            "lost": self.lost,
            "wrong": self.wrong,
            "rejected": self.rejected,
            "other_outcomes": dict(self.outcomes),
            "timed_out": self.timed_out,
        }


class _Http:
    """One keep-alive HTTP/1.1 connection that returns the status and the body (Content-Length framed)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        self.writer.write(build_request(self.host, self.port, path, method, body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return int(head[9:12]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _workers(count: int, items: Iterator[int], work: Any) -> None:
    """Run `work(worker_index, item)` over `items` from `count` coroutines (bounded concurrency)."""

    async def worker(index: int) -> None:
        for item in items:  # one iterator shared by all: each item is taken once
            await work(index, item)

    await asyncio.gather(*(worker(k) for k in range(count)))


async def _submit_then_fetch(
    result: PathResult, n: int, concurrency: int, timeout_s: float, submit: Any, fetch: Any
) -> None:
    """Submit every job, then read every result back, timing both from the first submit."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await _workers(concurrency, iter(range(n)), submit)
            result.submit_s = time.perf_counter() - t0
            await _workers(concurrency, iter(range(n)), fetch)
            result.fetched_s = time.perf_counter() - t0
    except TimeoutError:
        result.timed_out = True


def _finished_at(redis_url: str, job_ids: list[str | None]) -> float:
    """The latest `finished_at` among the jobs, read from their job hashes in pipelined chunks."""
    import redis

    from celery_serve._wire import keys as _keys

    client = redis.Redis.from_url(redis_url)
    latest = 0.0
    ids = [i for i in job_ids if i]
    for start in range(0, len(ids), 1000):
        pipe = client.pipeline(transaction=False)
        for job_id in ids[start : start + 1000]:
            pipe.hget(_keys.job(job_id), "finished_at")
        latest = max([latest, *(float(v) for v in pipe.execute() if v)])
    client.close()
    return latest


def _check(result: PathResult, i: int, job: dict[str, Any]) -> None:
    if job["status"] != "succeeded":
        result.outcomes[job["status"]] += 1
    elif job.get("result") != i * i:
        result.wrong += 1
    else:
        result.succeeded += 1


async def http_path(host: str, port: int, redis_url: str, n: int, concurrency: int, timeout_s: float) -> PathResult:
    result = PathResult("HTTP: POST /jobs/Square", n, concurrency)
    conns = [_Http(host, port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    submit_path = f"/jobs/{TARGET}?app={APP_NAME}"

    async def one_call(conn: _Http, i: int) -> dict[str, Any]:
        status, body = await conn.request("POST", submit_path, json.dumps({"args": [i]}).encode())
        assert status == 202, body
        job_id = json.loads(body)["job_id"]
        while True:
            status, body = await conn.request("GET", f"/jobs/{job_id}?wait={LONG_POLL_S}")
            job = json.loads(body)
            if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
                return dict(job)

    for i in range(WARMUP_JOBS):  # connections, routes and replicas warm before the clock starts
        assert (await one_call(conns[i % concurrency], i))["result"] == i * i

    ids: list[str | None] = [None] * n

    async def submit(k: int, i: int) -> None:
        status, body = await conns[k].request("POST", submit_path, json.dumps({"args": [i]}).encode())
        if status == 202:
            ids[i] = json.loads(body)["job_id"]
        else:
            result.rejected += 1

    async def fetch(k: int, i: int) -> None:
        job_id = ids[i]
        if job_id is None:
            return
        while True:
            status, body = await conns[k].request("GET", f"/jobs/{job_id}?wait={LONG_POLL_S}")
            job = json.loads(body)
            if status != 200 or job.get("status") in ("succeeded", "failed", "cancelled", "expired"):
                break
        _check(result, i, job if status == 200 else {"status": f"HTTP {status}"})

    wall0 = time.time()
    try:
        await _submit_then_fetch(result, n, concurrency, timeout_s, submit, fetch)
    finally:
        for conn in conns:
            conn.close()
    result.complete_s = _finished_at(redis_url, ids) - wall0
    return result


async def direct_path(redis_url: str, n: int, concurrency: int, timeout_s: float) -> PathResult:
    from celery_serve import AsyncClient, ServeError
    from celery_serve.client import AsyncJob

    result = PathResult("direct: AsyncClient(redis_url).submit", n, concurrency)
    async with AsyncClient(redis_url=redis_url, app=APP_NAME) as client:
        for i in range(WARMUP_JOBS):
            assert await (await client.submit(TARGET, i)).result(timeout_s=60) == i * i

        jobs: list[AsyncJob | None] = [None] * n

        async def submit(_k: int, i: int) -> None:
            try:
                jobs[i] = await client.submit(TARGET, i)
            except ServeError:
                result.rejected += 1

        async def fetch(_k: int, i: int) -> None:
            job = jobs[i]
            if job is None:
                return
            try:
                value = await job.result(timeout_s=timeout_s)
            except ServeError as exc:
                _check(result, i, {"status": type(exc).__name__})
            else:
                _check(result, i, {"status": "succeeded", "result": value})

        wall0 = time.time()
        await _submit_then_fetch(result, n, concurrency, timeout_s, submit, fetch)
    result.complete_s = _finished_at(redis_url, [j.id if j else None for j in jobs]) - wall0
    return result


def print_table(results: list[PathResult]) -> None:
    print(
        f"{'path':<40} {'jobs':>6} {'conc':>4} {'submit s':>9} {'submit/s':>9} {'done s':>8} {'done/s':>8} "
        f"{'fetched s':>9} {'ok':>6} {'lost':>5} {'wrong':>5}"
    )
    for r in results:
        print(
            f"{r.label:<40} {r.jobs:>6} {r.concurrency:>4} {r.submit_s:>9.2f} {r.rate(r.submit_s):>9.1f} "
            f"{r.complete_s:>8.2f} {r.rate(r.complete_s):>8.1f} {r.fetched_s:>9.2f} "
            f"{r.succeeded:>6} {r.lost:>5} {r.wrong:>5}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per path")
    parser.add_argument("--concurrency", type=int, default=64, help="submissions (and waits) in flight")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="time limit for each path")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("SERVE_LOG_LEVEL", "WARNING")

    import celery_serve as serve
    from benchmarks.jobs_app import NUM_REPLICAS
    from benchmarks.jobs_app import app as bench_app
    from celery_serve._runtime.launcher import free_port

    port = free_port()
    started = time.perf_counter()
    serve.run(bench_app, name=APP_NAME, route_prefix="/square", port=port)
    redis_url = serve._serve.redis_url()
    took = time.perf_counter() - started
    print(f"started Redis, the gateway and {NUM_REPLICAS} replicas of {TARGET} in {took:.1f}s")
    try:
        results = [
            asyncio.run(http_path("127.0.0.1", port, redis_url, args.jobs, args.concurrency, args.timeout_s)),
            asyncio.run(direct_path(redis_url, args.jobs, args.concurrency, args.timeout_s)),
        ]
    finally:
        serve.shutdown()

    print()
    print(f"{args.jobs} jobs per path, {os.cpu_count()} CPUs, {NUM_REPLICAS} replicas of {TARGET} (x -> x*x)")
    print_table(results)
    print()
    print("submit/s: jobs / (first submit to the last submit answered)")
    print("done/s:   jobs / (first submit to the last job's finished_at, recorded by the replica)")
    print("fetched:  first submit to the last result read back (long-poll) and checked")
    for r in results:
        extra = f", other outcomes {dict(r.outcomes)}" if r.outcomes else ""
        extra += f", {r.rejected} submits rejected" if r.rejected else ""
        extra += ", TIMED OUT" if r.timed_out else ""
        verdict = "none lost" if r.lost == 0 and r.wrong == 0 else f"{r.lost} LOST, {r.wrong} wrong"
        print(f"{r.label}: {r.succeeded}/{r.jobs} succeeded with the right value: {verdict}{extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.row() for r in results], fh, indent=2)
    if any(r.lost or r.wrong for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
