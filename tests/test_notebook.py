"""`serve.run()` where workers cannot import the deployments: `python -c`, a REPL (stdin) and a notebook cell
(code exec'd into `__main__`'s namespace, as Jupyter does). The code travels to the workers by value; the
requests stay JSON. Each case is a fresh interpreter against the session's Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import celery_serve as serve
from celery_serve._runtime import by_value
from celery_serve._runtime.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent

# One "cell" defines the deployments, the next runs them: what a notebook user types.
CELL_DEFINE = textwrap.dedent(
    """
    import numpy as np
    import celery_serve as serve

    GREETING = "hello"

    def shout(s):
        return s.upper()

    @serve.deployment
    class Greeter:
        def __init__(self, suffix):
            self.suffix = suffix

        async def __call__(self, name):
            return shout(f"{GREETING} {name}{self.suffix}")

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def doubled(self, xs):
            return np.array(xs) * 2
    """
)
CELL_RUN = textwrap.dedent(
    """
    import httpx
    handle = serve.run(Greeter.bind("!"), port=PORT, route_prefix="/nb")
    assert handle.remote("notebook").result(timeout_s=60) == "HELLO NOTEBOOK!"
    assert [r.result(timeout_s=60) for r in [handle.doubled.remote(i) for i in range(5)]] == [0, 2, 4, 6, 8]
    reply = httpx.post(f"http://127.0.0.1:{PORT}/nb", json="http", timeout=60)
    assert reply.status_code == 200, reply.text
    serve.shutdown()
    print("ok")
    """
)


def _env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"REDIS_URL": redis_url, "SERVE_SCALER": "0", "SERVE_LOG_LEVEL": "WARNING"})
    return env


def _run(args: list[str], redis_url: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        cwd="/",  # nothing of this repository is importable by module path from here
        env=_env(redis_url),
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_python_dash_c(redis_url: str) -> None:
    code = CELL_DEFINE + CELL_RUN.replace("PORT", str(free_port())).replace("/nb", "/dash-c")
    done = _run(["-c", code], redis_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_notebook_cells_exec_into_main(redis_url: str) -> None:
    """Jupyter compiles each cell and execs it in the user namespace, `__main__`'s, which has no __file__."""
    port = free_port()
    driver = textwrap.dedent(
        f"""
        import sys
        namespace = sys.modules["__main__"].__dict__
        assert "__file__" not in namespace
        for number, cell in enumerate({[CELL_DEFINE, CELL_RUN.replace("PORT", str(port))]!r}, 1):
            exec(compile(cell, f"<ipython-input-{{number}}>", "exec"), namespace)
        """
    )
    done = _run(["-c", driver], redis_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_repl_on_stdin(redis_url: str) -> None:
    code = CELL_DEFINE + CELL_RUN.replace("PORT", str(free_port())).replace("/nb", "/repl")
    done = _run(["-"], redis_url, stdin=code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_what_cannot_travel_is_refused_saying_what_to_do() -> None:
    @serve.deployment
    class Holder:
        def __init__(self, lock: object) -> None:
            self.lock = lock

    with pytest.raises(serve.DeploymentConfigError) as raised:
        by_value.pack(Holder.bind(threading.Lock()))
    message = str(raised.value)
    assert "cannot be pickled" in message and "lock" in message
    assert "in the deployment's __init__" in message


def test_code_by_value_round_trips_and_is_only_used_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    @serve.deployment
    def echo(x: int) -> int:
        return x

    app = echo.bind()
    packed = by_value.pack(app)
    assert set(packed) == {"by_value", "sha256", "module"}
    assert by_value.unpack(packed).deployment.name == "echo"
    assert not by_value.main_has_no_file()  # pytest's __main__ has a file: nothing goes by value here
    monkeypatch.delattr(sys.modules["__main__"], "__file__", raising=False)
    assert by_value.main_has_no_file()
