"""`set_traffic()`: how a route's HTTP requests are shared between the applications deployed on it (a canary
at 10%, a rollout, a rollback), changed while everything runs (see `celery_serve._wire.traffic`)."""

from __future__ import annotations

import json
import math

from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import sync_client
from celery_serve._wire.traffic import TRAFFIC_KEY
from celery_serve.config import validate_route_prefix
from celery_serve.exceptions import DeploymentConfigError, DeploymentNotFoundError


def set_traffic(route_prefix: str, weights: dict[str, float] | None, *, redis_url: str | None = None) -> None:
    """Share `route_prefix`'s HTTP requests between applications deployed on it, by weight.

        serve.run(v1_app, name="v1", route_prefix="/model")
        serve.run(v2_app, name="v2", route_prefix="/model")   # takes no traffic yet
        serve.set_traffic("/model", {"v1": 90, "v2": 10})     # a canary: every tenth request
        serve.set_traffic("/model", {"v2": 1})                # promoted

    Weights are non-negative numbers (only their ratios matter); gateways follow a change within a second,
    requests already queued finish where they are. `None` or `{}` removes the split: the application
    deployed there first takes everything. Handles call the application they name and ignore splits.
    """
    from celery_serve._runtime import serve as _serve

    url = redis_url or _serve.redis_url()
    try:
        prefix = validate_route_prefix(route_prefix) or "/"
    except ValueError as exc:
        raise DeploymentConfigError(f"route_prefix {exc}, got {route_prefix!r}") from None
    client = sync_client(url)
    if not weights:
        client.hdel(TRAFFIC_KEY, prefix)
        return
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise DeploymentConfigError(f"traffic weight for '{name}' must be a number >= 0, got {weight!r}")
    if sum(weights.values()) <= 0:
        raise DeploymentConfigError(f"traffic weights for {prefix} must not all be 0: {weights}")
    deployed = {
        (k.decode() if isinstance(k, bytes) else k): AppSpec.from_json(v).route_prefix
        for k, v in client.hgetall(_keys.APPS).items()
    }
    for name in weights:
        if name not in deployed:
            raise DeploymentNotFoundError(
                f"no application named '{name}' is deployed (deployed on {prefix}: "
                f"{', '.join(sorted(n for n, p in deployed.items() if p == prefix)) or 'none'})"
            )
        if deployed[name] != prefix:
            raise DeploymentConfigError(
                f"application '{name}' serves {deployed[name]}, not {prefix}: deploy it with route_prefix={prefix!r}"
            )
    client.hset(TRAFFIC_KEY, prefix, json.dumps({name: float(w) for name, w in weights.items()}))


def get_traffic(route_prefix: str, *, redis_url: str | None = None) -> dict[str, float]:
    """The split stored for a route prefix ({} when none)."""
    from celery_serve._runtime import serve as _serve

    raw = sync_client(redis_url or _serve.redis_url()).hget(TRAFFIC_KEY, route_prefix)
    return {} if raw is None else {k: float(v) for k, v in json.loads(raw).items()}
