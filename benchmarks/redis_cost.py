"""What one request costs Redis and the gateway: CPU, commands, round trips, memory, and connections per process.

    python benchmarks/redis_cost.py [--requests 5000] [--concurrency 16] [--redis-url URL] [--json out.json]

Serves the no-op deployment (benchmarks/noop.py) and sends synchronous HTTP requests through the
gateway. Redis's own counters give its CPU (INFO cpu, main thread and children) and every command it ran
(INFO commandstats, commands called inside scripts included); a MONITOR sample of a few hundred requests
at concurrency 1 separates round trips (commands a client sent; a pipelined pair, like the blocking take and its
LLEN, counts as two) from commands run inside Lua scripts.
Gateway and replica CPU come from their processes' CPU times. Memory is Redis's `used_memory` grown per
request (what each request leaves for its retention: its job record and its result; a real model's result
adds its response's size), with the keys it added. Connections per process are Redis's client list matched
to local processes. Without --redis-url it starts a private redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import redis  # noqa: E402

from benchmarks._load import build_request, run_load  # noqa: E402


def cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_calls(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}


def command_usec(client: redis.Redis) -> dict[str, int]:
    """Microseconds Redis spent executing each command (a script's total includes the commands it ran)."""
    return {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in client.info("commandstats").items()}


def monitor_sample(url: str, port: int, requests: int) -> tuple[float, float]:
    """Round trips and commands inside scripts per request, from MONITOR over a concurrency-1 sample."""
    lines: list[str] = []
    ready = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        conn = redis.Redis.from_url(url)
        with conn.monitor() as monitor:
            ready.set()
            for event in monitor.listen():
                lines.append(str(event.get("client_type") or event.get("client_address")))
                if stop.is_set():
                    break

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.5)
    lines.clear()
    raw = build_request("127.0.0.1", port, "/?name=bench")
    asyncio.run(run_load("sample", "127.0.0.1", port, raw, concurrency=1, requests=requests, max_seconds=60, warmup=0))
    stop.set()
    redis.Redis.from_url(url).ping()  # wakes the monitor so it sees `stop`
    thread.join(5)
    scripted = sum(1 for x in lines if x == "lua")
    sent = len(lines) - scripted
    return sent / requests, scripted / requests


def _role(pid: int) -> str:
    """A local process's celery-serve role, from its command line."""
    cmdline = " ".join(psutil.Process(pid).cmdline())
    match = re.search(r"celery_serve(?:\.workers\.replica_main| (\w+))", cmdline)
    if match and match.group(0).endswith("replica_main"):
        return "replica"
    return match.group(1) if match else "benchmark"


def _unix_peers(path: str) -> list[int]:
    """The pid at the other end of every connection to the unix socket `path` (one entry per connection): Linux
    names only the server's end of a unix connection, so `ss` pairs the ends by inode and /proc names the owners."""
    out = subprocess.run(["ss", "-xn"], capture_output=True, text=True, check=False).stdout.splitlines()
    peers = set()
    for line in out:
        fields = line.split()
        if len(fields) >= 8 and fields[4] == path:
            peers.add(fields[7])  # the peer's inode
    owners: list[int] = []
    for proc in psutil.process_iter():
        try:
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in peers:
                    owners.append(proc.pid)
        except OSError:
            continue
    return owners


def connections_by_process(client: redis.Redis, redis_port: int | None) -> dict[str, int]:
    """Redis clients per local process (by its celery-serve role): over TCP, Redis's client list matched to local
    sockets; over a unix socket (the embedded Redis), each process's sockets connected to that path."""
    roles: collections.Counter[str] = collections.Counter()
    path = client.connection_pool.connection_kwargs.get("path")
    if path:
        for pid in _unix_peers(path):
            try:
                roles[_role(pid)] += 1
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
        return dict(roles)
    pids: dict[str, int] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == redis_port and conn.pid:
            pids[f"{conn.laddr.ip}:{conn.laddr.port}"] = conn.pid
    for entry in client.client_list():
        owner = pids.get(entry["addr"])
        if owner is not None:
            roles[_role(owner)] += 1
    return dict(roles)


def role_cpu(role: str) -> float:
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "replica_main" in cmdline if role == "replica" else f"celery_serve {role}" in cmdline:
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample", type=int, default=300, help="requests in the MONITOR sample")
    parser.add_argument("--redis-url", default=None, help="measure this Redis (default: a private one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import celery_serve as serve
    from benchmarks.noop import app as noop_app
    from celery_serve._runtime.launcher import free_port

    os.environ.setdefault("SERVE_ACCESS_LOG", "0")  # measure the request path, not the access log
    port = free_port()
    serve.run(noop_app, port=port, redis_url=args.redis_url)
    try:
        from celery_serve._runtime import serve as runtime

        assert runtime._session is not None
        url = runtime._session.redis_url
        client = redis.Redis.from_url(url)
        port_kwarg = client.connection_pool.connection_kwargs.get("port")
        redis_port = int(port_kwarg) if port_kwarg is not None else None
        raw = build_request("127.0.0.1", port, "/?name=bench")
        asyncio.run(
            run_load("warm-up", "127.0.0.1", port, raw, concurrency=args.concurrency, requests=500, max_seconds=30)
        )
        connections = connections_by_process(client, redis_port)

        client.config_resetstat()
        memory0, keys0 = int(client.info("memory")["used_memory"]), int(client.dbsize())
        cpu0, gw0, rep0 = cpu_s(client), role_cpu("gateway"), role_cpu("replica")
        load = asyncio.run(
            run_load(
                "load", "127.0.0.1", port, raw, concurrency=args.concurrency, requests=args.requests, max_seconds=300
            )
        )
        redis_cpu = cpu_s(client) - cpu0
        gateway_cpu, replica_cpu = role_cpu("gateway") - gw0, role_cpu("replica") - rep0
        calls = command_calls(client)
        usec = command_usec(client)
        n = load.ok
        memory, keys = int(client.info("memory")["used_memory"]) - memory0, int(client.dbsize()) - keys0
        round_trips, scripted = monitor_sample(url, port, args.sample)
    finally:
        serve.shutdown()

    commands = sum(calls.values())
    top = sorted(calls.items(), key=lambda kv: kv[1], reverse=True)[:12]
    # time in the command itself: evalsha includes the commands its script ran (counted again under their own names)
    costly = sorted(((k, v) for k, v in usec.items() if k not in ("eval", "evalsha")), key=lambda kv: -kv[1])[:8]
    commands_per_request = {k: round(v / n, 3) for k, v in top}
    executing = {k: round(v / n, 2) for k, v in costly}
    report = {
        "requests": n,
        "errors": load.errors,
        "req_per_s": round(load.rps, 1),
        "redis_cpu_ms_per_request": round(redis_cpu / n * 1000, 4),
        "gateway_cpu_ms_per_request": round(gateway_cpu / n * 1000, 4),
        "replica_cpu_ms_per_request": round(replica_cpu / n * 1000, 4),
        "redis_commands_per_request": round(commands / n, 2),
        "round_trips_per_request": round(round_trips, 2),
        "commands_in_scripts_per_request": round(scripted, 2),
        "redis_memory_bytes_per_request": round(memory / n),
        "redis_keys_per_request": round(keys / n, 2),
        "connections_by_process": connections,
        "commands": commands_per_request,
        "command_usec_per_request": executing,
        "scripts_usec_per_request": round(sum(usec.get(k, 0) for k in ("eval", "evalsha")) / n, 2),
        "executing_usec_per_request": round(
            (sum(usec.values()) - sum(v for k, v in usec.items() if k in ("eval", "evalsha")) + 0.0) / n, 2
        ),
    }
    print(f"{n} requests at concurrency {args.concurrency}: {load.rps:.0f} req/s, {load.errors} errors")
    for key in (
        "redis_cpu_ms_per_request",
        "gateway_cpu_ms_per_request",
        "replica_cpu_ms_per_request",
        "redis_commands_per_request",
        "round_trips_per_request",
        "commands_in_scripts_per_request",
        "redis_memory_bytes_per_request",
        "redis_keys_per_request",
    ):
        print(f"  {key:<36} {report[key]}")
    print(f"  connections by process (idle pools, after warm-up): {connections}")
    print("  commands per request: " + ", ".join(f"{k} {v}" for k, v in commands_per_request.items()))
    print(
        "  executing commands (not scripts' own overhead): "
        + ", ".join(f"{k} {v} us" for k, v in executing.items())
        + f"; scripts in all {report['scripts_usec_per_request']} us"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
