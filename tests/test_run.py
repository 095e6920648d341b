"""`run()`'s error paths: a deployment that cannot start, a wrong argument, a call from inside a worker."""

from __future__ import annotations

import pytest

from celery_serve import DeploymentConfigError, ServeError, ServeStartupError, run
from celery_serve._runtime import serve as _serve
from tests import deployments
from tests.conftest import STARTUP_TIMEOUT_S, Served


def test_a_constructor_that_raises_fails_run_naming_the_deployment_and_error(served: Served) -> None:
    try:
        with pytest.raises(ServeStartupError) as info:
            run(
                deployments.broken_app,
                name="broken",
                route_prefix="/broken",
                startup_timeout_s=STARTUP_TIMEOUT_S,
            )
        assert "BrokenModel" in str(info.value)
        assert "RuntimeError: model file missing" in str(info.value)
    finally:
        session = _serve._session
        assert session is not None
        session.group.stop(session.workers.pop("broken", set()))  # its pool would keep restarting it
        _serve.delete_app(served.redis_url, "broken")


def test_run_wants_a_bound_application() -> None:
    with pytest.raises(DeploymentConfigError, match=r"\.bind\(\)"):
        run(deployments.Calc, name="unbound")  # type: ignore[arg-type]


def test_run_inside_a_worker_explains_the_main_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_SERVE_REPLICA", "1")
    with pytest.raises(ServeError, match="__name__ == '__main__'"):
        run(deployments.calc)
