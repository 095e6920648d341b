"""What an idle deployment costs Redis, per replica: commands/s, CPU and connections with no traffic at all.

    python benchmarks/idle_cost.py [--replicas 1 8] [--seconds 30] [--settle 10]

Serves the no-op deployment (benchmarks/noop.py) with each replica count in turn on a private Redis, waits for
it to settle, then reads Redis's own counters over a quiet window: commands (INFO commandstats, commands run
inside scripts included), CPU (INFO cpu) and connected clients. The difference between the two counts, per
replica added, is what one idle replica costs: its blocking take renewed every second, its heartbeat, its
reconciler, and what the scaler and `/metrics` read about it. The rest (the gateway, the worker, the scaler)
is the fixed part. docs/scaling.md multiplies it out for 100 hosts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis  # noqa: E402

from benchmarks.redis_cost import command_calls, cpu_s  # noqa: E402


def idle(replicas: int, seconds: float, settle: float) -> tuple[float, float, int]:
    """Commands/s, Redis CPU (ms/s) and connected clients of one no-op deployment with `replicas` replicas."""
    import celery_serve as serve
    from benchmarks.noop import noop
    from celery_serve._runtime import serve as runtime
    from celery_serve._runtime.launcher import free_port

    serve.run(noop.options(num_replicas=replicas).bind(), port=free_port())
    try:
        assert runtime._session is not None
        client = redis.Redis.from_url(runtime._session.redis_url)
        time.sleep(settle)
        client.config_resetstat()
        cpu0 = cpu_s(client)
        time.sleep(seconds)
        calls = sum(command_calls(client).values())
        cpu = cpu_s(client) - cpu0
        clients = int(client.info("clients")["connected_clients"])
    finally:
        serve.shutdown()
    return calls / seconds, cpu / seconds * 1000, clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs=2, default=[1, 8], metavar=("FEW", "MANY"))
    parser.add_argument("--seconds", type=float, default=30.0, help="the quiet window measured")
    parser.add_argument("--settle", type=float, default=10.0, help="wait this long after start-up first")
    args = parser.parse_args()
    few, many = args.replicas
    if many <= few:
        parser.error("--replicas FEW MANY: MANY must be more than FEW")
    a, b = idle(few, args.seconds, args.settle), idle(many, args.seconds, args.settle)
    for n, (commands, cpu, clients) in ((few, a), (many, b)):
        print(f"{n:3d} replicas idle: {commands:6.1f} commands/s, Redis CPU {cpu:5.2f} ms/s, {clients} connections")
    added = many - few
    print(
        f"per idle replica: {(b[0] - a[0]) / added:.1f} commands/s, Redis CPU {(b[1] - a[1]) / added:.3f} ms/s, "
        f"{(b[2] - a[2]) / added:.1f} connections"
    )


if __name__ == "__main__":
    main()
