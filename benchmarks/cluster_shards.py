"""One Redis against a 3-shard Redis Cluster, same machine, same run: throughput, latency, Redis CPU per request
(in all, and on the busiest shard), gateway CPU per request and connections per process.

    python benchmarks/cluster_shards.py [--requests 4000] [--concurrency 16] [--json out.json]

Serves three no-op deployments (three applications, benchmarks/noop.py's deployment bound three times) and
sends synchronous HTTP requests through one gateway, spread evenly over the three. On one Redis every
request costs that Redis; on the cluster each deployment's keys live in its own slot, so the three spread
over the shards and each shard carries about a third. Starts its own redis-servers (a system
`redis-server` with cluster support); the baseline is measured in the same run, so quote the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis  # noqa: E402

from benchmarks._load import Result, build_request, run_load  # noqa: E402
from benchmarks.redis_cost import connections_by_process, cpu_s, role_cpu  # noqa: E402
from tests.redis_cluster import cluster_node_port  # noqa: E402

# Names whose deployments' slots fall in different thirds of the slot space (one per shard, as the slots are
# given out below); a name's slot is fixed by its CRC16, and nearby names often share a third.
APPS = ("omega", "alpha", "delta")
SERVICE = "from benchmarks.noop import noop\n\n" + "".join(f"{app} = noop.bind()\n" for app in APPS)


def start_redis(folder: Path, port: int, cluster: bool) -> subprocess.Popen[bytes]:
    node = folder / f"node-{port}"
    node.mkdir()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node), "--save", "",
           "--appendonly", "no", "--loglevel", "warning"]  # fmt: skip
    if cluster:
        cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    raise SystemExit(f"redis-server on port {port} did not start")


def form_cluster(ports: list[int]) -> None:
    """Give each node an equal share of the slots and join them; return when the cluster is ok."""
    clients = [redis.Redis(port=p) for p in ports]
    share = 16384 // len(ports)
    for i, client in enumerate(clients):
        last = 16383 if i == len(ports) - 1 else (i + 1) * share - 1
        client.execute_command("CLUSTER", "ADDSLOTS", *range(i * share, last + 1))
    for client in clients[1:]:
        client.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
    deadline = time.monotonic() + 30
    while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients):
        if time.monotonic() > deadline:
            raise SystemExit("the cluster did not become ok within 30 s")
        time.sleep(0.1)


async def spread_load(port: int, requests: int, concurrency: int) -> Result:
    """`requests` requests over the three applications' routes, `concurrency` at a time, merged."""
    results = await asyncio.gather(
        *(
            run_load(
                f"/{app}", "127.0.0.1", port, build_request("127.0.0.1", port, f"/{app}/?name=bench"),
                concurrency=max(1, concurrency // len(APPS)), requests=requests // len(APPS), max_seconds=300,
            )
            for app in APPS
        )
    )  # fmt: skip
    merged = Result("all", concurrency)
    for r in results:
        merged.latencies_s += r.latencies_s
        merged.errors += r.errors
    merged.elapsed_s = max(r.elapsed_s for r in results)
    return merged


def measure(url: str, ports: list[int], requests: int, concurrency: int) -> dict[str, object]:
    import celery_serve as serve
    from celery_serve._runtime.launcher import free_port

    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    (folder / "bench_apps.py").write_text(SERVICE)
    sys.path.insert(0, str(folder))
    import importlib

    apps = importlib.import_module("bench_apps")
    for app in APPS:
        serve.run(getattr(apps, app), name=app, route_prefix=f"/{app}", port=port, redis_url=url)
    clients = [redis.Redis(port=p) for p in ports]
    try:
        asyncio.run(spread_load(port, 600, concurrency))  # warm-up
        connections: dict[str, int] = {}
        for p, client in zip(ports, clients, strict=True):
            for role, n in connections_by_process(client, p).items():
                connections[role] = connections.get(role, 0) + n
        for client in clients:
            client.config_resetstat()
        cpu0 = [cpu_s(c) for c in clients]
        gw0 = role_cpu("gateway")
        load = asyncio.run(spread_load(port, requests, concurrency))
        per_shard = [cpu_s(c) - c0 for c, c0 in zip(clients, cpu0, strict=True)]
        gateway = role_cpu("gateway") - gw0
        commands = [sum(int(v["calls"]) for v in c.info("commandstats").values()) for c in clients]
    finally:
        serve.shutdown()
    n = max(load.ok, 1)
    return {
        "requests": load.ok,
        "errors": load.errors,
        "req_per_s": round(load.rps, 1),
        "p50_ms": round(load.p50_ms, 2),
        "p99_ms": round(load.p99_ms, 2),
        "redis_cpu_ms_per_request": round(sum(per_shard) / n * 1000, 4),
        "busiest_shard_cpu_ms_per_request": round(max(per_shard) / n * 1000, 4),
        "shard_cpu_shares": [round(s / max(sum(per_shard), 1e-9), 2) for s in per_shard],
        "redis_commands_per_request": round(sum(commands) / n, 2),
        "gateway_cpu_ms_per_request": round(gateway / n * 1000, 4),
        "connections_by_process": connections,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("SERVE_ACCESS_LOG", "0")
    from celery_serve._runtime.launcher import free_port

    folder = Path(tempfile.mkdtemp(prefix="cluster-bench-redis-"))
    single_port = free_port()
    shard_ports = [cluster_node_port() for _ in range(3)]
    procs = [start_redis(folder, single_port, cluster=False)]
    procs += [start_redis(folder, p, cluster=True) for p in shard_ports]
    try:
        form_cluster(shard_ports)
        report = {
            "single": measure(f"redis://127.0.0.1:{single_port}/0", [single_port], args.requests, args.concurrency),
            "cluster_3": measure(
                "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in shard_ports),
                shard_ports,
                args.requests,
                args.concurrency,
            ),
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    single, cluster = report["single"], report["cluster_3"]
    print(f"{args.requests} requests over 3 deployments at concurrency {args.concurrency}")
    print(f"  {'':<36} {'1 Redis':>12} {'3 shards':>12} {'ratio':>8}")
    for key in (
        "req_per_s",
        "p50_ms",
        "p99_ms",
        "redis_cpu_ms_per_request",
        "busiest_shard_cpu_ms_per_request",
        "redis_commands_per_request",
        "gateway_cpu_ms_per_request",
    ):
        a, b = float(single[key]), float(cluster[key])  # type: ignore[arg-type]
        print(f"  {key:<36} {a:>12} {b:>12} {b / a if a else float('nan'):>8.2f}")
    print(f"  shard CPU shares (cluster): {cluster['shard_cpu_shares']}")
    print(f"  connections by process, 1 Redis: {single['connections_by_process']}")
    print(f"  connections by process, 3 shards (all nodes): {cluster['connections_by_process']}")
    print(f"  errors: {single['errors']} / {cluster['errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
