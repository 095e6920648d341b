"""The programming model: `@deployment`, `.options()`, `.bind()` and `@ingress`.

A `Deployment` is a plain value object (a class or function plus its validated options); `.bind()` makes an
`Application`, a node of the graph that `run` deploys. Nothing here touches Redis or Celery, so user modules
import cheaply in the gateway, the workers and tests alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, overload

from celery_serve.application import Application
from celery_serve.config import DeploymentConfig, make_config
from celery_serve.exceptions import DeploymentConfigError

_INGRESS_ATTR = "__serve_ingress_app__"
_ACTOR_RESOURCES = ("num_cpus", "num_gpus", "memory")


class Deployment:
    """A class or function with its deployment options; call `.bind()` to build an application."""

    def __init__(self, target: Callable[..., Any], config: DeploymentConfig) -> None:
        self._target = target
        self._config = config

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def func_or_class(self) -> Callable[..., Any]:
        return self._target

    @property
    def ingress_app(self) -> Any:
        """The FastAPI app given to `@ingress`, or None."""
        return getattr(self._target, _INGRESS_ATTR, None)

    def options(self, **options: Any) -> Deployment:
        """Return a copy with some options changed; the original is left as it was."""
        merged = self._config.model_dump()
        actor = dict(options.get("ray_actor_options") or merged.get("ray_actor_options") or {})
        for key in _ACTOR_RESOURCES:
            if key in options and options[key] is not None and actor.get(key) is not None:
                actor[key] = options[key]  # a resource given directly wins over the one inside ray_actor_options
            elif actor.get(key) is not None and "ray_actor_options" in options:
                merged.pop(key, None)  # new ray_actor_options resources replace the old values
        if "max_concurrent_queries" in options:  # Ray's old name of max_ongoing_requests
            merged.pop("max_ongoing_requests", None)
        merged.update(options)
        if actor:
            merged["ray_actor_options"] = actor
        return Deployment(self._target, make_config(_given=options, **merged))

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Bind constructor arguments (for a function: nothing); bound deployments become handles."""
        if not inspect.isclass(self._target) and (args or kwargs):
            raise DeploymentConfigError(
                f"function deployment '{self.name}' takes no bind() arguments; "
                "use a class deployment to pass constructor arguments"
            )
        return Application(self, args, kwargs)

    def deploy(self, *init_args: Any, _blocking: bool = True, **init_kwargs: Any) -> Any:
        """Ray Serve 1.x's `Deployment.deploy()`: run this deployment alone as an application of its name,
        served at `route_prefix` or `/<name>`. Deploying it again (even a new class of the same name) is a
        rolling update. Does nothing inside a replica (which imports the script that calls it)."""
        import os

        import celery_serve

        if os.environ.get("CELERY_SERVE_REPLICA"):
            return None
        return celery_serve.run(
            self.bind(*init_args, **init_kwargs),
            name=self.name,
            route_prefix=self._config.route_prefix or f"/{self.name}",
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise DeploymentConfigError(
            f"deployment '{self.name}' cannot be called directly: build an application with "
            f"{self.name}.bind(...) and start it with serve.run(...) or `celery-serve run`"
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r}, num_replicas={self._config.num_replicas})"


@overload
def deployment(_target: Callable[..., Any]) -> Deployment: ...


@overload
def deployment(_target: None = None, **options: Any) -> Callable[[Callable[..., Any]], Deployment]: ...


def deployment(_target: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Turn a class or a function into a `Deployment`; works bare (`@deployment`) or with options.

    Every option of Ray Serve's `@serve.deployment` is accepted: name, version, num_replicas, route_prefix,
    ray_actor_options (num_cpus, num_gpus, memory), max_replicas_per_node, user_config, max_ongoing_requests,
    max_queued_requests, autoscaling_config, graceful_shutdown_wait_loop_s, graceful_shutdown_timeout_s,
    health_check_period_s, health_check_timeout_s, logging_config, max_constructor_retry_count (those with no
    effect here, such as placement_group_bundles, are accepted with one warning saying why). Our own:
    num_cpus, num_gpus, memory, max_batch_size, request_timeout_s, allow_cpu_fallback, job_retention_s (how
    long async job results are kept), request_retention_s (the same for synchronous requests),
    max_deliveries (how many replica deaths a request may cause before it is dead-lettered),
    stream_max_chunks and stream_max_bytes (caps on one streamed response).
    """
    if _target is not None and not callable(_target):
        raise DeploymentConfigError(
            f"@deployment takes options as keywords, e.g. @deployment(num_replicas=2); got {_target!r}"
        )

    def decorate(target: Callable[..., Any]) -> Deployment:
        if isinstance(target, Deployment):
            return target.options(**options)
        if not (inspect.isclass(target) or inspect.isfunction(target)):
            raise DeploymentConfigError(f"@deployment goes on a class or a function, got {target!r}")
        _remember_definition(target)
        return Deployment(target, make_config(**{"name": target.__name__, **options}))

    return decorate(_target) if _target is not None else decorate


# Every class or function made a deployment, by (module file or name, qualname), in definition order: a
# script may define a class again under the same name (Ray 1.x's rolling-update example), and a worker that
# imports the script finds each definition by its position, not only the last one bound to the name.
_DEFINITIONS: dict[tuple[str, str], list[Any]] = {}


def _definition_key(target: Any) -> tuple[str, str]:
    import sys

    module = sys.modules.get(target.__module__)
    return (getattr(module, "__file__", None) or target.__module__, target.__qualname__)


def _remember_definition(target: Any) -> None:
    found = _DEFINITIONS.setdefault(_definition_key(target), [])
    if not any(t is target for t in found):
        found.append(target)


def definition_index(target: Any) -> int:
    """Which definition of its name `target` is (0 for the first, or the only one)."""
    found = _DEFINITIONS.get(_definition_key(target), [])
    return next((i for i, t in enumerate(found) if t is target), 0)


def definition_at(target: Any, index: int) -> Any:
    """The `index`th definition with `target`'s name (after its module was imported); `target` if unknown."""
    found = _DEFINITIONS.get(_definition_key(target), [])
    return found[index] if 0 <= index < len(found) else target


def ingress(fastapi_app: Any) -> Callable[[Any], Any]:
    """Serve a FastAPI app as the deployment's HTTP interface; its routes run inside the replica.

    Goes below `@deployment` (as in Ray Serve) or above it; route methods take `self` as usual.
    """
    from fastapi import FastAPI

    if not isinstance(fastapi_app, FastAPI):
        raise DeploymentConfigError(f"@ingress takes a fastapi.FastAPI app, got {type(fastapi_app).__name__}")

    def decorate(target: Any) -> Any:
        cls = target.func_or_class if isinstance(target, Deployment) else target
        if not inspect.isclass(cls):
            raise DeploymentConfigError("@ingress goes on a class whose methods are the FastAPI routes")
        setattr(cls, _INGRESS_ATTR, fastapi_app)
        return target

    return decorate
