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

from celery_serve.application import Parallel, Pipeline
from celery_serve.exceptions import DeploymentConfigError

__all__ = ["Parallel", "Pipeline", "parallel", "pipeline"]


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
