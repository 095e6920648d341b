"""The public API is what `celery_serve` (app/__init__.py) exports; this test pins it (as httpx's does)."""

from __future__ import annotations

import types

import celery_serve

EXPECTED = [
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


def test_all_is_pinned() -> None:
    assert sorted(celery_serve.__all__) == EXPECTED


def test_every_exported_name_exists() -> None:
    missing = [name for name in celery_serve.__all__ if not hasattr(celery_serve, name)]
    assert missing == []


def test_nothing_public_is_left_out_of_all() -> None:
    public = {
        name
        for name, value in vars(celery_serve).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(celery_serve.__all__)
