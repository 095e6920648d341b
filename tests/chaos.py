"""The fault-injection harness: a whole celery-serve stack of real processes that a test can hurt, and a
ledger of every accepted request, checked at the end.

`Stack` runs a redis-server of its own (restartable, with or without persistence), a TCP proxy between every
celery-serve process and that Redis (to reset, black-hole or refuse connections), the applications' worker
processes and a gateway. `Ledger` submits jobs under load and, at the end, reads every accepted one back:
each must end exactly once, in a terminal state, with the right result; executions are counted from what the
deployments record (see `tests/chaos_deployments.py`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from celery_serve._cli.common import import_application
from celery_serve._runtime import serve as _serve
from celery_serve._runtime.launcher import (
    ProcessGroup,
    child_env,
    free_port,
    redis_server_binary,
    scaler_command,
    worker_command,
)
from celery_serve._runtime.spec import AppSpec, build_spec
from celery_serve._wire import keys as _keys
from tests.conftest import start_gateway, wait_until
from tests.tcp_proxy import TcpProxy

TERMINAL = {"succeeded", "failed", "expired", "cancelled"}


@dataclass
class Stack:
    tmp: Path
    apps: dict[str, str]  # application name -> "module:attribute"
    proxy: bool = True
    appendonly: bool = False
    env: dict[str, str] = field(default_factory=dict)
    scaler: bool = False

    def start(self) -> Stack:
        self.group = ProcessGroup()
        self.redis_port = free_port()
        self.redis_dir = self.tmp / "redis"
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.start_redis()
        self.direct_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.tcp = TcpProxy("127.0.0.1", self.redis_port).start() if self.proxy else None
        self.url = self.tcp.url() if self.tcp else self.direct_url
        self.redis = redis.Redis.from_url(self.direct_url, socket_timeout=10)
        self.specs: dict[str, AppSpec] = {}
        for name, target in self.apps.items():
            spec = build_spec(import_application(target), name, f"/{name}")
            _serve.deploy_spec(self.direct_url, spec)
            self.specs[name] = spec
        self.child_env = child_env(
            {"CHAOS_REDIS_URL": self.direct_url, "REDIS_URL": self.url, "SERVE_LOG_LEVEL": "WARNING", **self.env}
        )
        self.workers: dict[str, Any] = {}
        for name, spec in self.specs.items():
            for dep in spec.deployments:
                self.start_worker(name, dep)
        if self.scaler:
            self.group.start("scaler", scaler_command(), env=self.child_env)
        self.gateway_url = start_gateway(self.group, self.url, self.child_env)
        for name, spec in self.specs.items():
            for dep, dspec in spec.deployments.items():
                want = int(dspec.config["num_replicas"]) if dspec.config["num_replicas"] != "auto" else 1
                wait_until(
                    lambda n=name, d=dep, w=want: _serve.ready_replicas(self.redis, self.specs[n], d) >= w,
                    120,
                    interval_s=0.1,
                    what=f"{want} replicas of {name}.{dep}",
                )
        return self

    # --- Redis -----------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        cmd = [
            redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--dir", str(self.redis_dir), "--save", "", *persistence, "--loglevel", "warning",
        ]  # fmt: skip
        self.redis_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.redis_port, socket_timeout=1, socket_connect_timeout=1)
        wait_until(lambda: _pings(probe), 15, interval_s=0.05, what="redis-server to answer")
        probe.close()

    def restart_redis(self, down_s: float = 1.0) -> None:
        assert self.redis_proc is not None
        self.redis_proc.kill()
        self.redis_proc.wait()
        time.sleep(down_s)
        self.start_redis()

    def pause_redis(self, seconds: float) -> None:
        """CLIENT PAUSE: Redis answers nobody (a hung or overloaded Redis) for `seconds`."""
        self.redis.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")

    # --- processes ---------------------------------------------------------------------------------------------

    def start_worker(self, app: str, dep: str) -> None:
        self.workers[f"{app}.{dep}"] = self.group.start(
            f"worker {app}.{dep}", worker_command(app, dep), env=self.child_env
        )

    def replica_pids(self, app: str, dep: str) -> list[int]:
        worker = psutil.Process(self.workers[f"{app}.{dep}"].proc.pid)
        return sorted(p.pid for p in worker.children(recursive=True) if "replica_main" in " ".join(_cmdline(p)))

    def gateway_pid(self) -> int:
        return next(p.proc.pid for p in self.group.processes if p.name == "gateway")

    def heartbeating(self, app: str, dep: str) -> set[int]:
        """Pids of the replicas whose heartbeat is current."""
        now = time.time()
        alive = set()
        for rid, raw in self.redis.hgetall(_keys.replicas(app, dep)).items():
            until = self.redis.zscore(_keys.heartbeats(app, dep), rid)
            if until is not None and until > now:
                alive.add(int(json.loads(raw)["pid"]))
        return alive

    def locate(self, job_id: str) -> list[str]:
        """Where a request's message is now (for failure messages): queues, in-flight hashes, claim lists."""
        found = []
        needle = job_id.encode()
        for key in self.redis.scan_iter("serve*", count=1000):
            kind = self.redis.type(key)
            if kind == b"list":
                found += [f"{key.decode()}" for m in self.redis.lrange(key, 0, -1) if needle in m]
            elif kind == b"hash" and b"inflight" in key:
                found += [f"{key.decode()}[{k.decode()}]" for k, m in self.redis.hgetall(key).items() if needle in m]
        return found

    def http(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, timeout=timeout)

    def stop(self) -> None:
        for managed in self.group.processes:  # resume anything a test left stopped, so it can exit
            try:
                os.kill(managed.proc.pid, signal.SIGCONT)
                for child in psutil.Process(managed.proc.pid).children(recursive=True):
                    child.send_signal(signal.SIGCONT)
            except (ProcessLookupError, psutil.Error):
                pass
        self.group.stop()
        if self.tcp is not None:
            self.tcp.stop()
        if self.redis_proc is not None:
            self.redis_proc.kill()
            self.redis_proc.wait()
        self.redis.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


# --- the ledger ---------------------------------------------------------------------------------------------------


@dataclass
class Report:
    accepted: int = 0
    refused: int = 0  # answered 503 (Redis unavailable, queue full): not accepted, the caller knows
    succeeded: int = 0
    ended: Counter[str] = field(default_factory=Counter)  # terminal status -> count
    reasons: Counter[str] = field(default_factory=Counter)  # error type of failed/expired jobs
    lost: list[str] = field(default_factory=list)  # 404: the record is gone
    stuck: list[tuple[str, str]] = field(default_factory=list)  # not terminal after the grace
    wrong: list[tuple[str, Any]] = field(default_factory=list)
    executions: Counter[int] = field(default_factory=Counter)  # runs per request -> how many requests
    where: dict[str, Any] = field(default_factory=dict)  # a sample of problem jobs, for the failure message

    @property
    def duplicates(self) -> int:
        return sum(n for runs, n in self.executions.items() if runs > 1)

    def __str__(self) -> str:
        return (
            f"accepted={self.accepted} refused={self.refused} succeeded={self.succeeded} ended={dict(self.ended)} "
            f"reasons={dict(self.reasons)} lost={len(self.lost)} stuck={len(self.stuck)} wrong={len(self.wrong)} "
            f"executions={dict(sorted(self.executions.items()))} sample={self.where}"
        )


class Ledger:
    """Every request the gateway accepted, and the result it must end with."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.accepted: dict[str, str] = {}
        self.refused = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def await_accepted(self, more: int, timeout_s: float = 60.0) -> None:
        """Wait until the load has had `more` requests accepted from now: faults land among real traffic,
        however fast or slow the machine is today."""
        with self.lock:
            target = len(self.accepted) + more
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.accepted) >= target:
                    return
            time.sleep(0.05)
        raise AssertionError(f"the load had fewer than {more} requests accepted within {timeout_s:.0f} s")

    def submit(self, http: httpx.Client, deployment: str, value: str, **kwargs: Any) -> str | None:
        body = {"args": [value], "kwargs": kwargs} if kwargs else value
        try:
            response = http.post(f"/jobs/{deployment}", json=body)
        except httpx.HTTPError:
            with self.lock:
                self.refused += 1  # no answer: not known to be accepted (the gateway never said 202)
            return None
        with self.lock:
            if response.status_code == 202:
                job_id = response.json()["job_id"]
                self.accepted[job_id] = value
                return str(job_id)
            assert response.status_code == 503, (response.status_code, response.text)
            self.refused += 1
        return None

    @staticmethod
    def _read(http: httpx.Client, job_id: str, deadline: float) -> httpx.Response | None:
        """GET the job, waiting for it to end until `deadline`; a 503 or a dropped connection (Redis is the
        fault under test) is retried until then, never counted as the job's state."""
        while True:
            wait = max(0.0, min(30.0, deadline - time.monotonic()))
            try:
                response = http.get(f"/jobs/{job_id}", params={"wait": wait})
                if response.status_code != 503:
                    return response
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)

    def load(self, deployment: str, threads: int = 3, interval_s: float = 0.02, **kwargs: Any) -> None:
        """Submit jobs from `threads` threads until `finish()`."""

        def loop() -> None:
            while not self.stop.is_set():
                url = self.stack.gateway_url  # a gateway started again (on a new port) takes the load from then on
                with self.stack.http(timeout=15) as http:
                    while not self.stop.is_set() and self.stack.gateway_url == url:
                        self.submit(http, deployment, uuid.uuid4().hex, **kwargs)
                        time.sleep(interval_s)

        for _ in range(threads):
            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _locate(self, job_id: str) -> list[str] | str:
        try:
            return self.stack.locate(job_id)
        except redis.RedisError as exc:
            return repr(exc)

    def check(
        self, grace_s: float = 60.0, ids: list[str] | None = None, report: Report | None = None, forget: bool = False
    ) -> Report:
        """Read accepted jobs back (all, or `ids`), waiting up to `grace_s` for the last ones to end; adds to
        `report` when given (a long run checks as it goes, before records pass their retention). `forget` deletes
        the test's own run counters once read, so a soak's Redis memory is celery-serve's alone."""
        with self.lock:
            chosen = {job_id: self.accepted[job_id] for job_id in (list(self.accepted) if ids is None else ids)}
            if report is None:
                report = Report()
            report.accepted, report.refused = len(self.accepted), self.refused
        deadline = time.monotonic() + grace_s
        with self.stack.http(timeout=grace_s + 10) as http:
            for job_id, value in chosen.items():
                response = self._read(http, job_id, deadline)
                if response is None:
                    report.stuck.append((job_id, "unreadable"))
                    continue
                if response.status_code == 404:
                    report.lost.append(job_id)
                    report.where.setdefault("lost", response.json())
                    continue
                job = response.json()
                status = job.get("status")
                if status not in TERMINAL:
                    report.stuck.append((job_id, status))
                    report.where.setdefault("stuck", {**job, "message_in": self._locate(job_id)})
                    continue
                report.ended[status] += 1
                if status == "succeeded":
                    if job.get("result") == {"echo": value}:
                        report.succeeded += 1
                    else:
                        report.wrong.append((job_id, job.get("result")))
                else:
                    report.reasons[(job.get("error") or {}).get("type", "?")] += 1
                    report.where.setdefault(status, job)
            pipe = self.stack.redis.pipeline(transaction=False)
            for value in chosen.values():
                pipe.llen(f"chaos:runs:{value}")
            report.executions.update(int(n) for n in pipe.execute())
            if forget:
                keys = [f"chaos:runs:{value}" for value in chosen.values()]
                for start in range(0, len(keys), 1000):
                    self.stack.redis.delete(*keys[start : start + 1000])
                self.stack.redis.delete("chaos:starts")
        return report
