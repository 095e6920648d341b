"""Typed configuration: a deployment's options and the process-wide settings read from the environment.

Options are validated once, where they enter (`@deployment(...)`, `.options(...)`, the environment), and
errors name the option and the value so the user knows what to change.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.exceptions import DeploymentConfigError

DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_MAX_QUEUED_REQUESTS = 10_000
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


class DeploymentConfig(BaseModel):
    """Everything `@deployment(...)` and `.options(...)` accept."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")
    num_replicas: int = Field(default=1, ge=1, le=1024)
    route_prefix: str | None = None
    max_queued_requests: int = Field(default=DEFAULT_MAX_QUEUED_REQUESTS, ge=-1)
    max_ongoing_requests: int = Field(default=100, ge=1, le=100_000)
    request_timeout_s: float = Field(default=DEFAULT_REQUEST_TIMEOUT_S, gt=0, le=7 * 24 * 3600)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_batch_size: int | None = Field(default=None, ge=1, le=100_000)
    user_config: dict[str, Any] | None = None
    version: str | None = None
    allow_cpu_fallback: bool = False
    job_retention_s: int = Field(default=24 * 3600, ge=1, le=90 * 24 * 3600)
    request_retention_s: int = Field(default=600, ge=1, le=90 * 24 * 3600)

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix_is_a_path(cls, value: str | None) -> str | None:
        return validate_route_prefix(value)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (unbounded) or at least 1")
        return value

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("must be a fraction of one GPU (0 < n <= 1) or a whole number of GPUs")
        return value


def validate_route_prefix(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("must be a path starting with '/', such as '/' or '/api'")
    if value != "/" and value.endswith("/"):
        raise ValueError("must not end with '/' (except the root '/')")
    if any(ch in value for ch in "?#{} "):
        raise ValueError("must be a plain path without '?', '#', '{', '}' or spaces")
    return value


def make_config(**options: Any) -> DeploymentConfig:
    """Build a `DeploymentConfig`, turning pydantic's errors into one `DeploymentConfigError`."""
    try:
        return DeploymentConfig(**options)
    except ValidationError as exc:
        raise DeploymentConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        option = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown deployment option '{option}' (got {err['input']!r})")
            continue
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{option} {message[0].lower()}{message[1:]}, got {err.get('input')!r}")
    return "invalid deployment options: " + "; ".join(parts)


class ServeSettings(BaseSettings):
    """Process-wide settings, read once from the environment (prefix `SERVE_`, plus `REDIS_URL`)."""

    model_config = SettingsConfigDict(env_prefix="SERVE_", extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1)
    result_ttl_s: int = Field(default=24 * 3600, ge=1)
    log_level: str = "WARNING"
