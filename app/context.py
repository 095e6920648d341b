"""What a replica knows about itself: which deployment it serves, its CPU share and its device.

    from celery_serve import get_replica_context

    @deployment(num_gpus=0.5, allow_cpu_fallback=True)
    class Model:
        def __init__(self):
            ctx = get_replica_context()
            self.model = load().to(ctx.device)      # cuda:0 on its GPU, or cpu
            torch.set_num_threads(ctx.num_threads)

The worker pool sets these for each replica before it starts (GPU pinning through CUDA_VISIBLE_DEVICES,
so the replica's own GPU is always `cuda:0`). Outside a replica, the context describes the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReplicaContext:
    app_name: str
    deployment: str
    replica_id: str
    num_cpus: float
    device_kind: str  # "cuda" or "cpu"

    @property
    def num_threads(self) -> int:
        """Threads this replica should give its model (torch.set_num_threads): its `num_cpus`, at least 1."""
        return max(1, int(self.num_cpus))

    @property
    def device(self) -> Any:
        """The replica's device: `cuda:0` (its pinned GPU) or `cpu`, as a `torch.device` when torch is
        installed and as that string otherwise (celery-serve itself does not need torch)."""
        name = "cuda:0" if self.device_kind == "cuda" else "cpu"
        try:
            import torch
        except ImportError:
            return name
        return torch.device(name)


def get_replica_context() -> ReplicaContext:
    env = os.environ
    return ReplicaContext(
        app_name=env.get("SERVE_APP", ""),
        deployment=env.get("SERVE_DEPLOYMENT", ""),
        replica_id=env.get("SERVE_REPLICA_ID", ""),
        num_cpus=float(env.get("SERVE_NUM_CPUS") or os.cpu_count() or 1),
        device_kind=env.get("SERVE_REPLICA_DEVICE", "cpu"),
    )
