"""The scaler's decisions, as plain functions of what it measured: no Redis, no Celery, no clock.

`decide` is the autoscaling policy (like Ray Serve's `autoscaling_policy`): from a deployment's load (what
waits in its queue plus what replicas have taken and not finished), its current replica count and the
delay timers it carries over, it says how many replicas to run now and why. `plan_resize` then spreads a
replica count over the deployment's workers without putting more on a machine than its cores and GPUs
hold. `celery_serve.workers.scaler` is the thin glue that feeds them from Redis and applies what they return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from celery_serve.config import AutoscalingConfig

_EPS = 1e-9  # load / target is a float: 7 / 0.7 must round up to 10, not 11


@dataclass(frozen=True)
class AutoscalingContext:
    """What the policy sees of one deployment at one moment."""

    queued: int  # waiting in the deployment's queue
    in_flight: int  # taken by a replica and not finished
    current_replicas: int  # what the worker pools run now
    now_s: float  # a clock shared with the timers below (the scaler uses wall time)
    capacity_replicas: int | None = None  # the most replicas the machines fit; None: no limit known
    upscale_since_s: float | None = None  # since when the load has asked for more replicas
    downscale_since_s: float | None = None  # since when the load has asked for fewer

    @property
    def load(self) -> int:
        return self.queued + self.in_flight


@dataclass(frozen=True)
class Decision:
    """How many replicas to run now, what the load asks for, why, and the timers to carry over."""

    replicas: int
    desired: int
    reason: str
    upscale_since_s: float | None = None
    downscale_since_s: float | None = None

    def changes(self, current: int) -> bool:
        return self.replicas != current


def desired_replicas(load: int, config: AutoscalingConfig) -> int:
    """`ceil(load / target_ongoing_requests)`, within [min_replicas, max_replicas]."""
    raw = math.ceil(load / config.target_ongoing_requests - _EPS) if load > 0 else 0
    return max(config.min_replicas, min(config.max_replicas, raw))


def decide(ctx: AutoscalingContext, config: AutoscalingConfig) -> Decision:
    """The replicas to run now: the desired count once the load has asked for it long enough.

    Bounds are restored at once (fewer than min_replicas, more than max_replicas), and so is a deployment
    at zero replicas that has work; capacity caps growth but never forces a shrink.
    """
    current, load = ctx.current_replicas, ctx.load
    want = desired_replicas(load, config)
    inputs = f"queued={ctx.queued} in_flight={ctx.in_flight} target={config.target_ongoing_requests:g}/replica"
    why = f"load {load} ({inputs}) asks for {want}"
    if ctx.capacity_replicas is not None and want > current and want > ctx.capacity_replicas:
        capped = max(current, ctx.capacity_replicas)
        why = f"{why}, but the machines fit only {ctx.capacity_replicas}"
        want = capped
    now = Decision(want, want, why)  # what happens when a change is made at once
    if current < config.min_replicas and want > current:
        return replace(now, reason=f"below min_replicas={config.min_replicas}: {why}")
    if current > config.max_replicas:
        return Decision(config.max_replicas, want, f"above max_replicas={config.max_replicas}: {why}")
    if current == 0 and want > 0:
        return replace(now, reason=f"scaling from zero: {why}")
    if want > current:
        since = ctx.now_s if ctx.upscale_since_s is None else ctx.upscale_since_s
        if ctx.now_s - since >= config.upscale_delay_s:
            return replace(
                now, reason=f"{why} for {ctx.now_s - since:.1f}s (upscale_delay_s={config.upscale_delay_s:g})"
            )
        return Decision(
            current, want, f"{why}; waiting for upscale_delay_s={config.upscale_delay_s:g}", upscale_since_s=since
        )
    if want < current:
        since = ctx.now_s if ctx.downscale_since_s is None else ctx.downscale_since_s
        if ctx.now_s - since >= config.downscale_delay_s:
            return replace(
                now, reason=f"{why} for {ctx.now_s - since:.1f}s (downscale_delay_s={config.downscale_delay_s:g})"
            )
        return Decision(
            current, want, f"{why}; waiting for downscale_delay_s={config.downscale_delay_s:g}", downscale_since_s=since
        )
    return Decision(current, want, f"{why}: steady")


# --- placement ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """A machine's capacity and what every replica on it (of any deployment) already uses."""

    cpus: float
    gpus: float = 0.0
    used_cpus: float = 0.0
    used_gpus: float = 0.0

    def fits(self, num_cpus: float, num_gpus: float) -> int | None:
        """How many more replicas of this size fit; None when the size asks for nothing."""
        limits = []
        if num_cpus > 0:
            limits.append(math.floor((self.cpus - self.used_cpus) / num_cpus + _EPS))
        if num_gpus > 0:
            limits.append(math.floor((self.gpus - self.used_gpus) / num_gpus + _EPS))
        return max(0, min(limits)) if limits else None

    def add(self, n: int, num_cpus: float, num_gpus: float) -> Machine:
        return replace(self, used_cpus=self.used_cpus + n * num_cpus, used_gpus=self.used_gpus + n * num_gpus)


@dataclass(frozen=True)
class PoolInfo:
    """One of a deployment's workers: its Celery hostname, its machine and its pool size."""

    hostname: str
    machine: str
    pool_size: int


def room(pools: list[PoolInfo], machines: dict[str, Machine], num_cpus: float, num_gpus: float) -> int | None:
    """How many more replicas the deployment's machines fit; None when a replica asks for nothing."""
    total = 0
    for name in {p.machine for p in pools}:
        fits = machines[name].fits(num_cpus, num_gpus)
        if fits is None:
            return None
        total += fits
    return total


def plan_resize(
    pools: list[PoolInfo], machines: dict[str, Machine], target: int, num_cpus: float, num_gpus: float
) -> dict[str, int]:
    """New pool size per worker hostname, summing to `target` or to as many as the machines fit.

    Growth goes one replica at a time to the worker whose machine has the most room left (spreading load
    over machines); shrinking takes from the largest pool first. Only workers whose size changes appear.
    """
    sizes = {p.hostname: p.pool_size for p in pools}
    machine_of = {p.hostname: p.machine for p in pools}
    machines = dict(machines)
    total = sum(sizes.values())
    while total < target:
        best: tuple[float, int, str] | None = None
        for host, size in sizes.items():
            fits = machines[machine_of[host]].fits(num_cpus, num_gpus)
            if fits == 0:
                continue
            key = (-(fits if fits is not None else math.inf), size, host)
            if best is None or key < best:
                best = key
        if best is None:
            break
        host = best[2]
        sizes[host] += 1
        machines[machine_of[host]] = machines[machine_of[host]].add(1, num_cpus, num_gpus)
        total += 1
    while total > target:
        host = max(sizes, key=lambda h: (sizes[h], h))
        if sizes[host] == 0:
            break
        sizes[host] -= 1
        total -= 1
    before = {p.hostname: p.pool_size for p in pools}
    return {host: size for host, size in sizes.items() if size != before[host]}
