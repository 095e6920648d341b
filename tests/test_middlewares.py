"""Gateway middlewares as Ray's `http_options`: CORS and Starlette middlewares around a real gateway; a CORS
preflight is answered there and never becomes a job."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from celery_serve._runtime.launcher import ProcessGroup
from celery_serve.api import middlewares
from celery_serve.exceptions import DeploymentConfigError
from tests.conftest import Served, start_gateway
from tests.safety_deployments import StampMiddleware

ORIGIN = "https://app.example"


def _jobs(served: Served) -> int:
    with redis.Redis.from_url(served.redis_url) as client:
        return sum(1 for _ in client.scan_iter("serve:job:*", count=1000))


FROM_FILE = f"""\
http_options:
  cors_allow_origins: [{ORIGIN}]
  middlewares:
  - cls: tests.safety_deployments:StampMiddleware
    kwargs: {{value: from-file}}
applications:
- name: strict
  import_path: tests.lifecycle_deployments:echo_app
"""


@pytest.fixture(scope="module")
def gateways(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from celery_serve._runtime.config_file import ConfigFile

    path = tmp_path_factory.mktemp("config") / "serve.yaml"
    path.write_text(FROM_FILE)
    from_file = ConfigFile(path).config.http_options.middleware_spec()  # what `celery-serve run FILE` passes on
    assert from_file is not None
    group = ProcessGroup()
    in_code = middlewares.from_http_options(
        {"middlewares": [Middleware(CORSMiddleware, allow_origins=[ORIGIN], allow_methods=["*"], allow_headers=["*"]),
                         Middleware(StampMiddleware, value="in-code")]}
    )  # fmt: skip
    assert in_code is not None
    try:
        yield {
            "cors": start_gateway(group, served.redis_url, {"SERVE_CORS_ALLOW_ORIGINS": ORIGIN}),
            "in_code": start_gateway(group, served.redis_url, {"SERVE_HTTP_MIDDLEWARES": in_code}),
            "by_path": start_gateway(
                group, served.redis_url, {"SERVE_HTTP_MIDDLEWARES": "tests.safety_deployments:GATEWAY_MIDDLEWARES"}
            ),
            "from_file": start_gateway(group, served.redis_url, {"SERVE_HTTP_MIDDLEWARES": from_file}),
        }
    finally:
        group.stop()


@pytest.mark.parametrize("which", ["cors", "in_code", "from_file"])
def test_a_cors_preflight_is_answered_at_the_gateway_without_a_job(
    served: Served, gateways: dict[str, str], which: str
) -> None:
    before = _jobs(served)
    preflight = httpx.options(
        f"{gateways[which]}/strict",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-a"},
        timeout=10,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert _jobs(served) == before
    refused = httpx.options(
        f"{gateways[which]}/strict",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    actual = httpx.post(f"{gateways[which]}/strict", json={"a": 1}, headers={"Origin": ORIGIN}, timeout=30)
    assert actual.status_code == 200 and actual.headers["access-control-allow-origin"] == ORIGIN


STAMPS = [("in_code", "in-code"), ("by_path", "by-path"), ("from_file", "from-file")]


@pytest.mark.parametrize(("which", "stamp"), STAMPS)
def test_starlette_middlewares_wrap_every_gateway_response(gateways: dict[str, str], which: str, stamp: str) -> None:
    for path in ("/strict", "/-/healthz", "/jobs/unknown-job"):
        response = httpx.request("POST" if path == "/strict" else "GET", gateways[which] + path, json={}, timeout=30)
        assert response.headers.get("x-stamp") == stamp, (path, response.status_code)


def test_http_options_that_cannot_reach_the_gateway_are_refused() -> None:
    class Local:  # not importable by another process
        def __init__(self, app: object) -> None:
            self.app = app

    with pytest.raises(DeploymentConfigError, match="unknown http_options"):
        middlewares.from_http_options({"host": "0.0.0.0"})
    with pytest.raises(DeploymentConfigError, match="importable"):
        middlewares.from_http_options({"middlewares": [Middleware(Local)]})
    with pytest.raises(DeploymentConfigError, match="JSON data"):
        middlewares.from_http_options({"middlewares": [Middleware(StampMiddleware, value=object())]})
    with pytest.raises(DeploymentConfigError, match="cannot import"):
        middlewares.load("tests.no_such_module:MIDDLEWARES")
