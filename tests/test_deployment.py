"""Unit tests of the programming model: `@deployment`, `.options()`, `.bind()`, graph flattening."""

from __future__ import annotations

import pytest

from celery_serve import Application, Deployment, DeploymentConfigError, deployment, ingress
from celery_serve.application import flatten
from celery_serve.config import DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_REQUEST_TIMEOUT_S


@deployment
class Bare:
    def __call__(self) -> str:
        return "bare"


@deployment
def bare_function(request: object) -> str:
    return "fn"


ALL_OPTIONS = {
    "name": "Configured",
    "num_replicas": 3,
    "route_prefix": "/configured",
    "max_queued_requests": 50,
    "max_ongoing_requests": 8,
    "request_timeout_s": 2.5,
    "num_cpus": 0.5,
    "num_gpus": 0.25,
    "max_batch_size": 16,
    "user_config": {"threshold": 0.7},
    "version": "v2",
}


def test_bare_decorator_on_a_class() -> None:
    assert isinstance(Bare, Deployment)
    assert Bare.name == "Bare"
    assert Bare.func_or_class.__name__ == "Bare"
    config = Bare.config
    assert (config.num_replicas, config.route_prefix, config.max_batch_size) == (1, None, None)
    assert config.max_queued_requests == DEFAULT_MAX_QUEUED_REQUESTS
    assert config.request_timeout_s == DEFAULT_REQUEST_TIMEOUT_S


def test_bare_decorator_on_a_function() -> None:
    assert isinstance(bare_function, Deployment)
    assert bare_function.name == "bare_function"


def test_decorator_with_every_option_on_a_class_and_a_function() -> None:
    @deployment(**ALL_OPTIONS)
    class Model:
        pass

    @deployment(**{**ALL_OPTIONS, "name": "fn_configured"})
    def handler(request: object) -> None:
        pass

    def given(config: object) -> dict:
        dumped = config.model_dump()  # type: ignore[attr-defined]
        return {option: dumped[option] for option in ALL_OPTIONS}

    assert given(Model.config) == ALL_OPTIONS
    assert given(handler.config) == {**ALL_OPTIONS, "name": "fn_configured"}


def test_whole_number_of_gpus_and_unbounded_queue_are_allowed() -> None:
    assert Bare.options(num_gpus=2).config.num_gpus == 2
    assert Bare.options(max_queued_requests=-1).config.max_queued_requests == -1


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"num_replicas": 0}, ["num_replicas", "0"]),
        ({"num_replicas": "many"}, ["num_replicas", "'many'"]),
        ({"route_prefix": "nope"}, ["route_prefix", "'nope'", "starting with '/'"]),
        ({"route_prefix": "/trailing/"}, ["route_prefix", "'/trailing/'"]),
        ({"route_prefix": "/a?b"}, ["route_prefix", "'/a?b'"]),
        ({"max_queued_requests": 0}, ["max_queued_requests", "0"]),
        ({"max_ongoing_requests": 0}, ["max_ongoing_requests", "0"]),
        ({"request_timeout_s": 0}, ["request_timeout_s", "0"]),
        ({"num_cpus": -1}, ["num_cpus", "-1"]),
        ({"num_gpus": 1.5}, ["num_gpus", "1.5"]),
        ({"max_batch_size": 0}, ["max_batch_size", "0"]),
        ({"name": "has space"}, ["name", "'has space'"]),
        ({"user_config": "not a dict"}, ["user_config", "'not a dict'"]),
        ({"replicas": 2}, ["unknown deployment option 'replicas'", "2"]),
    ],
)
def test_invalid_options_fail_at_decoration_naming_option_and_value(options: dict, fragments: list[str]) -> None:
    with pytest.raises(DeploymentConfigError) as info:

        @deployment(**options)
        class Model:
            pass

    for fragment in fragments:
        assert fragment in str(info.value)


def test_invalid_options_fail_in_options_too() -> None:
    with pytest.raises(DeploymentConfigError, match="num_replicas"):
        Bare.options(num_replicas=0)


def test_positional_option_is_refused_with_a_hint() -> None:
    with pytest.raises(DeploymentConfigError, match="options as keywords"):
        deployment(2)  # type: ignore[call-overload]


def test_decorating_something_that_is_not_a_class_or_function_fails() -> None:
    with pytest.raises(DeploymentConfigError, match="class or a function"):
        deployment(num_replicas=2)(len)


def test_options_returns_a_changed_copy_and_leaves_the_original() -> None:
    changed = Bare.options(num_replicas=4, name="Other", user_config={"a": 1})
    assert changed is not Bare
    assert (changed.name, changed.config.num_replicas, changed.config.user_config) == ("Other", 4, {"a": 1})
    assert (Bare.name, Bare.config.num_replicas, Bare.config.user_config) == ("Bare", 1, None)
    assert changed.func_or_class is Bare.func_or_class


def test_decorating_a_deployment_again_applies_the_options() -> None:
    again = deployment(num_replicas=2)(Bare)
    assert again.config.num_replicas == 2 and Bare.config.num_replicas == 1


def test_calling_a_deployment_directly_explains_bind_and_run() -> None:
    with pytest.raises(DeploymentConfigError, match=r"cannot be called directly.*Bare\.bind"):
        Bare()
    with pytest.raises(DeploymentConfigError, match="cannot be called directly"):
        bare_function("request")


def test_bind_keeps_arguments_including_nested_applications() -> None:
    child = Bare.bind()
    parent = Bare.options(name="Parent").bind([child, 1], {"key": child}, flag=True)
    assert isinstance(parent, Application)
    assert parent.args == ([child, 1], {"key": child})
    assert parent.kwargs == {"flag": True}


def test_function_deployments_take_no_bind_arguments() -> None:
    with pytest.raises(DeploymentConfigError, match="takes no bind"):
        bare_function.bind(1)


def test_flatten_orders_children_first_and_suffixes_repeated_names() -> None:
    a, b = Bare.bind(), Bare.bind()
    shared = bare_function.bind()
    root = Bare.options(name="Root").bind([a, shared], {"second": b, "again": shared})
    graph = flatten(root)
    assert list(graph) == ["Bare", "bare_function", "Bare_1", "Root"]
    assert graph["Bare"] is a and graph["Bare_1"] is b and graph["bare_function"] is shared
    assert graph["Root"] is root


def test_flatten_refuses_a_cycle() -> None:
    node = Bare.bind()
    node.args = (node,)
    with pytest.raises(DeploymentConfigError, match="cycle"):
        flatten(node)


def test_ingress_requires_a_fastapi_app_and_a_class() -> None:
    from fastapi import FastAPI

    with pytest.raises(DeploymentConfigError, match="FastAPI"):
        ingress(object())
    with pytest.raises(DeploymentConfigError, match="class"):
        ingress(FastAPI())(bare_function)

    api = FastAPI()

    @deployment
    @ingress(api)
    class Served:
        pass

    assert Served.ingress_app is api
    assert Bare.ingress_app is None
