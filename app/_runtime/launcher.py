"""Starting and stopping the processes of a local deployment: embedded Redis, gateway, workers.

Used by `run()` and by `celery-serve run`. Children get SIGTERM if their parent dies (Linux's parent-death
signal), so even a killed `celery-serve run` leaves no orphans; a clean stop goes in reverse start order,
each process given time to finish what it holds.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery_serve.exceptions import ServeStartupError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 35.0


_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child must not load libraries
except (OSError, AttributeError):
    _prctl = None


def die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGTERM it when the parent exits (Linux).

    The kernel sends it when the parent *thread* that started the child exits, so children that must
    outlive their starter's thread are started with `spawn`.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_spawn_lock = threading.Lock()
_spawn_requests: queue.SimpleQueue[tuple[list[str], dict, concurrent.futures.Future]] | None = None


def spawn(cmd: list[str], **popen_kwargs: object) -> subprocess.Popen[bytes]:
    """`Popen(cmd, preexec_fn=die_with_parent)` from one daemon thread that lives as long as the process.

    So a child dies with this process, not with the thread that asked for it (`run()` may be called
    from a short-lived thread, such as a thread pool's).
    """
    global _spawn_requests
    with _spawn_lock:
        if _spawn_requests is None:
            _spawn_requests = queue.SimpleQueue()
            spawner = threading.Thread(
                target=_spawn_loop, args=(_spawn_requests,), name="celery-serve-spawner", daemon=True
            )
            spawner.start()
    future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _spawn_requests.put((cmd, popen_kwargs, future))
    return future.result()


def _spawn_loop(requests: queue.SimpleQueue[tuple[list[str], dict, concurrent.futures.Future]]) -> None:
    while True:
        cmd, popen_kwargs, future = requests.get()
        try:
            future.set_result(subprocess.Popen(cmd, preexec_fn=die_with_parent, **popen_kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
            future.set_exception(exc)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """The `redis-server` to embed: the newest available (see `celery_serve._runtime.embedded_redis`)."""
    from celery_serve._runtime.embedded_redis import find_binary

    return find_binary().path


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: importable user code (this sys.path) and quiet output."""
    env = os.environ.copy()
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    cwd = os.getcwd()
    if cwd not in paths:
        paths.insert(0, cwd)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen[bytes]

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not stop within %.0fs; killing it", self.name, self.proc.pid, grace_s)
            self.proc.kill()
            self.proc.wait()


@dataclass
class ProcessGroup:
    """The processes one `run` started, stopped together in reverse order.

    `scratch` folders (an embedded Redis's config, holding its password, and socket) are removed once every
    process of the group has stopped."""

    processes: list[ManagedProcess] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, quiet: bool = False
    ) -> ManagedProcess:
        out = subprocess.DEVNULL if quiet else None
        # A session of its own: Ctrl-C in a terminal reaches only us, and we stop children in order (workers
        # hand back their work while Redis is still up); the parent-death signal covers our own death.
        proc = spawn(cmd, env=env or child_env(), stdout=out, stderr=out, start_new_session=True)
        managed = ManagedProcess(name, proc)
        self.processes.append(managed)
        logger.info("started %s (pid %d)", name, proc.pid)
        return managed

    def stop(self, names: set[str] | None = None, grace_s: float = _STOP_GRACE_S) -> None:
        keep = []
        for managed in reversed(self.processes):
            if names is None or managed.name in names:
                managed.stop(max(grace_s, _STOP_GRACE_S))
            else:
                keep.append(managed)
        self.processes = list(reversed(keep))
        if not self.processes:
            for folder in self.scratch:
                shutil.rmtree(folder, ignore_errors=True)
            self.scratch.clear()

    def dead(self) -> list[ManagedProcess]:
        return [m for m in self.processes if m.proc.poll() is not None]


def start_embedded_redis(group: ProcessGroup, data_dir: str | None = None, port: int | None = None) -> str:
    """Start a private redis-server (unix socket in a 0700 directory, random password; TCP on loopback only when
    `port` is given); returns its URL once it answers PING. See `celery_serve._runtime.embedded_redis`."""
    from celery_serve._runtime import embedded_redis

    return embedded_redis.start(group, port=port, data_dir=data_dir).url


def check_port_free(host: str, port: int, what: str, hint: str) -> None:
    """Fail before anything starts when `what` could not bind host:port (another run holds it, say)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ServeStartupError(
                f"{what} cannot listen on {host}:{port}: {reason} (another celery-serve run?); choose another "
                f"port ({hint}...)"
            ) from None


def redis_env(redis_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment with the Redis URL in `REDIS_URL`.

    The URL may hold a password, so it never goes on a command line (any local user reads argv through
    /proc/<pid>/cmdline); a process's environment is readable only by its owner and root.
    """
    return child_env({**(extra or {}), "REDIS_URL": redis_url})


def gateway_command(host: str, port: int) -> list[str]:
    """The gateway's command line; its Redis comes in the environment (`redis_env`)."""
    log_level = os.environ.get("SERVE_LOG_LEVEL", "WARNING")
    return [
        sys.executable, "-m", "celery_serve", "gateway",
        "--host", host,
        "--port", str(port),
        "--log-level", log_level,
    ]  # fmt: skip


def scaler_command() -> list[str]:
    """The scaler's command line; its Redis comes in the environment (`redis_env`)."""
    log_level = os.environ.get("SERVE_SCALER_LOG_LEVEL", "INFO")  # its decisions are logged at INFO
    return [sys.executable, "-m", "celery_serve", "scaler", "--log-level", log_level]


def flower_command(port: int, address: str = "127.0.0.1") -> list[str]:
    """Flower's command line; its Redis and credentials come in the environment, never in argv."""
    log_level = os.environ.get("SERVE_LOG_LEVEL", "WARNING")
    return [
        sys.executable, "-m", "celery_serve", "flower",
        "--port", str(port),
        "--address", address,
        "--log-level", log_level,
    ]  # fmt: skip


def worker_command(app: str, deployment: str, placement: list[list[str]] | None = None) -> list[str]:
    """A worker's command line; its Redis comes in the environment (`redis_env`)."""
    log_level = os.environ.get("SERVE_LOG_LEVEL", "WARNING")
    extra = ["--placement", json.dumps(placement)] if placement else []
    return [
        sys.executable, "-m", "celery_serve", "worker", *extra,
        "--app-name", app,
        "--deployment", deployment,
        "--log-level", log_level,
    ]  # fmt: skip
