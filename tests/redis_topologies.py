"""Real Redis topologies for tests: a Sentinel-managed master with replicas, on loopback.

Uses a system `redis-server` (Debian's ships Sentinel mode; `.ci/run` installs it). Tests that need one
skip with the reason when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_serve._runtime.launcher import ManagedProcess, ProcessGroup, free_port

MASTER = "mymaster"


def system_redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("no system redis-server on PATH (apt-get install redis-server redis-sentinel)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    if "v=6." in version or "v=5." in version:
        pytest.skip(f"Sentinel tests want redis-server >= 7 (found {version.strip()})")
    return found


def _wait_ping(port: int, node: ManagedProcess, timeout_s: float = 15.0) -> bool:
    """Wait until the server on `port` answers PING: True; False as soon as `node` (its process) has exited."""
    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return True
        except redis.exceptions.RedisError:
            if node.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_node(
    group: ProcessGroup, name: str, command: Callable[[int], list[str]], pick_port: Callable[[], int] = free_port
) -> tuple[int, ManagedProcess]:
    """Start a redis-server (or Sentinel) with `command(port)` on a port `pick_port` chooses; return the port
    and the process once it answers PING.

    A port found free can be taken before the server binds it (any process's outgoing connection may get it
    as its local port); the server then exits at once, and is started again on another port."""
    exits = []
    for _ in range(5):
        port = pick_port()
        node = group.start(f"{name}-{port}", command(port), quiet=True)
        if _wait_ping(port, node):
            return port, node
        exits.append(f"port {port}: exit code {node.proc.returncode}")
    raise AssertionError(f"{name} exited at start on every port tried ({'; '.join(exits)})")


@dataclass
class SentinelSet:
    """A master, its replicas and the Sentinels watching them, all on 127.0.0.1."""

    group: ProcessGroup
    folder: Path
    master_port: int
    replica_ports: list[int]
    sentinel_ports: list[int]
    nodes: dict[int, ManagedProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def current_master(self) -> int:
        for port in self.sentinel_ports:
            try:
                host, master_port = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
                return int(master_port)
            except redis.exceptions.RedisError:
                continue
        raise AssertionError("no Sentinel answered")

    def kill(self, port: int) -> None:
        """SIGKILL a data node (as a crashed machine would stop it)."""
        self.nodes[port].proc.kill()
        self.nodes[port].proc.wait()

    def wait_for_failover(self, old_master: int, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                port = self.current_master()
                if port != old_master and redis.Redis(port=port, socket_timeout=1).role()[0] == b"master":
                    return port
            except (AssertionError, redis.exceptions.RedisError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"no replica was promoted within {timeout_s}s")


def start_sentinel_set(group: ProcessGroup, replicas: int = 2, sentinels: int = 3) -> SentinelSet:
    """Start the set and return once every replica is in sync and every Sentinel sees the master."""
    binary = system_redis_server()
    folder = Path(tempfile.mkdtemp(prefix="celery-serve-sentinel-"))
    group.scratch.append(folder)  # removed when the group stops
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning"]

    def data_node(*extra: str) -> Callable[[int], list[str]]:
        def command(port: int) -> list[str]:
            node_dir = folder / f"node-{port}"
            node_dir.mkdir(exist_ok=True)
            return [binary, "--port", str(port), "--dir", str(node_dir), *common, *extra]

        return command

    master, master_node = start_node(group, "redis", data_node())
    result = SentinelSet(group, folder, master, [], [], {master: master_node})
    for _ in range(replicas):
        port, result.nodes[port] = start_node(group, "redis", data_node("--replicaof", "127.0.0.1", str(master)))
        result.replica_ports.append(port)
    deadline = time.monotonic() + 30
    while redis.Redis(port=master).info("replication").get("connected_slaves", 0) < replicas:
        if time.monotonic() > deadline:
            raise AssertionError("replicas did not connect to the master")
        time.sleep(0.05)
    quorum = sentinels // 2 + 1

    def sentinel(port: int) -> list[str]:
        conf = folder / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} {replicas}\n"
        )
        return [binary, str(conf), "--sentinel"]

    for _ in range(sentinels):
        result.sentinel_ports.append(start_node(group, "sentinel", sentinel)[0])
    for port in result.sentinel_ports:
        deadline = time.monotonic() + 30
        while True:
            state = redis.Redis(port=port).sentinel_master(MASTER)
            seen = int(state.get("num-slaves", 0)), int(state.get("num-other-sentinels", 0))
            if seen[0] >= replicas and seen[1] >= sentinels - 1:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"Sentinel {port} does not see the whole set: {state}")
            time.sleep(0.1)
    return result
