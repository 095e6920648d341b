"""The autoscaling policy and placement as pure functions, and the autoscaling options' validation."""

from __future__ import annotations

import pytest

from celery_serve import deployment
from celery_serve.config import AUTO_MAX_REPLICAS, AutoscalingConfig, make_config, start_replicas
from celery_serve.exceptions import DeploymentConfigError
from celery_serve.workers.autoscaling import (
    AutoscalingContext,
    Machine,
    PoolInfo,
    decide,
    desired_replicas,
    plan_resize,
    room,
)

CONFIG = AutoscalingConfig(
    min_replicas=1, max_replicas=4, target_ongoing_requests=2, upscale_delay_s=5, downscale_delay_s=30
)


def ctx(queued: int = 0, in_flight: int = 0, current: int = 1, now: float = 100.0, **kw: object) -> AutoscalingContext:
    return AutoscalingContext(queued=queued, in_flight=in_flight, current_replicas=current, now_s=now, **kw)  # type: ignore[arg-type]


# --- the desired count -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("load", "target", "expected"),
    [
        (0, 2, 0),
        (1, 2, 1),
        (2, 2, 1),
        (3, 2, 2),
        (4, 2, 2),
        (5, 2, 3),
        (1, 0.5, 2),
        (7, 0.7, 10),  # 7 / 0.7 is 10.000000000000002 in floating point: still 10
        (3, 0.1, 30),
        (10, 3, 4),
    ],
)
def test_desired_is_load_over_target_rounded_up(load: int, target: float, expected: int) -> None:
    config = AutoscalingConfig(min_replicas=0, max_replicas=100, target_ongoing_requests=target)
    assert desired_replicas(load, config) == expected


def test_desired_stays_within_bounds() -> None:
    assert desired_replicas(0, CONFIG) == 1
    assert desired_replicas(1000, CONFIG) == 4


def test_load_counts_waiting_and_running() -> None:
    decision = decide(ctx(queued=3, in_flight=4, current=4), CONFIG)
    assert decision.desired == 4
    assert "queued=3 in_flight=4" in decision.reason


# --- delays ------------------------------------------------------------------------------------------


def test_upscale_waits_for_the_delay_then_jumps_to_the_desired_count() -> None:
    first = decide(ctx(queued=20, now=100.0), CONFIG)
    assert (first.replicas, first.desired, first.upscale_since_s) == (1, 4, 100.0)
    assert "waiting for upscale_delay_s=5" in first.reason
    early = decide(ctx(queued=20, now=104.9, upscale_since_s=first.upscale_since_s), CONFIG)
    assert (early.replicas, early.upscale_since_s) == (1, 100.0)
    due = decide(ctx(queued=20, now=105.0, upscale_since_s=early.upscale_since_s), CONFIG)
    assert (due.replicas, due.upscale_since_s, due.downscale_since_s) == (4, None, None)
    assert due.changes(1) and not due.changes(4)


def test_a_dip_in_load_resets_the_upscale_timer() -> None:
    waiting = decide(ctx(queued=20, now=100.0), CONFIG)
    steady = decide(ctx(queued=1, now=103.0, upscale_since_s=waiting.upscale_since_s), CONFIG)
    assert (steady.replicas, steady.upscale_since_s, steady.downscale_since_s) == (1, None, None)
    again = decide(ctx(queued=20, now=106.0, upscale_since_s=steady.upscale_since_s), CONFIG)
    assert (again.replicas, again.upscale_since_s) == (1, 106.0)


def test_downscale_waits_for_its_own_delay() -> None:
    first = decide(ctx(current=4, now=200.0), CONFIG)
    assert (first.replicas, first.desired, first.downscale_since_s, first.upscale_since_s) == (4, 1, 200.0, None)
    early = decide(ctx(current=4, now=229.0, downscale_since_s=200.0), CONFIG)
    assert early.replicas == 4
    due = decide(ctx(current=4, now=230.0, downscale_since_s=200.0), CONFIG)
    assert (due.replicas, due.downscale_since_s) == (1, None)
    assert "downscale_delay_s=30" in due.reason


def test_zero_delays_act_at_once() -> None:
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0)
    assert decide(ctx(queued=8), config).replicas == 4
    assert decide(ctx(current=4), config).replicas == 1


def test_steady_load_changes_nothing() -> None:
    decision = decide(ctx(queued=2, in_flight=2, current=2, upscale_since_s=50.0, downscale_since_s=60.0), CONFIG)
    assert (decision.replicas, decision.upscale_since_s, decision.downscale_since_s) == (2, None, None)
    assert "steady" in decision.reason


# --- bounds and zero ---------------------------------------------------------------------------------


def test_below_min_is_restored_at_once() -> None:
    decision = decide(ctx(current=0), AutoscalingConfig(min_replicas=2, max_replicas=4, upscale_delay_s=60))
    assert decision.replicas == 2
    assert "below min_replicas=2" in decision.reason


def test_above_max_is_restored_at_once() -> None:
    decision = decide(ctx(queued=100, current=7), CONFIG)
    assert decision.replicas == 4
    assert "above max_replicas=4" in decision.reason


def test_scales_from_zero_at_once_and_back_to_zero_after_the_delay() -> None:
    config = AutoscalingConfig(min_replicas=0, max_replicas=3, upscale_delay_s=60, downscale_delay_s=10)
    idle = decide(ctx(current=0), config)
    assert (idle.replicas, idle.desired) == (0, 0)
    woken = decide(ctx(queued=1, current=0), config)
    assert woken.replicas == 1
    assert "scaling from zero" in woken.reason
    assert decide(ctx(queued=5, current=0), config).replicas == 3
    waiting = decide(ctx(current=1, now=100.0), config)
    assert (waiting.replicas, waiting.desired) == (1, 0)
    assert decide(ctx(current=1, now=110.0, downscale_since_s=100.0), config).replicas == 0


def test_capacity_caps_growth_but_never_forces_a_shrink() -> None:
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, upscale_delay_s=0)
    capped = decide(ctx(queued=100, current=1, capacity_replicas=3), config)
    assert (capped.replicas, capped.desired) == (3, 3)
    assert "fit only 3" in capped.reason
    full = decide(ctx(queued=100, current=3, capacity_replicas=3), config)
    assert full.replicas == 3 and not full.changes(3)
    over = decide(ctx(queued=100, current=5, capacity_replicas=3), config)
    assert over.replicas == 5


# --- placement ---------------------------------------------------------------------------------------


def test_room_counts_what_each_machine_still_fits() -> None:
    pools = [PoolInfo("w1", "m1", 1), PoolInfo("w2", "m2", 0)]
    machines = {"m1": Machine(cpus=2, used_cpus=1.5), "m2": Machine(cpus=4, used_cpus=1)}
    assert room(pools, machines, num_cpus=0.5, num_gpus=0) == 1 + 6
    assert room(pools, machines, num_cpus=0, num_gpus=0) is None
    gpu = {"m1": Machine(cpus=8, gpus=1, used_gpus=0.5), "m2": Machine(cpus=8, gpus=0)}
    assert room(pools, gpu, num_cpus=1, num_gpus=0.25) == 2


def test_growth_spreads_over_machines_and_stops_at_capacity() -> None:
    pools = [PoolInfo("a", "m1", 1), PoolInfo("b", "m2", 1)]
    even = {"m1": Machine(cpus=4, used_cpus=1), "m2": Machine(cpus=4, used_cpus=1)}
    assert plan_resize(pools, even, target=4, num_cpus=1, num_gpus=0) == {"a": 2, "b": 2}
    uneven = {"m1": Machine(cpus=2, used_cpus=1), "m2": Machine(cpus=4, used_cpus=1)}
    assert plan_resize(pools, uneven, target=4, num_cpus=1, num_gpus=0) == {"b": 3}  # the roomier machine first
    assert plan_resize(pools, uneven, target=10, num_cpus=1, num_gpus=0) == {"a": 2, "b": 4}
    gpus = {"m1": Machine(cpus=8, gpus=1, used_gpus=1), "m2": Machine(cpus=8, gpus=2, used_gpus=1)}
    assert plan_resize(pools, gpus, target=5, num_cpus=1, num_gpus=0.5) == {"b": 3}


def test_shrinking_takes_from_the_largest_pool_first() -> None:
    pools = [PoolInfo("a", "m1", 3), PoolInfo("b", "m2", 1)]
    machines = {"m1": Machine(cpus=8, used_cpus=3), "m2": Machine(cpus=8, used_cpus=1)}
    assert plan_resize(pools, machines, target=2, num_cpus=1, num_gpus=0) == {"a": 1}
    assert plan_resize(pools, machines, target=0, num_cpus=1, num_gpus=0) == {"a": 0, "b": 0}
    assert plan_resize(pools, machines, target=4, num_cpus=1, num_gpus=0) == {}


# --- options -----------------------------------------------------------------------------------------


def test_num_replicas_auto_gives_defaults() -> None:
    config = make_config(name="m", num_replicas="auto")
    assert config.num_replicas == "auto"
    assert config.autoscaling_config == AutoscalingConfig()
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, AUTO_MAX_REPLICAS)
    assert config.autoscaling_config.target_ongoing_requests == 2
    assert start_replicas(config.model_dump()) == 1


def test_an_autoscaling_config_means_auto_and_survives_options() -> None:
    @deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 3, "initial_replicas": 2})
    class Scaled:
        pass

    assert Scaled.config.num_replicas == "auto"
    assert start_replicas(Scaled.config.model_dump()) == 2
    changed = Scaled.options(num_cpus=0.5)
    assert changed.config.autoscaling_config == Scaled.config.autoscaling_config
    fixed = Scaled.options(num_replicas=3, autoscaling_config=None)
    assert (fixed.config.num_replicas, fixed.config.autoscaling_config) == (3, None)
    assert start_replicas(make_config(name="z", autoscaling_config={"min_replicas": 0}).model_dump()) == 0


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (
            {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}},
            ["max_replicas", "min_replicas", "max_replicas=2"],
        ),
        ({"autoscaling_config": {"min_replicas": -1}}, ["autoscaling_config.min_replicas", "-1"]),
        ({"autoscaling_config": {"max_replicas": 0}}, ["autoscaling_config.max_replicas", "0"]),
        ({"autoscaling_config": {"initial_replicas": 9, "max_replicas": 4}}, ["initial_replicas", "9"]),
        ({"autoscaling_config": {"target_ongoing_requests": 0}}, ["target_ongoing_requests", "0"]),
        ({"autoscaling_config": {"upscale_delay_s": -1}}, ["upscale_delay_s", "-1"]),
        ({"autoscaling_config": {"metrics_interval_s": 0}}, ["metrics_interval_s", "0"]),
        ({"autoscaling_config": {"target_ongoing_requests": float("nan")}}, ["target_ongoing_requests", "nan"]),
        ({"autoscaling_config": {"max_replica": 3}}, ["unknown deployment option", "max_replica"]),
        ({"num_replicas": 3, "autoscaling_config": {}}, ["num_replicas", "autoscaling_config", "num_replicas=3"]),
        ({"num_replicas": 0}, ["num_replicas", "min_replicas", "got 0"]),
        ({"num_replicas": "lots"}, ["num_replicas", "'auto'", "'lots'"]),
    ],
)
def test_invalid_autoscaling_options_name_the_option_and_value(options: dict[str, object], words: list[str]) -> None:
    with pytest.raises(DeploymentConfigError) as caught:
        make_config(name="m", **options)
    for word in words:
        assert word in str(caught.value)
