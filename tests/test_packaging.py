"""celery-serve as a user gets it: a wheel built from this checkout, installed into a fresh virtualenv.

It installs one import package, `celery_serve` (nothing named app, api or workers), and no torch; a user
project with its own `app/`, `api/` and `workers/` packages (FastAPI's tutorial layout) serves through that
venv's `celery-serve run`. Slow (a venv and its packages, from pip's cache when warm): about a minute.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import httpx
import pytest

from celery_serve._runtime.launcher import free_port
from tests.conftest import wait_until
from tests.test_examples import READY_LINE, CliProcess

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    return next(out.glob("celery_serve-*.whl"))


def test_the_wheel_holds_one_import_package_and_needs_no_torch(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"celery_serve"}
    for sub in ("celery_serve/workers/consumer.py", "celery_serve/api/gateway.py", "celery_serve/_wire/scripts.py"):
        assert sub in names
    assert "celery_serve/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist") or []
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.lower().startswith(("torch", "nvidia", "sentence-transformers"))], core
    assert any(r.startswith("torch") and 'extra == "models"' in r for r in requires)
    assert any(r.startswith("celery") and "<" in r for r in core) and any(
        r.startswith("kombu") and "<" in r for r in core
    )
    assert not [r for r in requires if r.startswith(("ruff", "mypy")) and 'extra == "test"' in r]


def test_a_project_with_its_own_app_api_and_workers_packages_serves_from_a_fresh_venv(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=480)
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout.lower()
    assert "celery-serve==" in listed or "celery_serve==" in listed
    assert "torch==" not in listed and "nvidia" not in listed

    project = tmp_path / "project"
    for package in ("app", "api", "workers"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text("")
    (project / "app" / "utils.py").write_text("def greet(name: str) -> str:\n    return f'Hello {name}!'\n")
    (project / "workers" / "gpus.py").write_text("KIND = 'the user workers package'\n")
    (project / "api" / "main.py").write_text("ROUTE = '/greet'\n")
    (project / "app" / "main.py").write_text(
        textwrap.dedent(
            """
            import celery_serve as serve
            from api.main import ROUTE
            from app.utils import greet
            from workers.gpus import KIND


            @serve.deployment
            class Greeter:
                def __call__(self, request) -> dict:
                    return {"text": greet(request.query_params.get("name", "world")), "route": ROUTE, "kind": KIND}


            app = Greeter.bind()
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", SERVE_STATE_DIR=str(tmp_path / "runs"))
    port = free_port()
    script = venv / "bin" / "celery-serve"
    run = CliProcess(
        subprocess.Popen(
            [str(script), "run", "app.main:app", "--port", str(port), "--no-flower"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    )
    import threading

    threading.Thread(target=run._read, daemon=True).start()
    try:
        run.wait_for_line(READY_LINE, 180)
        answer = httpx.get(f"http://127.0.0.1:{port}/", params={"name": "Ada"}).json()
        assert answer == {"text": "Hello Ada!", "route": "/greet", "kind": "the user workers package"}
        run.proc.terminate()
        assert run.proc.wait(timeout=60) == 0, run.output
        wait_until(lambda: not (project / ".serve" / "run.json").exists(), 10, what="the run record to go")
    finally:
        if run.proc.poll() is None:
            run.kill_everything()
