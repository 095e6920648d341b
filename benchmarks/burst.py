"""Bursty load against one deployment, fixed and autoscaled: latency, throughput and replicas over time.

    python benchmarks/burst.py [--scale 1.0] [--json out.json]

The deployment does 50 ms of (sleeping) work per request, one request at a time per replica, so one
replica serves about 20 requests/s. The load is open-loop (requests are sent on a schedule, whether or
not earlier ones have finished) and bursty: 4 req/s for 5 s, 50 req/s for 10 s, 4 for 12 s, 50 for 10 s,
4 for 8 s. Three runs, one after the
other, each with its own application on a fresh worker:

    fixed-1   num_replicas=1: too few for the bursts
    fixed-4   num_replicas=4: enough for the bursts, paid for all the time
    auto-1-4  autoscaling_config min 1, max 4, target_ongoing_requests 2, upscale_delay_s 1,
              downscale_delay_s 5, metrics_interval_s 0.5

For each run: a text timeline (offered and completed req/s, p50/p99 latency of the requests sent in each
two-second slice, replicas and queue depth), then a summary with p50/p99 over all requests, throughput,
the most replicas and replica-seconds (what the replicas cost). Bounded in time: each run stops sending
after the schedule (45 s) and waits at most 90 s for the last answers; --scale shortens the schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from starlette.requests import Request  # noqa: E402

from benchmarks._load import _Conn, build_request  # noqa: E402
from celery_serve import deployment  # noqa: E402

WORK_S = 0.05
PHASES = [(5.0, 4.0), (10.0, 50.0), (12.0, 4.0), (10.0, 50.0), (8.0, 4.0)]  # (seconds, requests per second)
SLICE_S = 2.0
DRAIN_LIMIT_S = 90.0
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 5.0,
    "metrics_interval_s": 0.5,
}


@deployment(num_cpus=0.25, request_timeout_s=120, max_queued_requests=-1)
class Work:
    def __call__(self, request: Request) -> str:
        time.sleep(WORK_S)
        return "done"


@dataclass
class Sample:
    t: float
    replicas: int
    ready: int
    queued: int
    in_flight: int


@dataclass
class Run:
    label: str
    sent: list[tuple[float, float | None, int]] = field(default_factory=list)  # (sent at, latency, status)
    samples: list[Sample] = field(default_factory=list)
    duration_s: float = 0.0

    def latencies(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        return [lat for t, lat, status in self.sent if start <= t < end and lat is not None and status == 200]

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies())
        errors = sum(1 for _, lat_, status in self.sent if status != 200)
        replica_seconds = (
            sum(s.replicas for s in self.samples) * (self.samples[1].t - self.samples[0].t)
            if len(self.samples) > 1
            else 0.0
        )
        return {
            "label": self.label,
            "requests": len(self.sent),
            "ok": len(lat),
            "errors": errors,
            "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "p99_ms": round(pct(lat, 0.99) * 1000, 1) if lat else None,
            "throughput_rps": round(len(lat) / self.duration_s, 1) if self.duration_s else None,
            "max_replicas": max((s.replicas for s in self.samples), default=0),
            "replica_seconds": round(replica_seconds, 1),
            "duration_s": round(self.duration_s, 1),
        }


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def schedule(scale: float) -> list[float]:
    """Send times (seconds from the start), evenly spaced within each phase."""
    times, start = [], 0.0
    for seconds, rate in PHASES:
        seconds *= scale
        n = int(seconds * rate)
        times += [start + i / rate for i in range(n)]
        start += seconds
    return times


async def send_load(host: str, port: int, path: str, times: list[float], run: Run) -> None:
    """Open-loop: each request goes out at its time on an idle keep-alive connection, or a new one (an
    HTTP client library's connection pool costs more CPU than the server under test when hundreds of
    requests wait, so this uses the benchmarks' own minimal HTTP/1.1 client)."""
    raw = build_request(host, port, path)
    idle: list[_Conn] = []
    started = time.perf_counter()

    async def one(at: float) -> None:
        conn = idle.pop() if idle else None
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = _Conn(host, port)
                await conn.open()
            status = await conn.request(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            run.sent.append((at, None, 0))
            if conn is not None:
                conn.close()
            return
        run.sent.append((at, time.perf_counter() - t0, status))
        idle.append(conn)

    tasks = []
    for at in times:
        delay = started + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    _, pending = await asyncio.wait(tasks, timeout=DRAIN_LIMIT_S)
    for task in pending:
        task.cancel()
    run.duration_s = time.perf_counter() - started
    for conn in idle:
        conn.close()


def sample_replicas(redis_url: str, app: str, run: Run, stop: threading.Event) -> None:
    from celery_serve._wire.connections import sync_client
    from celery_serve.status import read_snapshot

    client = sync_client(redis_url)
    started = time.perf_counter()
    while not stop.wait(0.5):
        status = read_snapshot(client).find(app, "Work")
        if status is not None:
            run.samples.append(
                Sample(time.perf_counter() - started, status.replicas, status.ready, status.queued, status.in_flight)
            )


def measure(label: str, application: Any, scale: float, port: int) -> Run:
    from celery_serve import run
    from celery_serve._runtime import serve as _serve

    name = label
    run_ = Run(label)
    run(application, name=name, route_prefix=f"/{name}", port=port, startup_timeout_s=180)
    session = _serve._session
    assert session is not None and session.gateway_url is not None
    stop = threading.Event()
    sampler = threading.Thread(target=sample_replicas, args=(session.redis_url, name, run_, stop), daemon=True)
    try:
        sampler.start()
        host, port_ = session.gateway_url.removeprefix("http://").rsplit(":", 1)
        asyncio.run(send_load(host, int(port_), f"/{name}", schedule(scale), run_))
    finally:
        stop.set()
        sampler.join()
        _serve.delete(name)
    return run_


def print_timeline(run: Run, scale: float) -> None:
    print(f"\n== {run.label}: timeline ({SLICE_S:g} s slices; latency of the requests sent in the slice) ==")
    print(
        f"{'t s':>5} {'offered/s':>9} {'done/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'replicas':>8} {'ready':>5} {'queued':>6} {'in flight':>9}"
    )
    end = max(run.duration_s, sum(s for s, _ in PHASES) * scale)
    t = 0.0
    while t < end:
        sent = [x for x in run.sent if t <= x[0] < t + SLICE_S]
        lat = sorted(run.latencies(t, t + SLICE_S))
        done = [x for x in run.sent if x[1] is not None and t <= x[0] + x[1] < t + SLICE_S]
        samples = [s for s in run.samples if t <= s.t < t + SLICE_S]
        replicas = max((s.replicas for s in samples), default=0)
        ready = max((s.ready for s in samples), default=0)
        queued = max((s.queued for s in samples), default=0)
        in_flight = max((s.in_flight for s in samples), default=0)
        p50 = f"{statistics.median(lat) * 1000:8.0f}" if lat else f"{'-':>8}"
        p99 = f"{pct(lat, 0.99) * 1000:8.0f}" if lat else f"{'-':>8}"
        bar = "#" * replicas
        print(
            f"{t:5.0f} {len(sent) / SLICE_S:9.1f} {len(done) / SLICE_S:7.1f} {p50} {p99} {replicas:8d} {ready:5d} {queued:6d} {in_flight:9d}  {bar}"
        )
        t += SLICE_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="stretch (or shrink) the load schedule")
    parser.add_argument("--json", default=None, help="also write the summaries here")
    args = parser.parse_args()
    os.environ.setdefault("SERVE_LOG_LEVEL", "WARNING")
    os.environ.setdefault("SERVE_SCALER_LOG_LEVEL", "WARNING")  # the timeline shows what it did
    from celery_serve import shutdown
    from celery_serve._runtime.launcher import free_port

    port = free_port()
    runs = []
    try:
        for label, application in [
            ("fixed-1", Work.options(num_replicas=1).bind()),
            ("fixed-4", Work.options(num_replicas=4).bind()),
            ("auto-1-4", Work.options(autoscaling_config=AUTOSCALING).bind()),
        ]:
            started = time.perf_counter()
            run_ = measure(label, application, args.scale, port)
            print_timeline(run_, args.scale)
            print(f"   ({label} took {time.perf_counter() - started:.0f} s including start-up)", flush=True)
            runs.append(run_)
    finally:
        shutdown()
    total = len(schedule(args.scale))
    print(
        f"\n== summary: {total} requests per run, {WORK_S * 1000:.0f} ms of work each, phases {PHASES} (x{args.scale:g}) =="
    )
    header = f"{'run':<10} {'ok':>5} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>6} {'max replicas':>12} {'replica-s':>9}"
    print(header)
    for run_ in runs:
        s = run_.summary()
        print(
            f"{s['label']:<10} {s['ok']:>5} {s['errors']:>6} {s['p50_ms']:>8} {s['p99_ms']:>8} "
            f"{s['throughput_rps']:>6} {s['max_replicas']:>12} {s['replica_seconds']:>9}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.summary() for r in runs], fh, indent=2)


if __name__ == "__main__":
    main()
