"""Replica start-up: from starting a replica process to its first request served.

    python benchmarks/replica_startup.py [--runs 10] [--json out.json]

This bounds scale-up, rollouts and scale-from-zero. A request to the no-op deployment of
`benchmarks/startup_app.py` is queued first; then a replica process is started (`python -m
celery_serve.workers.replica_main`, as a worker pool starts one) and the time until the request's answer
arrives is measured, `--runs` times, each with a fresh process. Printed beside it, in the same run: the bare
interpreter start (`python -c pass`) and importing the replica's modules, the floor under which start-up
cannot go. Run it with another checkout's interpreter (e.g. main's .venv/bin/python) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed_process(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def summary(name: str, samples: list[float]) -> dict[str, float | str]:
    ordered = sorted(samples)
    return {
        "what": name,
        "runs": len(samples),
        "p50_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from benchmarks.startup_app import app
    from celery_serve._runtime import context
    from celery_serve._runtime.launcher import ProcessGroup, start_embedded_redis
    from celery_serve._runtime.serve import deploy_spec
    from celery_serve._runtime.spec import build_spec
    from celery_serve.handle import DeploymentHandle

    group = ProcessGroup()
    url = start_embedded_redis(group)
    try:
        spec = build_spec(app, "startup", "/", source="benchmarks.startup_app:app")
        deploy_spec(url, spec)
        context.set_redis_url(url)
        handle = DeploymentHandle("ready", "startup")
        env = {**os.environ, "REDIS_URL": url, "SERVE_LOG_LEVEL": "WARNING"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        startup: list[float] = []
        for i in range(args.runs):
            response = handle.remote()
            time.sleep(0.05)  # the request is queued before the replica exists
            started = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery_serve.workers.replica_main", "--app", "startup", "--deployment", "ready"]
                + ["--redis-url", url, "--replica-id", f"ready@bench-{i}"],
                env=env,
            )
            try:
                response.result(timeout_s=60)
                startup.append(time.perf_counter() - started)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        interpreter = [timed_process([sys.executable, "-c", "pass"]) for _ in range(args.runs)]
        imports = [
            timed_process([sys.executable, "-c", "import celery_serve.workers.replica_main"]) for _ in range(args.runs)
        ]
    finally:
        context.reset()
        group.stop()
    rows = [
        summary("process start -> first request served", startup),
        summary("python -c pass", interpreter),
        summary("python -c 'import celery_serve.workers.replica_main'", imports),
    ]
    load = os.getloadavg()[0]
    print(f"replica start-up ({sys.executable}; load average {load:.1f} on {os.cpu_count()} cores)")
    for row in rows:
        print(f"  {row['what']:<55} p50 {row['p50_s']:.3f} s  min {row['min_s']:.3f} s  max {row['max_s']:.3f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.executable, "load": load, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
