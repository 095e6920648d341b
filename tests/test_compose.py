"""docker-compose.yml runs every part of the sentiment example as in production (Redis, gateway, workers,
scaler, Flower, each health-checked); `docker-compose config` validates it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://redis:6379/0"


FLOWER_AUTH = "admin:s3cret-for-the-test"


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("the docker-compose binary is not installed (apt-get install docker-compose)")
    return subprocess.run(
        [binary, "-f", "docker-compose.yml", "config"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    done = _config({**os.environ, "FLOWER_BASIC_AUTH": FLOWER_AUTH})
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_flower_needs_credentials_from_the_environment(compose: dict[str, Any]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    refused = _config(env)
    assert refused.returncode != 0 and "set FLOWER_BASIC_AUTH=user:password" in refused.stderr
    flower = compose["services"]["flower"]
    assert flower["command"][:2] == ["celery-serve", "flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == FLOWER_AUTH
    # docker-compose 1.x writes a port with a host address in the short form, 2.x in the long one
    ports = [p if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}" for p in flower["ports"]]
    assert [p.removesuffix("/tcp") for p in ports] == ["127.0.0.1:5555:5555"]


def test_every_long_running_part_is_health_checked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "gateway", "scaler", "flower", "worker-embedder", "worker-sentimentclassifier"} <= set(services)
    for name, service in services.items():
        if name != "deploy-spec":
            assert service["healthcheck"]["test"][0] == "CMD", name
    assert services["scaler"]["command"] == ["celery-serve", "scaler"]


def _serve_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("command", [""])[0] == "celery-serve"}


def test_redis_is_persistent_and_health_checked(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data:rw") or v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_every_process_is_configured_by_redis_url_alone(compose: dict[str, Any]) -> None:
    services = _serve_services(compose)
    assert len(services) >= 4
    for name, service in services.items():
        assert service["environment"]["REDIS_URL"] == REDIS_URL, name
        assert "--redis-url" not in service["command"], name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert Path(service["build"]["context"]) == ROOT, name


def test_the_gateway_is_published(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway["command"][:2] == ["celery-serve", "gateway"]
    assert "0.0.0.0" in gateway["command"]
    assert {"published": 8000, "target": 8000} in gateway["ports"]


def test_the_application_is_deployed_once(compose: dict[str, Any]) -> None:
    deploy = compose["services"]["deploy-spec"]
    assert deploy["command"] == ["celery-serve", "deploy", "examples.sentiment:app"]
    assert deploy["restart"] == "no"


def test_each_deployment_has_a_scalable_worker_service(compose: dict[str, Any]) -> None:
    from celery_serve._runtime.spec import build_spec
    from examples.sentiment import app as sentiment_app

    deployments = set(build_spec(sentiment_app, "default", None).deployments)
    workers = {
        s["command"][s["command"].index("--deployment") + 1]: (name, s)
        for name, s in _serve_services(compose).items()
        if s["command"][1] == "worker"
    }
    assert set(workers) == deployments
    for deployment, (name, service) in workers.items():
        assert name == f"worker-{deployment.lower()}"
        # `--scale worker-X=3` needs a service without a fixed container name or host port.
        assert "container_name" not in service and "ports" not in service


def test_the_image_is_python_slim_with_cpu_torch_and_the_models_extra() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile.splitlines()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert 'pip install ".[models]"' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
