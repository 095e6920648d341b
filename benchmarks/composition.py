"""Composition two ways, in one run: a pipeline (Celery chain, worker to worker) against an ingress that
calls the same three steps through handles.

    python benchmarks/composition.py [--seconds 8] [--json out.json]

Reports p50/p99 latency at concurrency 1 and requests/s at concurrency 32 for each, over HTTP through
the gateway, plus the one-step no-op as a reference. Bounded in time: each scenario stops at --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._load import Result, dump_json, latency_and_throughput, print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per scenario")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import celery_serve as serve
    from benchmarks import composition_app
    from benchmarks.noop import app as noop_app
    from celery_serve._runtime.launcher import free_port

    port = free_port()
    serve.run(noop_app, name="noop", route_prefix="/noop", port=port)
    serve.run(composition_app.chain, name="chain", route_prefix="/chain", port=port)
    serve.run(composition_app.handles, name="handles", route_prefix="/handles", port=port)
    results: list[Result] = []
    try:
        text = "/?text=What+a+GREAT+day+I+love+it"
        results += asyncio.run(latency_and_throughput("one step (no-op reference)", port, "/noop" + text, args.seconds))
        results += asyncio.run(latency_and_throughput("3 steps as a chain", port, "/chain" + text, args.seconds))
        results += asyncio.run(latency_and_throughput("3 steps through handles", port, "/handles" + text, args.seconds))
    finally:
        serve.shutdown()
    print()
    print_table(results)
    _, _, chain1, chain32, handles1, handles32 = results
    print()
    print(f"chain vs handles, p50 at concurrency 1: {chain1.p50_ms:.2f} ms vs {handles1.p50_ms:.2f} ms")
    print(
        f"chain vs handles, throughput at concurrency 32: {chain32.rps:.0f} vs {handles32.rps:.0f} req/s "
        f"({chain32.rps / handles32.rps:.2f}x)"
    )
    if args.json:
        dump_json(results, args.json)


if __name__ == "__main__":
    main()
