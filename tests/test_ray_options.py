"""Every option of Ray Serve's `@serve.deployment` is accepted: honoured where it means something here,
otherwise with one warning saying why; a misspelled or mistyped option is still an error at decoration."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

import celery_serve as serve
from celery_serve import DeploymentConfigError
from celery_serve.workers.gpus import PlacementError
from celery_serve.workers.worker import check_memory

# The keyword arguments of Ray Serve's `@serve.deployment` (ray/serve/api.py), with values Ray's docs use.
RAY_OPTIONS: dict[str, Any] = {
    "name": "Translator",
    "version": "1",
    "num_replicas": 2,
    "route_prefix": "/translate",
    "ray_actor_options": {"num_cpus": 0.2, "num_gpus": 0},
    "placement_group_bundles": [{"CPU": 1}],
    "placement_group_strategy": "PACK",
    "max_replicas_per_node": 2,
    "user_config": {"threshold": 0.5},
    "max_ongoing_requests": 100,
    "max_queued_requests": 50,
    "autoscaling_config": None,
    "graceful_shutdown_wait_loop_s": 2,
    "graceful_shutdown_timeout_s": 20,
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
    "logging_config": {"log_level": "INFO", "encoding": "JSON"},
    "request_router_config": {"request_router_class": "x:Y"},
    "max_constructor_retry_count": 5,
}


class Example:
    def __call__(self) -> str:
        return "ok"


def test_every_ray_option_is_accepted_and_the_meaningful_ones_are_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dep = serve.deployment(**RAY_OPTIONS)(Example)
    config = dep.config
    assert config.num_cpus == 0.2 and config.num_gpus == 0  # ray_actor_options are our resources
    assert (config.health_check_period_s, config.health_check_timeout_s) == (10, 30)
    assert (config.graceful_shutdown_wait_loop_s, config.graceful_shutdown_timeout_s) == (2, 20)
    assert config.max_constructor_retry_count == 5 and config.max_replicas_per_node == 2
    assert config.logging_config is not None and config.logging_config.encoding == "JSON"
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages  # one warning, naming each option without effect and why
    for option in ("placement_group_bundles", "placement_group_strategy", "request_router_config"):
        assert option in messages[0]
    assert "placement groups" in messages[0] and "shared queue" in messages[0]


def test_ray_defaults() -> None:
    config = serve.deployment(Example).config
    assert config.health_check_period_s == 10.0 and config.health_check_timeout_s == 30.0
    assert config.graceful_shutdown_wait_loop_s == 2.0 and config.graceful_shutdown_timeout_s == 20.0
    assert config.max_constructor_retry_count == 20
    assert config.max_replicas_per_node is None and config.num_cpus == 1.0


def test_the_seed_tutorials_actor_options_and_options() -> None:
    dep = serve.deployment(ray_actor_options={"num_cpus": 2, "num_gpus": 1})(Example)
    assert (dep.config.num_cpus, dep.config.num_gpus) == (2, 1)
    smaller = dep.options(ray_actor_options={"num_cpus": 0.2, "num_gpus": 0.0})
    assert (smaller.config.num_cpus, smaller.config.num_gpus) == (0.2, 0.0)
    direct = dep.options(num_cpus=3)
    assert direct.config.num_cpus == 3 and direct.config.ray_actor_options.num_cpus == 3
    old_name = serve.deployment(max_concurrent_queries=7)(Example)
    assert old_name.config.max_ongoing_requests == 7
    assert old_name.options(max_concurrent_queries=9).config.max_ongoing_requests == 9


def test_actor_options_without_effect_warn_once_saying_why() -> None:
    with pytest.warns(UserWarning, match=r"ray_actor_options\['runtime_env'\] \(workers run in the environment"):
        serve.deployment(ray_actor_options={"num_cpus": 1, "runtime_env": {"pip": ["x"]}})(Example)
    with pytest.warns(UserWarning, match=r"logging_config\['logs_dir'\]"):
        serve.deployment(logging_config={"logs_dir": "/tmp/logs"})(Example)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"health_check_period": 10}, "unknown deployment option 'health_check_period'"),
        ({"health_check_period_s": "often"}, "health_check_period_s input should be a valid number"),
        ({"health_check_timeout_s": 0}, "health_check_timeout_s input should be greater than 0"),
        ({"ray_actor_options": {"num_cpu": 1}}, "unknown deployment option 'ray_actor_options.num_cpu'"),
        ({"logging_config": {"log_level": "LOUD"}}, "logging_config.log_level"),
        ({"max_constructor_retry_count": 0}, "max_constructor_retry_count input should be greater than or equal"),
        ({"num_cpus": 1, "ray_actor_options": {"num_cpus": 2}}, "num_cpus is given twice"),
        ({"placement_group_strategy": "SOMEWHERE"}, "placement_group_strategy"),
    ],
)
def test_a_misspelled_or_mistyped_option_is_an_error_at_decoration(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(DeploymentConfigError, match=expected):
        serve.deployment(**options)(Example)


def test_memory_is_reserved_per_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_MACHINE_MEMORY", str(8 * 2**30))
    check_memory("Model", 2, 4 * 2**30)  # fits exactly
    with pytest.raises(PlacementError, match=r"asks for 3 replicas of memory=4.00 GiB each but this machine has 8.00"):
        check_memory("Model", 3, 4 * 2**30)


def test_max_replicas_per_node_caps_a_workers_pool(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from celery_serve.workers.pool import ReplicaPool

    pool: Any = SimpleNamespace(
        app=SimpleNamespace(conf={"serve_max_replicas_per_node": 2, "serve_deployment": "Model"}), _slots=[1]
    )
    pool.app.conf = SimpleNamespace(get=pool.app.conf.get, serve_deployment="Model")
    assert ReplicaPool._within_node_limit(pool, 1) == 1
    assert ReplicaPool._within_node_limit(pool, 3) == 1
    assert "would exceed max_replicas_per_node=2" in caplog.text


def test_run_refuses_more_replicas_than_one_machine_may_hold() -> None:
    from celery_serve._runtime.serve import check_per_node_limits
    from celery_serve._runtime.spec import build_spec

    app = serve.deployment(num_replicas=3, max_replicas_per_node=2)(Example).bind()
    with pytest.raises(DeploymentConfigError, match=r"starts 3 replicas but max_replicas_per_node=2"):
        check_per_node_limits(build_spec(app, "limits", None))


def test_logging_config_sets_the_replicas_level_and_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from celery_serve._runtime.spec import build_spec
    from celery_serve.workers.replica_main import _apply_logging_config

    monkeypatch.setenv("SERVE_LOG_FORMAT", "text")  # configure() sets it for children; restored afterwards
    app = serve.deployment(logging_config={"log_level": "DEBUG", "encoding": "JSON"})(Example).bind()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        _apply_logging_config(build_spec(app, "logs", None), "Example")
        assert root.level == logging.DEBUG
        assert type(root.handlers[0].formatter).__name__ == "JsonFormatter"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
