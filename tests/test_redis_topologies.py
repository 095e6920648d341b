"""The tests' own Redis starter: a port taken between being found free and being bound costs a retry, not the
test (a Redis Cluster test errored in CI with `Connection refused` when a node could not bind its port)."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import redis

from celery_serve._runtime.launcher import ProcessGroup, free_port
from tests.redis_topologies import start_node, system_redis_server


def test_a_server_whose_port_was_taken_meanwhile_starts_on_another() -> None:
    binary = system_redis_server()
    group = ProcessGroup()
    folder = tempfile.mkdtemp(prefix="celery-serve-node-")
    group.scratch.append(Path(folder))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        offered = iter([taken, free_port()])
        try:
            port, node = start_node(
                group,
                "redis",
                lambda p: [binary, "--port", str(p), "--bind", "127.0.0.1", "--dir", folder, "--save", ""],
                lambda: next(offered),
            )
            assert port != taken
            assert redis.Redis(port=port).ping()
            tried = [p.name for p in group.processes]
            assert tried == [f"redis-{taken}", f"redis-{port}"], tried  # the first exited: the port was taken
        finally:
            group.stop()
