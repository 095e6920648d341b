"""Every example runs with the real CLI (`celery-serve run examples.X:app`), answers over HTTP, and stops
every process it started on SIGTERM or Ctrl-C: no orphans, embedded Redis included."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from celery_serve._runtime.launcher import free_port
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "Press Ctrl-C to stop."


def cli_command(*args: str) -> list[str]:
    """The installed `celery-serve` script (what users run), or the module when it is not on this venv."""
    script = Path(sys.executable).parent / "celery-serve"
    if script.exists():
        return [str(script), *args]
    found = shutil.which("celery-serve")
    return [found, *args] if found else [sys.executable, "-m", "celery_serve", *args]


@dataclass
class CliProcess:
    """A `celery-serve` command running in its own process group, its output collected line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    base_url: str = ""  # set by `serve`: the gateway
    flower_port: int = 0

    @classmethod
    def serve(cls, target: str, redis_url: str, folder: Path, *args: str, **env: str) -> CliProcess:
        """`celery-serve run <target> [args]` from `folder` on `redis_url` (not the environment's REDIS_URL),
        the gateway and Flower on free ports; `env` adds variables."""
        environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        environ.update(SERVE_STATE_DIR=str(folder / "runs"), SERVE_LOG_LEVEL="WARNING", **env)
        port, flower = free_port(), free_port()
        cli = cls.start(
            "run", target, "--port", str(port), "--flower-port", str(flower), "--redis-url", redis_url, *args,
            env=environ, cwd=folder,
        )  # fmt: skip
        cli.env, cli.base_url, cli.flower_port = environ, f"http://127.0.0.1:{port}", flower
        return cli

    @classmethod
    def start(cls, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliProcess:
        proc = subprocess.Popen(
            cli_command(*args),
            cwd=cwd or ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: Ctrl-C can be sent to it as a terminal would
        )
        cli = cls(proc)
        threading.Thread(target=cli._read, daemon=True).start()
        return cli

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and not any(text in line for line in self.lines):
                raise AssertionError(f"{self.proc.args} exited with {self.proc.returncode}:\n{self.output}")
            return any(text in line for line in self.lines)

        wait_until(seen, timeout_s=timeout_s, interval_s=0.05, what=f"{text!r} from {self.proc.args}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM and wait; past `timeout_s`, kill it and everything it started."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_everything()

    def kill_everything(self) -> None:
        """Clean-up after a failed test: this command and every process it started, by their ids."""
        try:
            descendants = self.descendants()
        except psutil.NoSuchProcess:
            descendants = []
        for process in [psutil.Process(self.proc.pid), *descendants]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


def gone(processes: list[psutil.Process]) -> bool:
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def env_without_redis() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)  # the CLI starts its own embedded Redis
    env["SERVE_LOG_LEVEL"] = "WARNING"
    return env


def check_hello(base: str) -> None:
    assert httpx.get(f"{base}/", params={"name": "Ada"}).text == "Hello Ada!"
    assert httpx.get(f"{base}/").text == "Hello world!"


def check_counter(base: str) -> None:
    counts = [httpx.get(f"{base}{path}").json() for path in ("/", "/incr", "/incr", "/decr")]
    assert counts == [{"count": 0}, {"count": 1}, {"count": 2}, {"count": 1}]


def check_composition(base: str) -> None:
    response = httpx.get(f"{base}/")
    assert (response.status_code, response.text) == (200, "Hello world!")


def check_stream(base: str) -> None:
    params = {"prompt": "the queue", "max_tokens": 40}
    with httpx.stream("GET", f"{base}/", params=params, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        request_id = response.headers["x-request-id"]
        parts = [part for part in response.iter_raw() if part]
    text = b"".join(parts).decode()
    assert len(text) == 40 and len(parts) > 1  # one token per chunk, delivered as they came
    assert httpx.get(f"{base}/", params=params, timeout=60).text == text  # fixed seed: the same text
    resumed = httpx.get(f"{base}/jobs/{request_id}/stream", params={"from": 30}, timeout=60)
    assert resumed.text == text[30:]
    events = httpx.get(f"{base}/", params=params, headers={"Accept": "text/event-stream"}, timeout=60)
    assert events.text.startswith(f"id: 0\ndata: {text[0]}\n\nid: 1\ndata: {text[1]}\n\n")
    assert httpx.get(f"{base}/", params={"max_tokens": "many"}, timeout=60).status_code == 400


def sigterm_the_cli(cli: CliProcess) -> None:
    cli.proc.send_signal(signal.SIGTERM)


def ctrl_c_in_a_terminal(cli: CliProcess) -> None:
    os.killpg(cli.proc.pid, signal.SIGINT)  # a terminal sends SIGINT to the whole foreground group


def sigint_the_cli(cli: CliProcess) -> None:
    cli.proc.send_signal(signal.SIGINT)


@pytest.fixture
def cli_processes() -> Iterator[list[CliProcess]]:
    started: list[CliProcess] = []
    yield started
    for cli in started:
        if cli.proc.poll() is None:
            cli.kill_everything()


@pytest.mark.parametrize(
    ("target", "check", "stop"),
    [
        ("examples.hello:app", check_hello, sigterm_the_cli),
        ("examples.counter:app", check_counter, ctrl_c_in_a_terminal),
        ("examples.composition:app", check_composition, sigint_the_cli),
        ("examples.stream:app", check_stream, sigterm_the_cli),
    ],
    ids=["hello-SIGTERM", "counter-Ctrl-C", "composition-SIGINT", "stream-SIGTERM"],
)
def test_example_runs_with_the_cli_and_stops_cleanly(
    cli_processes: list[CliProcess],
    target: str,
    check: Callable[[str], None],
    stop: Callable[[CliProcess], None],
) -> None:
    port = free_port()
    flower = str(free_port())
    cli = CliProcess.start("run", target, "--port", str(port), "--flower-port", flower, env=env_without_redis())
    cli_processes.append(cli)
    cli.wait_for_line(READY_LINE, timeout_s=150)
    assert f"http://127.0.0.1:{port}" in cli.output and "(embedded)" in cli.output

    children = cli.descendants()
    commands = [" ".join(p.cmdline()) for p in children]
    for part in (
        "redis-server",
        "celery_serve gateway",
        "celery_serve worker",
        "celery_serve.workers.replica_main",
    ):
        assert any(part in c for c in commands), f"no {part} among the CLI's processes: {commands}"

    check(f"http://127.0.0.1:{port}")

    stop(cli)
    assert cli.proc.wait(timeout=120) == 0, cli.output
    assert "stopping" in cli.output
    wait_until(lambda: gone(children), timeout_s=30, what="every process the CLI started to exit")
