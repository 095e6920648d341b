"""Model loads per 1,000 requests with model affinity against random routing, in one run.

    python benchmarks/multiplex_affinity.py [--requests 1000] [--concurrency 6] [--json out.json]

One deployment, 3 replicas x 2 model slots (`@multiplexed(max_num_models_per_replica=2)`), 6 models,
each request for a model picked uniformly at random. Models take BENCH_MODEL_LOAD_S (0.05 s) to load,
inference BENCH_INFER_S (0.005 s). The same deployment is driven twice from the same process:
- affinity: requests for a model wait on its queue, taken first by a replica that holds it;
- random: the same requests on the deployment's shared queue (affinity off in this caller), so whichever
  replica is free takes one: what routing without model awareness gives.
Loads are counted by the replicas themselves (the largest count each replica reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = [f"model-{i}" for i in range(6)]


async def drive(handle: Any, requests: int, concurrency: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    picks = [rng.choice(MODELS) for _ in range(requests)]
    answers: list[dict[str, Any]] = []
    errors = 0
    latencies: list[float] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for model in picks:
        queue.put_nowait(model)

    async def client() -> None:
        nonlocal errors
        while not queue.empty():
            model = queue.get_nowait()
            started = time.perf_counter()
            try:
                answers.append(await handle.options(multiplexed_model_id=model).remote())
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"answers": answers, "errors": errors, "latencies": sorted(latencies), "seconds": elapsed}


def loads_seen(answers: list[dict[str, Any]]) -> dict[int, int]:
    per_replica: dict[int, int] = {}
    for a in answers:
        per_replica[a["replica"]] = max(per_replica.get(a["replica"], 0), a["loads"])
    return per_replica


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import celery_serve as serve
    from benchmarks.multiplex_app import app
    from celery_serve._runtime import context as _context
    from celery_serve._runtime.launcher import free_port

    os.environ.setdefault("SERVE_SCALER", "0")
    rows = []
    try:
        for mode in ("affinity", "random"):
            handle = serve.run(app, name=f"mx-bench-{mode}", route_prefix=f"/mx-{mode}", port=free_port())
            _context.io_loop().transport.affinity.enabled = mode == "affinity"
            before = loads_seen([handle.options(multiplexed_model_id="warmup").remote().result(timeout_s=60)])
            result = asyncio.run(drive(handle, args.requests, args.concurrency, seed=12))
            per_replica = loads_seen(result["answers"])
            loads = sum(per_replica.values()) - sum(before.values())
            lat = result["latencies"]
            rows.append(
                {
                    "mode": mode,
                    "requests": args.requests,
                    "errors": result["errors"],
                    "replicas_answering": len(per_replica),
                    "model_loads": loads,
                    "loads_per_1000": round(loads * 1000 / args.requests, 1),
                    "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
                    "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2),
                    "req_per_s": round(args.requests / result["seconds"], 1),
                }
            )
            serve.shutdown()
    finally:
        serve.shutdown()
    print("| routing | requests | errors | model loads | loads / 1,000 | p50 ms | p99 ms | req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['requests']} | {r['errors']} | {r['model_loads']} | {r['loads_per_1000']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['req_per_s']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
