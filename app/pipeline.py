"""Pipelines: `A.bind() >> B.bind() >> C.bind()` runs as a Celery chain, worker to worker.

    app = Normalize.bind() >> Embed.bind() >> Classify.bind()
    app = pipeline(Normalize.bind(), parallel(Positive.bind(), Negative.bind()), Combine.bind())

Each step's result goes straight onto the next step's queue; only the last result returns to the caller.
A `parallel(...)` step runs its deployments on the same input at once and hands the list of their results
to the next step (a chord). A pipeline is an application: served at its route prefix, called through
the handle `run` returns, submitted as a job, called from the client.

Prefer a pipeline when data flows one way through fixed steps: intermediate results never return to an
ingress, and no replica sits waiting on another. Prefer handles inside a deployment when the flow
depends on the data (branches, loops, retries) or when a step combines results in its own code.
"""

from __future__ import annotations

from typing import Any

from app.deployment import Application, Deployment
from app.exceptions import DeploymentConfigError

Stage = list[Application]


def _as_application(step: Any) -> Application:
    if isinstance(step, Application):
        return step
    if isinstance(step, Deployment):
        return step.bind()
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


def parallel(*steps: Any) -> Parallel:
    """Run deployments on the same input at once; use it as a pipeline step."""
    return Parallel(*steps)


def pipeline(*steps: Any) -> Pipeline:
    """The same as `steps[0] >> steps[1] >> ...`."""
    if len(steps) < 2:
        raise DeploymentConfigError(f"a pipeline needs at least two steps, got {len(steps)}")
    result = Pipeline([])
    for step in steps:
        result = result >> step
    return result
