"""What every deployment is doing, read from Redis: replicas, queue depth, in flight, throughput, errors.

One reader serves three users: `celery-serve status` (a table or JSON), the gateway's `/metrics` (at
scrape time) and the scaler (its inputs). The reader is written once, as a generator that yields batches
of Redis commands and receives their replies, so a synchronous client (`read_snapshot`) and an asyncio
client (`aread_snapshot`) run the same code, each batch in one pipelined round trip.

Requests "in flight" are those a replica has taken and not finished: the sum over the deployment's
replicas of their in-flight hash and claim list, which queue-length autoscalers miss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Any

from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve.config import autoscaling_of

RATE_WINDOW_S = 10.0  # "recent" throughput: over about the last ten seconds of the scaler's samples
HISTORY_LENGTH = 300  # samples the scaler keeps per deployment (five minutes at one a second)
_RATE_SAMPLES = 30  # the newest samples a reader fetches: enough to reach RATE_WINDOW_S back
RETIRED = "__retired__"  # the stats field holding the summed counts of replicas that are gone

Command = tuple[str, tuple[Any, ...]]


@dataclass
class WorkerStatus:
    """A deployment's Celery worker as it registered itself (see `celery_serve.workers.pool.ReplicaPool`)."""

    hostname: str
    app: str
    deployment: str
    machine: str
    pool_size: int
    num_cpus: float
    num_gpus: float
    machine_cpus: float
    machine_gpus: float
    pid: int = 0

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerStatus:
        info = json.loads(raw)
        return cls(
            hostname=info["hostname"],
            app=info["app"],
            deployment=info["deployment"],
            machine=str(info.get("machine") or ""),
            pool_size=int(info.get("pool_size") or 0),
            num_cpus=float(info.get("num_cpus") or 0.0),
            num_gpus=float(info.get("num_gpus") or 0.0),
            machine_cpus=float(info.get("machine_cpus") or 0.0),
            machine_gpus=float(info.get("machine_gpus") or 0.0),
            pid=int(info.get("pid") or 0),
        )


@dataclass
class DeploymentStatus:
    app: str
    deployment: str
    queue: str
    autoscaling: dict[str, Any] | None  # the autoscaling config, or None for a fixed count
    num_replicas: int | None  # the fixed count, or None when autoscaled
    num_cpus: float
    num_gpus: float
    replicas: int = 0  # what the live workers' pools run (including replicas still starting)
    ready: int = 0  # replicas registered and heartbeating
    desired: int = 0  # what the scaler wants (the fixed count for a fixed deployment)
    queued: int = 0
    in_flight: int = 0
    dead_letters: int = 0  # requests given up on (see `celery-serve dlq list`)
    requests: int = 0  # answered since the deployment first ran, over all its replicas
    errors: int = 0
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    throughput_rps: float | None = None
    errors_per_s: float | None = None
    decision: str | None = None  # the scaler's last reason
    decided_at: float | None = None
    workers: list[WorkerStatus] = field(default_factory=list)
    replica_ids: list[str] = field(default_factory=list)  # the live ones
    scaler_state: dict[str, str] = field(default_factory=dict)

    @property
    def load(self) -> int:
        return self.queued + self.in_flight

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        data["workers"] = [w.hostname for w in self.workers]
        del data["scaler_state"], data["replica_ids"]
        return data


@dataclass
class Snapshot:
    at: float
    deployments: list[DeploymentStatus]
    workers: list[WorkerStatus]  # every live worker, of every deployment (what uses each machine)
    stale_workers: list[str]  # registered but no longer heartbeating
    stats: dict[tuple[str, str], dict[str, dict[str, Any]]]  # (app, deployment) -> replica id -> counts

    def find(self, app: str, deployment: str) -> DeploymentStatus | None:
        for dep in self.deployments:
            if (dep.app, dep.deployment) == (app, deployment):
                return dep
        return None


_PER_DEPLOYMENT = 6  # commands read per deployment in the first round trip


def _reader(now: float) -> Generator[list[Command], list[Any], Snapshot]:
    apps_raw, workers_raw = yield [("hgetall", (_keys.APPS,)), ("hgetall", (_keys.WORKERS,))]
    specs = sorted((AppSpec.from_json(raw) for raw in apps_raw.values()), key=lambda s: s.name)
    registered = {_text(host): raw for host, raw in workers_raw.items()}

    commands: list[Command] = []
    deployments: list[DeploymentStatus] = []
    for spec in specs:
        for dep in spec.deployments.values():
            scaling = autoscaling_of(dep.config)
            deployments.append(
                DeploymentStatus(
                    app=spec.name,
                    deployment=dep.name,
                    queue=dep.queue,
                    autoscaling=scaling.model_dump() if scaling else None,
                    num_replicas=None if scaling else int(dep.config["num_replicas"]),
                    num_cpus=_num_cpus(dep.config),
                    num_gpus=float(dep.config.get("num_gpus") or 0.0),
                )
            )
            commands += [
                ("llen", (dep.queue,)),
                ("hkeys", (_keys.replicas(spec.name, dep.name),)),
                ("hgetall", (_keys.replica_stats(spec.name, dep.name),)),
                ("hgetall", (_keys.autoscale_state(spec.name, dep.name),)),
                ("lrange", (_keys.history(spec.name, dep.name), 0, _RATE_SAMPLES - 1)),
                ("llen", (_keys.dead_letters(spec.name, dep.name),)),
            ]
    hosts = sorted(registered)
    commands += [("exists", (_keys.worker_alive(host),)) for host in hosts]
    replies = yield commands

    alive_workers = {
        host for host, alive in zip(hosts, replies[len(deployments) * _PER_DEPLOYMENT :], strict=True) if alive
    }
    workers = [WorkerStatus.from_json(registered[host]) for host in hosts if host in alive_workers]
    stats: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    histories: list[list[dict[str, Any]]] = []
    commands = []
    replica_ids: list[list[str]] = []
    for i, status in enumerate(deployments):
        queued, ids, stats_raw, state_raw, history_raw, dead = replies[i * _PER_DEPLOYMENT : (i + 1) * _PER_DEPLOYMENT]
        status.queued = int(queued)
        status.dead_letters = int(dead)
        ids = sorted(_text(r) for r in ids)
        replica_ids.append(ids)
        # every replica's heartbeat (alive until when) in one read; its in-flight counts are its own keys
        commands.append(("zrange", (_keys.heartbeats(status.app, status.deployment), 0, -1, False, True)))
        for rid in ids:
            commands += [
                ("hlen", (_keys.replica_inflight(status.app, status.deployment, rid),)),
                ("llen", (_keys.replica_claim(status.app, status.deployment, rid),)),
            ]
        per_replica = {_text(k): json.loads(v) for k, v in stats_raw.items()}
        stats[(status.app, status.deployment)] = per_replica
        _add_counts(status, per_replica.values())
        status.scaler_state = {_text(k): _text(v) for k, v in state_raw.items()}
        histories.append([json.loads(h) for h in history_raw])
        status.workers = [w for w in workers if (w.app, w.deployment) == (status.app, status.deployment)]
        status.replicas = sum(w.pool_size for w in status.workers)
    replies = yield commands

    pos = 0
    for status, ids, history in zip(deployments, replica_ids, histories, strict=True):
        beats = {_text(rid): float(score) for rid, score in replies[pos]}
        pos += 1
        for rid in ids:
            inflight, claimed = replies[pos : pos + 2]
            pos += 2
            alive_until = beats.get(rid)
            if alive_until is not None and alive_until > now:
                status.ready += 1
                status.replica_ids.append(rid)
            status.in_flight += int(inflight) + int(claimed)
        state = status.scaler_state
        if status.autoscaling is None:
            status.desired = int(status.num_replicas or 0)
        else:
            status.desired = int(state["desired"]) if "desired" in state else status.replicas
            status.decision = state.get("reason")
            status.decided_at = float(state["at"]) if "at" in state else None
        status.throughput_rps, status.errors_per_s = _rates(status, history, now)
    stale = [host for host in hosts if host not in alive_workers]
    return Snapshot(now, deployments, workers, stale, stats)


def _add_counts(status: DeploymentStatus, counts: Any) -> None:
    for entry in counts:
        status.requests += int(entry.get("requests", 0))
        status.errors += int(entry.get("errors", 0))
        status.batches += int(entry.get("batches", 0))
        for size, n in (entry.get("batch_sizes") or {}).items():
            status.batch_sizes[int(size)] = status.batch_sizes.get(int(size), 0) + int(n)


def _rates(status: DeploymentStatus, history: list[dict[str, Any]], now: float) -> tuple[float | None, float | None]:
    """Requests and errors per second since the scaler's sample closest to RATE_WINDOW_S ago."""
    older = [h for h in history if now - float(h["t"]) >= 1.0]
    if not older:
        return None, None
    base = min(older, key=lambda h: abs(now - float(h["t"]) - RATE_WINDOW_S))
    span = now - float(base["t"])
    return (
        max(0, status.requests - int(base.get("requests", 0))) / span,
        max(0, status.errors - int(base.get("errors", 0))) / span,
    )


def _num_cpus(config: dict[str, Any]) -> float:
    value = config.get("num_cpus")
    return 1.0 if value is None else float(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_snapshot(client: Any, now: float | None = None) -> Snapshot:
    """Read every deployment's status with a synchronous redis-py client (three round trips)."""
    reader = _reader(time.time() if now is None else now)
    commands = next(reader)
    while True:
        pipe = client.pipeline(transaction=False)
        for name, args in commands:
            getattr(pipe, name)(*args)
        try:
            commands = reader.send(pipe.execute() if commands else [])
        except StopIteration as done:
            return done.value


async def aread_snapshot(client: Any, now: float | None = None) -> Snapshot:
    """The same, with an asyncio redis-py client."""
    reader = _reader(time.time() if now is None else now)
    commands = next(reader)
    while True:
        pipe = client.pipeline(transaction=False)
        for name, args in commands:
            getattr(pipe, name)(*args)
        try:
            commands = reader.send(await pipe.execute() if commands else [])
        except StopIteration as done:
            return done.value


# --- `celery-serve status` ---------------------------------------------------------------------------


def status_json(snapshot: Snapshot) -> str:
    return json.dumps({"at": snapshot.at, "deployments": [d.to_dict() for d in snapshot.deployments]}, indent=2)


def status_table(snapshot: Snapshot) -> str:
    """A readable table: one row per deployment, then the scaler's last reason for autoscaled ones."""
    if not snapshot.deployments:
        return "no applications are deployed"
    header = (
        "APP",
        "DEPLOYMENT",
        "REPLICAS",
        "READY",
        "SCALING",
        "QUEUED",
        "IN FLIGHT",
        "REQ/S",
        "ERR/S",
        "REQUESTS",
        "ERRORS",
    )
    rows = [header]
    notes = []
    for d in snapshot.deployments:
        scaling = (
            "fixed"
            if d.autoscaling is None
            else f"auto {d.autoscaling['min_replicas']}-{d.autoscaling['max_replicas']}"
        )
        rows.append(
            (
                d.app,
                d.deployment,
                f"{d.replicas}/{d.desired}",
                str(d.ready),
                scaling,
                str(d.queued),
                str(d.in_flight),
                "-" if d.throughput_rps is None else f"{d.throughput_rps:.1f}",
                "-" if d.errors_per_s is None else f"{d.errors_per_s:.1f}",
                str(d.requests),
                str(d.errors),
            )
        )
        if d.dead_letters:
            notes.append(f"  {d.app}.{d.deployment}: {d.dead_letters} dead letters (celery-serve dlq list {d.app})")
        if d.decision:
            age = f" ({snapshot.at - d.decided_at:.0f}s ago)" if d.decided_at else ""
            notes.append(f"  {d.app}.{d.deployment}: {d.decision}{age}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 or i == 4 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("REPLICAS is current/desired. REQ/S and ERR/S cover about the last 10 s (recorded by the scaler).")
    if notes:
        lines.append("Last scaling decisions:")
        lines.extend(notes)
    return "\n".join(lines)
