"""GPU placement: which devices a machine has, and which device each replica of a GPU deployment gets.

Discovery never initializes CUDA in the worker process (it asks `nvidia-smi`, or takes the devices it is
told), so replicas are spawned from a parent with no CUDA context, and each replica gets
`CUDA_VISIBLE_DEVICES` set before it starts. `plan_placement` is a pure function: fractional requests
(`num_gpus=0.25`) pack several replicas onto one device, whole numbers take whole devices.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Sequence

from celery_serve.exceptions import ServeStartupError

DEVICES_ENV = "SERVE_GPU_DEVICES"  # e.g. "0,1"; "" means no GPU; unset means ask nvidia-smi
_EPSILON = 1e-9


class PlacementError(ServeStartupError):
    """The replicas asked for more GPU than the machine has."""


def parse_devices(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


def discover_devices(env: dict[str, str] | None = None) -> list[str]:
    """The GPU device ids this machine offers: $SERVE_GPU_DEVICES if set, else what `nvidia-smi` lists."""
    env = dict(os.environ) if env is None else env
    if DEVICES_ENV in env:
        return parse_devices(env[DEVICES_ENV])
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return parse_devices(env["CUDA_VISIBLE_DEVICES"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_devices(",".join(out.stdout.split())) if out.returncode == 0 else []


def plan_placement(
    replicas: int, num_gpus: float, devices: Sequence[str], used: dict[str, float] | None = None
) -> list[list[str]]:
    """Give each replica the devices it runs on: a fraction packs onto one device, N >= 1 takes N devices.

    `used` is the share of each device already taken (by other deployments' replicas on this machine).
    Raises `PlacementError` when the replicas do not fit.
    """
    if num_gpus <= 0:
        return [[] for _ in range(replicas)]
    free = {d: 1.0 - (used or {}).get(d, 0.0) for d in devices}
    plan: list[list[str]] = []
    for index in range(replicas):
        if num_gpus < 1:
            device = next((d for d in devices if free[d] + _EPSILON >= num_gpus), None)
            if device is None:
                raise PlacementError(_no_room(index, replicas, num_gpus, devices))
            free[device] -= num_gpus
            plan.append([device])
        else:
            whole = [d for d in devices if free[d] >= 1.0 - _EPSILON][: math.ceil(num_gpus)]
            if len(whole) < math.ceil(num_gpus):
                raise PlacementError(_no_room(index, replicas, num_gpus, devices))
            for d in whole:
                free[d] = 0.0
            plan.append(whole)
    return plan


def _no_room(index: int, replicas: int, num_gpus: float, devices: Sequence[str]) -> str:
    have = f"GPUs {', '.join(devices)}" if devices else "no GPU"
    return (
        f"replica {index + 1} of {replicas} needs num_gpus={num_gpus} but this machine has {have} left for it; "
        "lower num_replicas or num_gpus, add GPUs (--devices), or set allow_cpu_fallback=True for development"
    )


def replica_env(devices: list[str], cpu_fallback: bool) -> dict[str, str]:
    """Environment for one replica process: its devices, before anything can initialize CUDA."""
    if devices:
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices), "SERVE_REPLICA_DEVICE": "cuda"}
    if cpu_fallback:
        return {"CUDA_VISIBLE_DEVICES": "", "SERVE_REPLICA_DEVICE": "cpu"}
    return {}
