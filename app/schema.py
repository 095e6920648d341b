"""What `serve.status()` returns, in Ray Serve's shape (`ray.serve.schema.ServeStatus`).

An application is DEPLOYING until every deployment has its replicas, RUNNING when they are up,
UNHEALTHY while a replica that failed its health checks is being replaced, DEPLOY_FAILED when a
constructor failed `max_constructor_retry_count` times in a row, and DELETING while `delete` stops it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any


class ApplicationStatus(StrEnum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(StrEnum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


@dataclass
class DeploymentStatusOverview:
    status: DeploymentStatus
    message: str = ""
    replica_states: dict[str, int] = field(default_factory=dict)  # RUNNING / STARTING counts, as in Ray


@dataclass
class ApplicationStatusOverview:
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    route_prefix: str | None = None
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)


@dataclass
class ServeStatus:
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Enum):
                return value.value
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(asdict(self))  # type: ignore[no-any-return]
