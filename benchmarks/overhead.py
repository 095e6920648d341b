"""What celery-serve adds to a request: a no-op deployment against a bare FastAPI app, in one run.

    python benchmarks/overhead.py [--seconds 10] [--json out.json]

Both servers run as separate processes on loopback; the same load generator drives both:
p50/p99 latency at concurrency 1 and requests/s at concurrency 32. The floor is a bare FastAPI echo app
under uvicorn (uvloop, httptools); celery-serve's path is gateway -> Redis queue -> replica -> Redis ->
gateway. Bounded in time: each scenario stops at --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._load import Result, dump_json, latency_and_throughput, print_table  # noqa: E402

BARE_APP = """
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
api = FastAPI()

@api.get("/")
def echo(name: str = "world"):
    return PlainTextResponse(f"Hello {name}!")
"""


def wait_http(port: int, path: str, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per scenario")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from celery_serve._runtime.launcher import free_port

    results: list[Result] = []
    bare_port = free_port()
    bare_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".bare_app")
    os.makedirs(bare_dir, exist_ok=True)
    with open(os.path.join(bare_dir, "bare_app.py"), "w") as fh:
        fh.write(BARE_APP)
    bare = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bare_app:api",
            "--port",
            str(bare_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=bare_dir,
    )
    try:
        wait_http(bare_port, "/")
        results += asyncio.run(
            latency_and_throughput("bare FastAPI echo (floor)", bare_port, "/?name=bench", args.seconds)
        )
    finally:
        bare.terminate()
        bare.wait()

    import celery_serve as serve
    from benchmarks.noop import app as noop_app

    port = free_port()
    serve.run(noop_app, port=port)
    try:
        results += asyncio.run(
            latency_and_throughput("celery-serve no-op deployment", port, "/?name=bench", args.seconds)
        )
    finally:
        serve.shutdown()

    print()
    print_table(results)
    floor1, floor32, serve1, serve32 = results
    print()
    print(
        f"added latency at concurrency 1: {serve1.p50_ms - floor1.p50_ms:.3f} ms (p50), ratio {serve1.p50_ms / floor1.p50_ms:.2f}x"
    )
    print(f"throughput at concurrency 32: {serve32.rps / floor32.rps:.2%} of the floor")
    if args.json:
        dump_json(results, args.json)


if __name__ == "__main__":
    main()
