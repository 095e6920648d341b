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
        merged.update(options)
        return Deployment(self._target, make_config(**merged))

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Bind constructor arguments (for a function: nothing); bound deployments become handles."""
        if not inspect.isclass(self._target) and (args or kwargs):
            raise DeploymentConfigError(
                f"function deployment '{self.name}' takes no bind() arguments; "
                "use a class deployment to pass constructor arguments"
            )
        return Application(self, args, kwargs)

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

    Options: name, num_replicas, route_prefix, max_queued_requests, max_ongoing_requests,
    request_timeout_s, num_cpus, num_gpus, max_batch_size, user_config, version, job_retention_s
    (how long async job results are kept), request_retention_s (the same for synchronous requests),
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
        return Deployment(target, make_config(**{"name": target.__name__, **options}))

    return decorate(_target) if _target is not None else decorate


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
