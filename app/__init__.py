"""celery-serve: Ray Serve's programming model on Redis queues and Celery worker pools.

from app import deployment, run

@deployment
def hello(request):
    return f"Hello {request.query_params.get('name', 'world')}!"

handle = run(hello.bind())
"""

from app._serve import run, shutdown
from app.batch import batch
from app.client import AsyncClient, Client, Job, get_deployment_handle
from app.context import ReplicaContext, get_replica_context
from app.deployment import Application, Deployment, deployment, ingress
from app.exceptions import (
    BackpressureError,
    BadRequestError,
    DeploymentConfigError,
    DeploymentNotFoundError,
    JobCancelledError,
    PayloadTooLargeError,
    RemoteError,
    RequestTimeoutError,
    ServeError,
    ServeStartupError,
)
from app.handle import DeploymentHandle, DeploymentResponse
from app.pipeline import Parallel, Pipeline, parallel, pipeline

__all__ = [
    "Application",
    "AsyncClient",
    "BackpressureError",
    "BadRequestError",
    "Client",
    "Deployment",
    "DeploymentConfigError",
    "DeploymentHandle",
    "DeploymentNotFoundError",
    "DeploymentResponse",
    "Job",
    "JobCancelledError",
    "Parallel",
    "PayloadTooLargeError",
    "Pipeline",
    "RemoteError",
    "ReplicaContext",
    "RequestTimeoutError",
    "ServeError",
    "ServeStartupError",
    "batch",
    "deployment",
    "get_deployment_handle",
    "get_replica_context",
    "ingress",
    "parallel",
    "pipeline",
    "run",
    "shutdown",
]
