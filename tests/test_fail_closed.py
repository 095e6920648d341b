"""Every long-running command fails closed: unreachable Redis, or Redis refusing the credentials, ends it within
seconds with one line on stderr (never a traceback, never a process that keeps running and warning)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from celery_serve._runtime.launcher import free_port
from tests.test_cli import SERVICE
from tests.test_examples import cli_command

pytestmark = pytest.mark.timeout(240)

COMMANDS = {
    "gateway": ["gateway", "--port", "{port}"],
    "worker": ["worker", "--deployment", "Front", "svc:app"],
    "scaler": ["scaler"],
    "flower": ["flower", "--port", "{port}"],
    "run": ["run", "svc:app", "--port", "{port}", "--no-flower"],
}
FAIL_WITHIN_S = 30  # the bound of the test; the commands give up after SERVE's 3 s wait for Redis


def wrong_password(url: str) -> str:
    password = urlsplit(url).password
    assert password, "the session's Redis is expected to have a password"
    return url.replace(f":{password}@", ":not-the-password@", 1)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", ["unreachable", "wrong password", "no password"])
def test_a_command_fails_closed_with_one_line(tmp_path: Path, redis_url: str, command: str, fault: str) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    if fault == "unreachable":
        url = f"redis://127.0.0.1:{free_port()}/0"
    elif fault == "wrong password":
        url = wrong_password(redis_url)
    else:
        url = redis_url.replace(f":{urlsplit(redis_url).password}@", "", 1)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(REDIS_URL=url, SERVE_STATE_DIR=str(tmp_path / "runs"), FLOWER_BASIC_AUTH="a:b")
    args = [a.format(port=free_port()) for a in COMMANDS[command]]
    started = time.monotonic()
    result = subprocess.run(
        cli_command(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=FAIL_WITHIN_S
    )
    elapsed = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result
    assert len(lines) == 1 and lines[0].startswith("celery-serve: "), result.stderr
    expected = "cannot reach Redis" if fault == "unreachable" else "refused the credentials"
    assert expected in lines[0], lines[0]
    assert "not-the-password" not in result.stderr + result.stdout
    print(f"{command} / {fault}: failed closed in {elapsed:.1f}s")
