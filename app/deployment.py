"""The programming model: `@deployment`, `.options()`, `.bind()` and `@ingress`.

A `Deployment` is a plain value object (a class or function plus its validated options); `.bind()` makes an
`Application`, a node of the graph that `run` deploys. Nothing here touches Redis or Celery, so user modules
import cheaply in the gateway, the workers and tests alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, overload

from app.config import DeploymentConfig, make_config
from app.exceptions import DeploymentConfigError

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
            f"{self.name}.bind(...) and start it with app.run(...) or `celery-serve run`"
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r}, num_replicas={self._config.num_replicas})"


class Application:
    """A bound deployment: the deployment plus its constructor arguments (which may hold other apps)."""

    def __init__(self, deployment: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.deployment = deployment
        self.args = args
        self.kwargs = kwargs

    def __rshift__(self, other: Any) -> Any:
        """`A.bind() >> B.bind()`: a pipeline (see `app.pipeline`)."""
        from app.pipeline import Pipeline

        return Pipeline([[self]]) >> other

    def __repr__(self) -> str:
        return f"Application({self.deployment.name!r})"


@overload
def deployment(_target: Callable[..., Any]) -> Deployment: ...


@overload
def deployment(_target: None = None, **options: Any) -> Callable[[Callable[..., Any]], Deployment]: ...


def deployment(_target: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Turn a class or a function into a `Deployment`; works bare (`@deployment`) or with options.

    Options: name, num_replicas, route_prefix, max_queued_requests, max_ongoing_requests,
    request_timeout_s, num_cpus, num_gpus, max_batch_size, user_config, version, job_retention_s
    (how long async job results are kept), request_retention_s (the same for synchronous requests).
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


def iter_applications(value: Any) -> Iterator[Application]:
    """Yield the Applications found in a bind argument, looking inside lists, tuples and dicts."""
    if isinstance(value, Application):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_applications(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_applications(item)


def replace_applications(value: Any, replace: Callable[[Application], Any]) -> Any:
    """Copy a bind argument with every Application in it replaced by `replace(app)`."""
    if isinstance(value, Application):
        return replace(value)
    if isinstance(value, list):
        return [replace_applications(v, replace) for v in value]
    if isinstance(value, tuple):
        return tuple(replace_applications(v, replace) for v in value)
    if isinstance(value, dict):
        return {k: replace_applications(v, replace) for k, v in value.items()}
    return value


def flatten(root: Application | list[Application]) -> dict[str, Application]:
    """Name every Application in the graph (or graphs), roots after what they bind; repeated names get a
    `_1`, `_2` suffix.

    The order and names are deterministic, so a worker that imports the same application finds the same
    deployment under the same name.
    """
    names: dict[int, str] = {}
    ordered: dict[str, Application] = {}
    taken: set[str] = set()

    def visit(node: Application, path: tuple[int, ...]) -> None:
        if id(node) in names:
            return
        if id(node) in path:
            raise DeploymentConfigError(f"the application graph has a cycle through '{node.deployment.name}'")
        for child in [*iter_applications(list(node.args)), *iter_applications(node.kwargs)]:
            visit(child, (*path, id(node)))
        name, n = node.deployment.name, 1
        while name in taken:
            name, n = f"{node.deployment.name}_{n}", n + 1
        taken.add(name)
        names[id(node)] = name
        ordered[name] = node

    for node in root if isinstance(root, list) else [root]:
        visit(node, ())
    return ordered


def name_of(graph: dict[str, Application], node: Application) -> str:
    for name, candidate in graph.items():
        if candidate is node:
            return name
    raise DeploymentConfigError(f"{node!r} is not part of this application")
