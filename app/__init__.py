"""celery-serve: Ray Serve's programming model on Redis queues and Celery worker pools.

    import celery_serve as serve

    @serve.deployment
    def hello(request):
        return f"Hello {request.query_params.get('name', 'world')}!"

    handle = serve.run(hello.bind())

This module is the whole public API (`__all__`, pinned by tests/test_exported_members.py). The wire
protocol (`celery_serve._wire`), the run-time orchestration (`celery_serve._runtime`) and the command line
(`celery_serve._cli`) are private; the worker side is `celery_serve.workers`, the gateway
`celery_serve.api`.
"""

import celery_serve.status as _status_module  # noqa: F401 - loaded first, so `status` below stays the function
from celery_serve._runtime.serve import delete, get_app_handle, run, shutdown, start, status
from celery_serve._runtime.traffic import set_traffic
from celery_serve.application import Application, Parallel, Pipeline
from celery_serve.batch import batch
from celery_serve.client import AsyncClient, Client, Job, get_deployment_handle
from celery_serve.context import ReplicaContext, get_replica_context
from celery_serve.deployment import Deployment, deployment, ingress
from celery_serve.exceptions import (
    ApplicationConflictError,
    ApplicationStoppedError,
    BackpressureError,
    BadRequestError,
    DeploymentConfigError,
    DeploymentNotFoundError,
    JobCancelledError,
    PayloadTooLargeError,
    RemoteError,
    ReplicaCrashError,
    RequestIdInUseError,
    RequestTimeoutError,
    ResultNotJSONError,
    ServeError,
    ServeStartupError,
    ServiceUnavailableError,
    StreamLimitError,
    StreamUsageError,
)
from celery_serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from celery_serve.multiplex import get_multiplexed_model_id, multiplexed
from celery_serve.pipeline import parallel, pipeline

__version__ = "0.2.0"

__all__ = [
    "Application",
    "ApplicationConflictError",
    "ApplicationStoppedError",
    "AsyncClient",
    "BackpressureError",
    "BadRequestError",
    "Client",
    "Deployment",
    "DeploymentConfigError",
    "DeploymentHandle",
    "DeploymentNotFoundError",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "Job",
    "JobCancelledError",
    "Parallel",
    "PayloadTooLargeError",
    "Pipeline",
    "RemoteError",
    "ReplicaContext",
    "ReplicaCrashError",
    "RequestIdInUseError",
    "RequestTimeoutError",
    "ResultNotJSONError",
    "ServeError",
    "ServeStartupError",
    "ServiceUnavailableError",
    "StreamLimitError",
    "StreamUsageError",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "ingress",
    "multiplexed",
    "parallel",
    "pipeline",
    "run",
    "set_traffic",
    "shutdown",
    "start",
    "status",
]
