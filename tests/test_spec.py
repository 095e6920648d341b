"""The application spec: built from a graph, written as JSON, read back, resolved in a worker."""

from __future__ import annotations

import json

import pytest

from celery_serve import DeploymentConfigError, DeploymentHandle, deployment
from celery_serve._runtime.spec import AppSpec, build_spec, resolve_deployment
from tests import deployments


@deployment(num_replicas=2, request_timeout_s=5)
class Leaf:
    def __init__(self, factor: int = 1) -> None:
        self.factor = factor


@deployment(route_prefix="/own")
class Root:
    def __init__(self, leaves: list, named: dict, label: str = "") -> None:
        self.leaves, self.named, self.label = leaves, named, label


def _make_handle(app: str, name: str) -> DeploymentHandle:
    return DeploymentHandle(name, app)


def test_spec_of_a_module_level_application_points_at_it() -> None:
    spec = build_spec(deployments.probe_app, "probe", "/probe")
    assert spec.source == {"module": "tests.deployments", "attr": "probe_app"}
    assert (spec.name, spec.route_prefix, spec.ingress) == ("probe", "/probe", "Probe")
    assert list(spec.deployments) == ["Calc", "Fragile", "Mixed", "Probe"]
    assert spec.deployments["Calc"].queue == "serve.probe.Calc"
    assert all(d.init is None for d in spec.deployments.values())


def test_route_prefix_defaults_to_root_then_deployment_option_then_run_argument() -> None:
    assert build_spec(Leaf.bind(), "a", None).route_prefix == "/"
    assert build_spec(Root.bind([], {}), "a", None).route_prefix == "/own"
    assert build_spec(Root.bind([], {}), "a", "/given").route_prefix == "/given"


def test_spec_json_round_trip() -> None:
    leaf = Leaf.bind(3)
    spec = build_spec(Root.bind([leaf, Leaf.bind()], {"main": leaf}, label="x"), "graph", "/g")
    back = AppSpec.from_json(spec.to_json())
    assert back == spec
    assert back.deployments["Leaf"].options.num_replicas == 2
    assert back.deployments["Leaf_1"].config["name"] == "Leaf_1"
    assert not back.deployments["Root"].is_function


def test_bind_arguments_travel_as_json_when_the_application_is_not_a_module_variable() -> None:
    leaf = Leaf.bind(3)
    spec = AppSpec.from_json(build_spec(Root.bind([leaf, 7], {"main": leaf}, label="x"), "graph", None).to_json())
    assert spec.source is None
    target, args, kwargs = resolve_deployment(spec, "Root", _make_handle)
    assert target is Root.func_or_class
    leaves, named = args
    assert isinstance(leaves[0], DeploymentHandle) and leaves[0].deployment_name == "Leaf"
    assert leaves[0].app_name == "graph" and leaves[1] == 7
    assert isinstance(named["main"], DeploymentHandle) and named["main"].deployment_name == "Leaf"
    assert kwargs == {"label": "x"}
    assert resolve_deployment(spec, "Leaf", _make_handle)[1:] == ((3,), {})


def test_module_level_application_resolves_with_handles_in_place_of_children() -> None:
    spec = AppSpec.from_json(build_spec(deployments.probe_app, "probe", "/probe").to_json())
    target, args, kwargs = resolve_deployment(spec, "Probe", _make_handle)
    assert target is deployments.Probe.func_or_class
    calcs, by_name = args
    assert [h.deployment_name for h in calcs] == ["Calc", "Fragile"]
    assert by_name["calc"].deployment_name == "Calc" and by_name["mixed"].deployment_name == "Mixed"
    assert kwargs == {}


def test_bind_arguments_that_are_not_json_need_a_module_level_application() -> None:
    with pytest.raises(DeploymentConfigError, match="module-level"):
        build_spec(Leaf.bind(object()), "a", None)


def test_build_spec_errors_name_what_to_fix() -> None:
    with pytest.raises(DeploymentConfigError, match=r"\.bind\(\)"):
        build_spec(Leaf, "a", None)  # type: ignore[arg-type]
    with pytest.raises(DeploymentConfigError, match="application name"):
        build_spec(Leaf.bind(), "bad name", None)
    with pytest.raises(DeploymentConfigError, match="route_prefix"):
        build_spec(Leaf.bind(), "a", "no-slash")


def test_spec_is_plain_json() -> None:
    data = json.loads(build_spec(Leaf.bind(), "a", None).to_json())
    assert set(data) >= {"name", "route_prefix", "ingress", "source", "deployed_at", "deployments"}
    assert data["deployments"]["Leaf"]["target"] == {"module": "tests.test_spec", "qualname": "Leaf"}
