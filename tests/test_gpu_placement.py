"""GPU placement as pure units: discovery is injectable, fractional replicas pack, whole ones take devices."""

from __future__ import annotations

import pytest

from celery_serve import deployment
from celery_serve._runtime.serve import plan_gpus
from celery_serve._runtime.spec import build_spec
from celery_serve.workers.gpus import PlacementError, discover_devices, parse_devices, plan_placement, replica_env


def test_discovery_takes_the_devices_it_is_told() -> None:
    assert discover_devices({"SERVE_GPU_DEVICES": "0, 1,3"}) == ["0", "1", "3"]
    assert discover_devices({"SERVE_GPU_DEVICES": ""}) == []
    assert discover_devices({"CUDA_VISIBLE_DEVICES": "2"}) == ["2"]


def test_discovery_without_nvidia_smi_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert discover_devices({}) == []


def test_parse_devices_ignores_blanks() -> None:
    assert parse_devices(" 0 ,, 1 ") == ["0", "1"]


def test_fractions_pack_onto_one_device_then_the_next() -> None:
    assert plan_placement(6, 0.25, ["0", "1"]) == [["0"], ["0"], ["0"], ["0"], ["1"], ["1"]]


def test_half_gpus_two_per_device() -> None:
    assert plan_placement(3, 0.5, ["0", "1"]) == [["0"], ["0"], ["1"]]


def test_whole_gpus_take_whole_devices() -> None:
    assert plan_placement(2, 1, ["0", "1", "2"]) == [["0"], ["1"]]
    assert plan_placement(1, 2, ["0", "1", "2"]) == [["0", "1"]]


def test_used_shares_are_respected() -> None:
    assert plan_placement(2, 0.5, ["0", "1"], used={"0": 0.75}) == [["1"], ["1"]]


def test_too_many_replicas_fail_with_a_clear_message() -> None:
    with pytest.raises(PlacementError, match=r"replica 3 of 3 needs num_gpus=0.6 but this machine has GPUs 0, 1"):
        plan_placement(3, 0.6, ["0", "1"])
    with pytest.raises(PlacementError, match="has no GPU"):
        plan_placement(1, 1, [])


def test_cpu_deployments_get_no_devices() -> None:
    assert plan_placement(3, 0, ["0"]) == [[], [], []]


def test_replica_env_pins_before_cuda_starts() -> None:
    assert replica_env(["1"], cpu_fallback=False) == {"CUDA_VISIBLE_DEVICES": "1", "SERVE_REPLICA_DEVICE": "cuda"}
    assert replica_env([], cpu_fallback=True) == {"CUDA_VISIBLE_DEVICES": "", "SERVE_REPLICA_DEVICE": "cpu"}
    assert replica_env([], cpu_fallback=False) == {}


@deployment(num_gpus=0.5, num_replicas=2)
class HalfGpu:
    pass


@deployment(num_gpus=0.25, num_replicas=2)
class QuarterGpu:
    def __init__(self, other: object) -> None:
        pass


@deployment(num_gpus=1, allow_cpu_fallback=True)
class Fallback:
    pass


def test_run_places_all_gpu_deployments_of_an_app_together() -> None:
    spec = build_spec(QuarterGpu.bind(HalfGpu.bind()), "gpu", "/gpu")
    plans = plan_gpus(spec, devices=["0", "1"])
    assert plans == {"HalfGpu": [["0"], ["0"]], "QuarterGpu": [["1"], ["1"]]}


def test_run_refuses_a_gpu_deployment_without_gpus() -> None:
    with pytest.raises(PlacementError, match="allow_cpu_fallback=True"):
        plan_gpus(build_spec(HalfGpu.bind(), "gpu", "/gpu"), devices=[])


def test_cpu_fallback_is_left_to_the_worker() -> None:
    assert plan_gpus(build_spec(Fallback.bind(), "gpu", "/gpu"), devices=[]) == {}


def test_gpu_deployments_have_their_own_queue_kind() -> None:
    spec = build_spec(QuarterGpu.bind(HalfGpu.bind()), "gpu", "/gpu")
    assert spec.deployments["HalfGpu"].queue == "serve.gpu.{serve.gpu.HalfGpu}"
