"""Where a local run is found without a Redis URL: the record each `celery-serve run` or `serve.run()` keeps.

A run writes its record twice: `.serve/run.json` in the folder it was started from, and
`<sys.prefix>/var/celery-serve/runs/<pid>.json` for the Python environment it runs in. `celery-serve status`,
`delete` and `shutdown` read them when neither `--redis-url` nor `REDIS_URL` is given: the current folder's
first, then the environment's; records whose process is gone are ignored (and removed). Both files are 0600
in 0700 folders, since the Redis URL may carry a password.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LOCAL_DIR = ".serve"
LOCAL_FILE = "run.json"


@dataclass
class RunRecord:
    """What `status`, `delete` and `shutdown` need to find and stop a run."""

    pid: int
    redis_url: str
    kind: str  # "cli": a `celery-serve run` process (SIGTERM stops it); "python": `serve.run()` in a program
    session_id: str
    cwd: str
    started_at: float = field(default_factory=time.time)
    gateway_url: str | None = None
    flower_url: str | None = None
    apps: list[str] = field(default_factory=list)
    children: list[dict[str, object]] = field(default_factory=list)  # [{"name", "pid"}], in start order

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, raw: str) -> RunRecord:
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped) is not a live run
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def environment_dir() -> Path:
    """This Python environment's folder of run records (a per-user one if the environment is read-only;
    `SERVE_STATE_DIR` names another)."""
    if os.environ.get("SERVE_STATE_DIR"):
        return Path(os.environ["SERVE_STATE_DIR"])
    preferred = Path(sys.prefix) / "var" / "celery-serve" / "runs"
    if _writable_dir(preferred):
        return preferred
    digest = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    state_home = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state_home / "celery-serve" / f"runs-{digest}"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def local_file(cwd: str | None = None) -> Path:
    return Path(cwd or os.getcwd()) / LOCAL_DIR / LOCAL_FILE


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        path.parent.chmod(0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def save(record: RunRecord) -> None:
    """Write (or rewrite) the run's two records; a folder we cannot write to is skipped with a warning."""
    text = record.to_json()
    for path in (local_file(record.cwd), environment_dir() / f"{record.pid}.json"):
        try:
            _write_private(path, text)
        except OSError as exc:
            logger.warning("could not write the run record %s: %s", path, exc)


def remove(record: RunRecord) -> None:
    """Remove the run's records (the local one only if it is still this run's)."""
    with contextlib.suppress(OSError):
        (environment_dir() / f"{record.pid}.json").unlink()
    path = local_file(record.cwd)
    current = _read(path)
    if current is not None and current.pid == record.pid:
        with contextlib.suppress(OSError):
            path.unlink()


def _read(path: Path) -> RunRecord | None:
    try:
        return RunRecord.from_json(path.read_text())
    except (OSError, ValueError, TypeError):
        return None


def find_runs(cwd: str | None = None) -> list[RunRecord]:
    """Live runs: this folder's first, then the others of this environment (newest first)."""
    found: list[RunRecord] = []
    local = _read(local_file(cwd))
    if local is not None and local.alive:
        found.append(local)
    others = []
    folder = environment_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read(path)
        if record is None or not record.alive:
            with contextlib.suppress(OSError):
                path.unlink()  # left by a run that died without cleaning up
            continue
        if all(record.pid != r.pid for r in found):
            others.append(record)
    found.extend(sorted(others, key=lambda r: r.started_at, reverse=True))
    return found
