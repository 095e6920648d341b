"""What liveness costs Redis: commands per second for heartbeats and reaping, per replica, measured.

    python benchmarks/liveness_cost.py --replicas 8 --seconds 30

Starts one deployment with N idle replicas, resets Redis's command statistics, waits, and reads
INFO commandstats: the scripts a replica runs for liveness (HEARTBEAT every 2 s, the reaper lease every 5 s,
STALE by the lease holder) against the blocking takes an idle replica also makes. The old design had every
replica check every other one every 5 s: N*(N-1)/5 script calls per second; this one is O(N).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos import Stack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    stack = Stack(Path(tempfile.mkdtemp()), {"chaos": "tests.chaos_deployments:echo_app"}, proxy=False).start()
    try:
        from celery import Celery

        # grow the pool through Celery's remote control, as the scaler does
        control = Celery(broker=stack.direct_url)
        host = next(iter(w.decode() for w in stack.redis.hkeys("serve:workers")))
        control.control.pool_grow(args.replicas - 2, destination=[host])
        deadline = time.monotonic() + 120
        while len(stack.heartbeating("chaos", "Echo")) < args.replicas and time.monotonic() < deadline:
            time.sleep(0.5)
        n = len(stack.heartbeating("chaos", "Echo"))
        time.sleep(3)
        stack.redis.config_resetstat()
        time.sleep(args.seconds)
        stats = stack.redis.info("commandstats")
        per_s = {k.removeprefix("cmdstat_"): v["calls"] / args.seconds for k, v in stats.items()}
        print(f"{n} idle replicas, {args.seconds:.0f} s: Redis commands per second (all of them, idle)")
        for name, rate in sorted(per_s.items(), key=lambda kv: -kv[1]):
            print(f"  {name:14s} {rate:8.2f}/s  ({rate / max(n, 1):.2f} per replica)")
        expected = n / 2.0 + n / 5.0 + 1 / 5.0
        print(f"liveness scripts (EVALSHA) by schedule: {expected:.1f}/s = HEARTBEAT n/2 + LEAD n/5 + STALE 1/5")
        print(f"all-pairs reaping (before) at n={n}: {n * (n - 1) / 5:.1f}/s; at 800 replicas {800 * 799 / 5:,.0f}/s")
        print(f"this design at 800 replicas: {800 / 2 + 800 / 5 + 0.2:,.0f}/s")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
