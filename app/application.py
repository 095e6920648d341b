"""The application graph that `.bind()` and `>>` build: bound deployments and pipelines.

An `Application` is a deployment plus its constructor arguments, which may hold other applications (they
reach the constructor as handles). `A.bind() >> B.bind()` makes a `Pipeline`, run as a Celery chain (see
`celery_serve.pipeline`). Plain values only: nothing here touches Redis or Celery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from celery_serve.exceptions import DeploymentConfigError

if TYPE_CHECKING:  # types only: deployment.py imports this module
    from celery_serve.deployment import Deployment


class Application:
    """A bound deployment: the deployment plus its constructor arguments (which may hold other apps)."""

    def __init__(self, deployment: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.deployment = deployment
        self.args = args
        self.kwargs = kwargs

    def __rshift__(self, other: Any) -> Pipeline:
        """`A.bind() >> B.bind()`: a pipeline, run as a Celery chain (see `celery_serve.pipeline`)."""
        return Pipeline([[self]]) >> other

    def __repr__(self) -> str:
        return f"Application({self.deployment.name!r})"


Stage = list[Application]


def _as_application(step: Any) -> Application:
    if isinstance(step, Application):
        return step
    if callable(getattr(step, "bind", None)) and hasattr(step, "func_or_class"):  # a Deployment
        bound = step.bind()
        if isinstance(bound, Application):
            return bound
    raise DeploymentConfigError(
        f"a pipeline step must be a deployment or a bound deployment (X.bind()), got {type(step).__name__}"
    )


class Parallel:
    """Steps that run on the same input at once; the next step receives the list of their results."""

    def __init__(self, *steps: Any) -> None:
        if len(steps) < 2:
            raise DeploymentConfigError(f"parallel() takes at least two deployments, got {len(steps)}")
        self.stage: Stage = [_as_application(s) for s in steps]

    def __rshift__(self, other: Any) -> Pipeline:
        return Pipeline([self.stage]) >> other

    def __repr__(self) -> str:
        return f"parallel({', '.join(a.deployment.name for a in self.stage)})"


class Pipeline:
    """A sequence of stages; each stage is one deployment or a parallel group."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages

    def __rshift__(self, other: Any) -> Pipeline:
        if isinstance(other, Pipeline):
            return Pipeline(self.stages + other.stages)
        if isinstance(other, Parallel):
            return Pipeline([*self.stages, other.stage])
        return Pipeline([*self.stages, [_as_application(other)]])

    def __rrshift__(self, other: Any) -> Pipeline:
        return Pipeline([[_as_application(other)]]) >> self

    @property
    def applications(self) -> list[Application]:
        return [app for stage in self.stages for app in stage]

    def __repr__(self) -> str:
        return " >> ".join(
            stage[0].deployment.name if len(stage) == 1 else f"parallel({', '.join(a.deployment.name for a in stage)})"
            for stage in self.stages
        )


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
