"""Soak: minutes of steady load at about 70% of capacity while replicas are killed every 30 s and Redis is
restarted once (with persistence), then a ledger check of every accepted request.

    python benchmarks/soak.py --minutes 10       # make soak

Prints: capacity (measured first, same stack), what was offered and accepted, every accepted request's
ending (lost, stuck, wrong, duplicates: requests that ran more than once) and the memory of every process
and of Redis, sampled every 30 s (flat after warm-up means no leak).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos import Ledger, Report, Stack  # noqa: E402


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def memory(stack: Stack) -> dict[str, float]:
    worker = stack.workers["chaos.Echo"].proc.pid
    return {
        "gateway": _rss_mb([stack.gateway_pid()]),
        "worker": _rss_mb([worker]),
        "replicas": _rss_mb(pids := stack.replica_pids("chaos", "Echo")) / max(len(pids), 1),
        "redis_used": int(stack.redis.info("memory")["used_memory"]) / 2**20,
        "redis_rss": _rss_mb([stack.redis_proc.pid]) if stack.redis_proc else 0.0,
    }


async def _submit_many(url: str, n: int, concurrency: int) -> list[str]:
    ids: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def one() -> None:
            async with sem:
                response = await http.post("/jobs/Echo", json=uuid.uuid4().hex)
                if response.status_code == 202:
                    ids.append(response.json()["job_id"])

        await asyncio.gather(*(one() for _ in range(n)))
    return ids


def capacity(stack: Stack, n: int = 2000) -> float:
    """Requests per second the deployment completes: queue n jobs at once, time until all are answered."""
    started = time.monotonic()
    ids = asyncio.run(_submit_many(stack.gateway_url, n, 32))
    with stack.http(timeout=120) as http:
        for job_id in ids:
            http.get(f"/jobs/{job_id}", params={"wait": 60})
    return len(ids) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity to offer")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between replica kills")
    args = parser.parse_args()
    os.environ.setdefault("SERVE_LOG_LEVEL", "ERROR")
    os.environ.setdefault("SERVE_ACCESS_LOG", "0")  # 50,000 access lines would only fill the terminal
    # a SIGTERM (timeout, kill) unwinds through `finally`, so the stack it started stops with it
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="celery-serve-soak-"))
    stack = Stack(tmp, {"chaos": "tests.chaos_deployments:echo_app"}, appendonly=True).start()
    try:
        cap = capacity(stack)
        rate = cap * args.load
        print(f"capacity {cap:.0f} req/s (2 replicas, no-op); offering {rate:.0f} req/s for {args.minutes:g} min")
        ledger = Ledger(stack)
        stop = threading.Event()

        def offer(share: float) -> None:
            interval = 1.0 / share
            with stack.http(timeout=15) as http:
                next_at = time.monotonic()
                while not stop.is_set():
                    ledger.submit(http, "Echo", uuid.uuid4().hex)
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))

        # Records are kept job_retention_s (300 s): check every request about 90 s after it was accepted (its
        # deadline is 60 s), so the check reads each before it expires and Redis's memory can level off.
        report = Report()
        checked = 0

        def check_as_we_go() -> None:
            nonlocal checked
            while not stop.is_set():
                time.sleep(10)
                with ledger.lock:
                    due = list(ledger.accepted)[checked : max(checked, len(ledger.accepted) - int(rate * 90))]
                if due:
                    ledger.check(grace_s=30, ids=due, report=report, forget=True)
                    checked += len(due)

        threads = [threading.Thread(target=offer, args=(rate / 4,), daemon=True) for _ in range(4)]
        threads.append(threading.Thread(target=check_as_we_go, daemon=True))
        for thread in threads:
            thread.start()
        started = time.monotonic()
        end = started + args.minutes * 60
        next_kill = started + args.kill_every
        restart_at = started + args.minutes * 30  # half-way
        restarted = False
        kills = 0
        samples: list[tuple[float, dict[str, float]]] = []
        next_sample = started
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                samples.append((now - started, memory(stack)))
                next_sample += 30
            if now >= next_kill:
                pids = stack.replica_pids("chaos", "Echo")
                if pids:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    kills += 1
                next_kill += args.kill_every
            if not restarted and now >= restart_at:
                stack.restart_redis(down_s=1.0)
                restarted = True
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(30)
        samples.append((time.monotonic() - started, memory(stack)))
        offered_s = time.monotonic() - started
        with ledger.lock:
            rest = list(ledger.accepted)[checked:]
        report = ledger.check(grace_s=120, ids=rest, report=report)
        print(f"replicas killed: {kills}; Redis restarted: {int(restarted)} (appendonly, fsync always)")
        print(f"accepted {report.accepted} ({report.accepted / offered_s:.0f}/s), refused {report.refused} (503)")
        print(
            f"succeeded {report.succeeded}, other endings {dict(report.ended)}, lost {len(report.lost)}, "
            f"stuck {len(report.stuck)}, wrong {len(report.wrong)}, duplicates {report.duplicates} "
            f"(runs per request: {dict(sorted(report.executions.items()))})"
        )
        print("memory (MiB), every 30 s:")
        print("   t s  gateway  worker  replica (mean)  redis_used  redis_rss")
        for t, mem in samples:
            print(
                f"{t:6.0f}  {mem['gateway']:7.1f}  {mem['worker']:6.1f}  {mem['replicas']:14.1f}  "
                f"{mem['redis_used']:10.1f}  {mem['redis_rss']:9.1f}"
            )
        warm = [m for t, m in samples if t >= 330] or [m for _, m in samples]  # records live 300 s
        for key in ("gateway", "worker", "replicas", "redis_used"):
            first, last = warm[0][key], warm[-1][key]
            print(f"  {key}: {first:.1f} -> {last:.1f} MiB after warm-up ({(last - first) / max(first, 1e-9):+.0%})")
        if report.lost or report.stuck or report.wrong:
            print("FAILED: " + str(report))
            raise SystemExit(1)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
