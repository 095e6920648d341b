"""The command line as a user lives with it: one parser, runs found without a Redis URL, application names
owned by their run, one-line errors, the access log, /jobs for unknown names, and /docs.

Each test runs the real `celery-serve` script in a folder of its own, with a run-record folder of its own
(`SERVE_STATE_DIR`), so runs of other tests are never found by mistake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from celery_serve import Client, DeploymentNotFoundError
from celery_serve._runtime.launcher import ProcessGroup, free_port, start_embedded_redis
from tests.conftest import wait_until
from tests.test_examples import READY_LINE, CliProcess, cli_command, gone

pytestmark = pytest.mark.timeout(240)

STARTUP_S = 120.0

SERVICE = textwrap.dedent(
    """
    from fastapi import FastAPI

    import celery_serve as serve

    api = FastAPI()


    @serve.deployment
    @serve.ingress(api)
    class Front:
        @api.get("/hello")
        def hello(self, name: str = "world") -> dict:
            return {"hello": name}


    app = Front.bind()
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's folder holding `svc.py` (a FastAPI ingress served at /)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "svc.py").write_text(SERVICE)
    return folder


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of every command: no REDIS_URL, its own folder of run records."""
    out = dict(os.environ)
    out.pop("REDIS_URL", None)
    out["SERVE_STATE_DIR"] = str(tmp_path / "runs")
    out["SERVE_LOG_LEVEL"] = "WARNING"
    out["HF_HUB_OFFLINE"] = "1"
    return out


@pytest.fixture
def clis() -> Iterator[list[CliProcess]]:
    started: list[CliProcess] = []
    yield started
    for cli in started:
        if cli.proc.poll() is None:
            cli.kill_everything()


def cli(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one short `celery-serve` command to the end."""
    return subprocess.run(cli_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def start_run(clis: list[CliProcess], cwd: Path, env: dict[str, str], *args: str) -> tuple[CliProcess, str]:
    port = free_port()
    run = CliProcess.start("run", "svc:app", "--port", str(port), "--no-flower", *args, env=env, cwd=cwd)
    clis.append(run)
    run.wait_for_line(READY_LINE, STARTUP_S)
    return run, f"http://127.0.0.1:{port}"


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr (no traceback); returns it."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("celery-serve: "), result.stderr
    return lines[0]


# --- the parser -------------------------------------------------------------------------------------


def test_version_and_help(project: Path, env: dict[str, str]) -> None:
    import celery_serve

    version = cli(["--version"], project, env)
    assert version.stdout.strip() == f"celery-serve {celery_serve.__version__}"
    help_text = cli(["run", "--help"], project, env).stdout
    assert "$REDIS_URL" in help_text and "(default: 8000)" in help_text and "$SERVE_PORT" in help_text
    for command in ("run", "deploy", "worker"):  # the application's name is --name everywhere
        assert "--name NAME" in cli([command, "--help"], project, env).stdout
    shutdown_help = cli(["shutdown", "--help"], project, env)
    assert shutdown_help.returncode == 0 and "this folder" in shutdown_help.stdout


# --- one-line errors ---------------------------------------------------------------------------------


def test_clear_errors(project: Path, env: dict[str, str], tmp_path: Path) -> None:
    line = one_line_error(cli(["status", "--redis-url", "localhost:6379"], project, env))
    assert "must start with redis://" in line and "redis://localhost:6379/0" in line

    closed = free_port()
    started = time.monotonic()
    line = one_line_error(cli(["status", "--redis-url", f"redis://127.0.0.1:{closed}/0"], project, env))
    assert f"cannot reach Redis at redis://127.0.0.1:{closed}/0 (connection refused)" in line
    line = one_line_error(cli(["deploy", "svc:app", "--redis-url", f"redis://127.0.0.1:{closed}/0"], project, env))
    assert "cannot reach Redis" in line
    assert time.monotonic() - started < 20  # both answered within seconds, not after a long retry

    line = one_line_error(cli(["status"], project, env))
    assert "no celery-serve run found in this folder or this environment" in line

    line = one_line_error(cli(["run", "svc.py"], project, env))
    assert "try `svc:app`" in line
    line = one_line_error(cli(["run", "nothere:app"], project, env))
    assert "cannot find module 'nothere'" in line and "run from the folder that holds it" in line

    (project / "broken.py").write_text("from app.utils import helper\n")  # fails for a reason of its own
    line = one_line_error(cli(["run", "broken:app"], project, env))
    assert "importing 'broken' failed" in line and "No module named 'app'" in line and "broken.py:1" in line
    assert "run from the folder" not in line

    line = one_line_error(cli(["run", "svc:nope"], project, env))
    assert "has no attribute 'nope'" in line and "its applications are: app" in line

    assert not (project / ".serve").exists() and not (tmp_path / "runs").exists()  # nothing was started


def test_a_taken_port_is_refused_before_anything_starts(project: Path, env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(cli(["run", "svc:app", "--port", str(port), "--no-flower"], project, env))
        assert f"the gateway cannot listen on 127.0.0.1:{port}: already in use" in line and "--port" in line
        line = one_line_error(
            cli(["run", "svc:app", "--port", str(free_port()), "--flower-port", str(port)], project, env)
        )
        assert f"Flower cannot listen on 127.0.0.1:{port}" in line and "--flower-port" in line
    assert not (project / ".serve").exists()  # refused before any process started


# --- a run, found without a URL ----------------------------------------------------------------------


def test_status_delete_and_shutdown_find_the_run_of_this_folder(
    project: Path, env: dict[str, str], clis: list[CliProcess]
) -> None:
    env = {**env, "SERVE_LOG_LEVEL": "INFO"}
    run, base = start_run(clis, project, env)
    record = json.loads((project / ".serve" / "run.json").read_text())
    assert oct((project / ".serve" / "run.json").stat().st_mode & 0o777) == "0o600"
    assert oct((project / ".serve").stat().st_mode & 0o777) == "0o700"

    # the request path, with its access line
    response = httpx.get(f"{base}/hello", params={"name": "Ada"})
    assert response.json() == {"hello": "Ada"}
    request_id = response.headers["x-request-id"]
    wait_until(lambda: any(request_id in line for line in run.lines), 10, what="the access line")
    access = next(line for line in run.lines if request_id in line)
    assert "celery_serve.access" in access and "[gateway " in access
    assert f"{request_id} GET /hello Front 200 " in access and access.endswith("ms")

    # /docs shows the ingress's route under its prefix
    schema = httpx.get(f"{base}/openapi.json").json()
    assert "/hello" in schema["paths"] and "/jobs/{job_id}" in schema["paths"]
    assert httpx.get(f"{base}/docs").status_code == 200

    # jobs: an unknown name is 404 (not a job that "succeeds" with the app's own 404), over HTTP and the client
    unknown = httpx.post(f"{base}/jobs/Nope", json=1)
    assert unknown.status_code == 404 and "default:Front" in unknown.json()["deployments"]
    with Client(base) as client, pytest.raises(DeploymentNotFoundError, match="no deployment named 'Nope'"):
        client.submit("Nope", 1)
    route_job = httpx.post(f"{base}/jobs/-/hello", headers={"X-HTTP-Method-Override": "GET"})
    assert route_job.status_code == 202
    job = httpx.get(f"{base}/jobs/{route_job.json()['job_id']}", params={"wait": 30}).json()
    assert job["status"] == "succeeded" and job["result"] == {"hello": "world"}

    # status and delete without a URL, from the run's folder
    status = cli(["status", "--json"], project, env)
    assert status.returncode == 0, status.stderr
    assert any(d["deployment"] == "Front" for d in json.loads(status.stdout)["deployments"])
    line = one_line_error(cli(["delete", "nope"], project, env))
    assert "no application named 'nope'" in line and "deployed: default" in line

    # shutdown stops it: everything it started ends, its record goes
    children = run.descendants()
    done = cli(["shutdown"], project, env)
    assert done.returncode == 0, done.stderr
    assert f"pid {record['pid']}" in done.stdout
    assert run.proc.wait(timeout=60) == 0
    wait_until(lambda: gone(children), 30, what="every process of the run to end")
    assert not (project / ".serve" / "run.json").exists()
    assert one_line_error(cli(["shutdown"], project, env)).endswith(
        "(nothing to shut down); to remove one application from a Redis, use `celery-serve delete NAME --redis-url URL`"
    )
    shutdown_lines = [line for line in run.lines if "Warm shutdown" in line]
    assert len(shutdown_lines) <= 1 and all("[worker default.Front " in line for line in shutdown_lines)


def test_a_run_from_python_is_found_from_another_folder_of_the_same_environment(
    project: Path, env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    script = project / "prog.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal
            import celery_serve as serve
            from svc import app

            if __name__ == "__main__":
                serve.run(app, name="prog", port={port})
                print("READY", flush=True)
                signal.pause()
            """
        )
    )
    program = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert program.stdout is not None
        assert program.stdout.readline().strip() == "READY"
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        status = cli(["status"], elsewhere, env)
        assert status.returncode == 0 and "prog" in status.stdout, status.stderr
        assert cli(["shutdown"], elsewhere, env).returncode == 0
        wait_until(lambda: not answers(f"http://127.0.0.1:{port}/-/healthz"), 30, what="the gateway to stop")
        assert program.poll() is None  # the program itself is left alone
    finally:
        program.kill()
        program.wait()


# --- application names belong to their run ----------------------------------------------------------


def test_a_second_run_of_the_same_name_is_refused_unless_it_replaces(
    project: Path, env: dict[str, str], clis: list[CliProcess], tmp_path: Path
) -> None:
    group = ProcessGroup()
    try:
        url = start_embedded_redis(group)
        other = tmp_path / "other"
        other.mkdir()
        (other / "svc.py").write_text(SERVICE)
        first, first_base = start_run(clis, project, env, "--redis-url", url)

        refused = one_line_error(
            cli(["run", "svc:app", "--port", str(free_port()), "--no-flower", "--redis-url", url], other, env)
        )
        assert "application 'default' is served by another live run (celery-serve run, pid" in refused
        assert "--replace" in refused
        refused = one_line_error(cli(["deploy", "svc:app", "--redis-url", url], other, env))
        assert "served by another live run" in refused
        assert httpx.get(f"{first_base}/hello").json() == {"hello": "world"}  # the first run is untouched

        second, second_base = start_run(clis, other, env, "--redis-url", url, "--replace")
        first.proc.terminate()
        assert first.proc.wait(timeout=60) == 0
        # stopping the first run did not delete the application the second one now owns
        import redis

        spec = json.loads(redis.Redis.from_url(url).hget("serve:apps", "default"))
        assert spec["owner"]["pid"] == second.proc.pid
        assert httpx.get(f"{second_base}/hello", params={"name": "B"}).json() == {"hello": "B"}
        second.proc.terminate()
        assert second.proc.wait(timeout=60) == 0
        assert redis.Redis.from_url(url).hget("serve:apps", "default") is None  # its owner removed it
    finally:
        group.stop()


def test_json_logs(project: Path, env: dict[str, str], clis: list[CliProcess]) -> None:
    run, base = start_run(clis, project, {**env, "SERVE_LOG_LEVEL": "INFO"}, "--log-format", "json")
    response = httpx.get(f"{base}/hello")
    request_id = response.headers["x-request-id"]
    wait_until(lambda: any(request_id in line for line in run.lines), 10, what="the access line")
    records = [json.loads(line) for line in run.lines if line.startswith("{")]
    assert records and all({"asctime", "level", "component", "logger", "message"} <= r.keys() for r in records)
    access = next(r for r in records if r.get("request_id") == request_id)
    assert access["logger"] == "celery_serve.access" and access["component"] == "gateway"
    assert (access["method"], access["path"], access["deployment"], access["status"]) == ("GET", "/hello", "Front", 200)
    assert {r["component"] for r in records} >= {"run", "gateway", "worker default.Front", "Front"}
