"""Calling deployments from Python through handles, after `run()` (real Redis, real Celery workers)."""

from __future__ import annotations

import asyncio

import pytest

from celery_serve import (
    DeploymentHandle,
    DeploymentNotFoundError,
    DeploymentResponse,
    RemoteError,
    RequestTimeoutError,
)
from tests.conftest import Served


@pytest.fixture
def calc(served: Served) -> DeploymentHandle:
    return DeploymentHandle("Calc", "probe")


def test_run_returns_a_handle_to_the_ingress(served: Served) -> None:
    handle = served.handles["probe"]
    assert isinstance(handle, DeploymentHandle)
    assert (handle.app_name, handle.deployment_name, handle.method_name) == ("probe", "Probe", "__call__")


def test_remote_result(calc: DeploymentHandle) -> None:
    response = calc.remote(21)
    assert isinstance(response, DeploymentResponse)
    assert response.result(timeout_s=60) == 42
    assert response.done()


def test_await_remote_in_async_code(calc: DeploymentHandle) -> None:
    async def main() -> list[int]:
        first = await calc.add.remote(2, 3)
        both = await asyncio.gather(calc.add.remote(first, 1), calc.add_async.remote(first, 2))
        return [first, *both]

    assert asyncio.run(main()) == [5, 6, 7]


def test_method_by_attribute_and_by_options(calc: DeploymentHandle) -> None:
    assert calc.add.remote(1, b=2).result(timeout_s=60) == 3
    by_options = calc.options(method_name="add")
    assert by_options.method_name == "add" and calc.method_name == "__call__"
    assert by_options.remote(a=10, b=5).result(timeout_s=60) == 15


def test_replica_keeps_state_between_calls(calc: DeploymentHandle) -> None:
    first = calc.count.remote().result(timeout_s=60)
    assert calc.count.remote().result(timeout_s=60) == first + 1


def test_user_config_reaches_reconfigure_before_the_first_request(calc: DeploymentHandle) -> None:
    assert calc.get_user_config.remote().result(timeout_s=60) == {"greeting": "hello"}


def test_a_response_passed_as_an_argument_is_resolved_first(calc: DeploymentHandle) -> None:
    assert calc.add.remote(calc.add.remote(1, 2), 10).result(timeout_s=60) == 13


def test_handles_nested_in_lists_and_dicts_arrive_as_handles(served: Served) -> None:
    got = served.handles["probe"].handles.remote().result(timeout_s=60)
    assert got == {
        "list": ["DeploymentHandle", "DeploymentHandle"],
        "dict": {"calc": "DeploymentHandle", "mixed": "DeploymentHandle"},
        "via_list": 3,
        "via_dict": 7,
    }


def test_composition_returns_hello_world(served: Served) -> None:
    assert served.handles["compose"].remote().result(timeout_s=60) == "Hello world!"


def test_remote_exception_raises_remote_error(calc: DeploymentHandle) -> None:
    with pytest.raises(RemoteError) as info:
        calc.boom.remote("it broke").result(timeout_s=60)
    error = info.value
    assert (error.remote_type, error.remote_message, error.deployment) == ("ValueError", "it broke", "Calc")
    assert "ValueError" in str(error) and "it broke" in str(error)


def test_remote_exception_when_awaited(calc: DeploymentHandle) -> None:
    async def main() -> None:
        await calc.boom.remote("async too")

    with pytest.raises(RemoteError, match="async too"):
        asyncio.run(main())


def test_unknown_method_raises_not_found(calc: DeploymentHandle) -> None:
    with pytest.raises(DeploymentNotFoundError, match="no method 'nope'"):
        calc.nope.remote().result(timeout_s=60)


def test_unknown_deployment_raises_not_found(served: Served) -> None:
    with pytest.raises(DeploymentNotFoundError, match="no deployment named 'Missing'"):
        DeploymentHandle("Missing", "probe").remote().result(timeout_s=60)
    with pytest.raises(DeploymentNotFoundError, match="no application named 'nowhere'"):
        DeploymentHandle("Calc", "nowhere").remote().result(timeout_s=60)


def test_arguments_must_be_json(calc: DeploymentHandle) -> None:
    with pytest.raises(ValueError, match="JSON"):
        calc.add.remote(object(), 1).result(timeout_s=60)


def test_result_timeout_raises_request_timeout(calc: DeploymentHandle) -> None:
    response = calc.sleep.remote(1.0)
    with pytest.raises(RequestTimeoutError):
        response.result(timeout_s=0.05)
    assert response.result(timeout_s=60) == 1.0  # the request itself went on
