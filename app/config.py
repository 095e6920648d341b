"""Typed configuration: a deployment's options and the process-wide settings read from the environment.

Options are validated once, where they enter (`@deployment(...)`, `.options(...)`, the environment), and
errors name the option and the value so the user knows what to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from celery_serve.exceptions import DeploymentConfigError

DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_MAX_QUEUED_REQUESTS = 10_000
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
AUTO_MAX_REPLICAS = 8  # `num_replicas="auto"`: at most this many (and never more than the machines fit)


class AutoscalingConfig(BaseModel):
    """How a deployment's replica count follows its load (`autoscaling_config=` or `num_replicas="auto"`).

    The load is what waits in the deployment's queue plus what replicas have taken and not finished; the
    scaler runs `ceil(load / target_ongoing_requests)` replicas, within [min_replicas, max_replicas], after
    the load has asked for more (fewer) for `upscale_delay_s` (`downscale_delay_s`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0, le=1024)
    max_replicas: int = Field(default=AUTO_MAX_REPLICAS, ge=1, le=1024)
    initial_replicas: int | None = Field(default=None, ge=0, le=1024)
    target_ongoing_requests: float = Field(default=2.0, gt=0, le=1_000_000)
    upscale_delay_s: float = Field(default=3.0, ge=0, le=24 * 3600)
    downscale_delay_s: float = Field(default=60.0, ge=0, le=24 * 3600)
    metrics_interval_s: float = Field(default=1.0, ge=0.05, le=3600)

    @field_validator("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "metrics_interval_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas must be >= min_replicas, got max_replicas={self.max_replicas} and "
                f"min_replicas={self.min_replicas}"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas must be between min_replicas ({self.min_replicas}) and max_replicas "
                f"({self.max_replicas}), got initial_replicas={initial}"
            )
        return self

    @property
    def start_replicas(self) -> int:
        """How many replicas a deployment starts with."""
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas


class DeploymentConfig(BaseModel):
    """Everything `@deployment(...)` and `.options(...)` accept."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
    num_replicas: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
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
    autoscaling_config: AutoscalingConfig | None = None
    # How many times a request may be handed back because its replica died (or stalled) while running it,
    # before it ends `failed` and goes to the deployment's dead-letter list: a request that crashes its
    # replica cannot take the deployment down with it.
    max_deliveries: int = Field(default=3, ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _auto_replicas(cls, data: Any) -> Any:
        """`num_replicas="auto"` means autoscaling (defaults unless a config is given), and a config means
        `"auto"`; a fixed count other than the default cannot be combined with an autoscaling config."""
        if not isinstance(data, dict):
            return data
        scaling, count = data.get("autoscaling_config"), data.get("num_replicas", 1)
        if count == "auto":
            return {**data, "autoscaling_config": AutoscalingConfig() if scaling is None else scaling}
        if scaling is not None:
            if count not in (1, None):
                raise ValueError(
                    "num_replicas cannot be combined with autoscaling_config (use one or the other; pass "
                    f"autoscaling_config=None for a fixed count), got num_replicas={count!r}"
                )
            return {**data, "num_replicas": "auto"}
        return data

    @field_validator("num_replicas", mode="before")
    @classmethod
    def _count_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024):
            return value
        hint = " (to scale to zero, use autoscaling_config={'min_replicas': 0, ...})" if value == 0 else ""
        raise ValueError(f"must be an integer from 1 to 1024, or 'auto' for autoscaling{hint}")

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


def autoscaling_of(config: Mapping[str, Any]) -> AutoscalingConfig | None:
    """A spec's deployment config (a dict) -> its autoscaling config, or None for a fixed count."""
    raw = config.get("autoscaling_config")
    return None if raw is None else AutoscalingConfig(**raw)


def start_replicas(config: Mapping[str, Any]) -> int:
    """How many replicas a deployment (a spec's config dict) starts with: `num_replicas`, or for an
    autoscaled deployment `initial_replicas` (default `min_replicas`, which may be 0)."""
    scaling = autoscaling_of(config)
    return scaling.start_replicas if scaling is not None else int(config["num_replicas"])


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
        message = f"{option} {message[0].lower()}{message[1:]}" if option != "options" else message
        parts.append(message if ", got " in message else f"{message}, got {err.get('input')!r}")
    return "invalid deployment options: " + "; ".join(parts)


class ServeSettings(BaseSettings):
    """Process-wide settings, read once from the environment (prefix `SERVE_`, plus `REDIS_URL`)."""

    model_config = SettingsConfigDict(env_prefix="SERVE_", extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1)
    # What one client may hold at the gateway (see celery_serve.api.limits): 408, 431 and 503 beyond these.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_headers: int = Field(default=100, ge=8)
    max_connections: int = Field(default=10_000, ge=1)
    max_connections_per_client: int = Field(default=2048, ge=1)
    # Starlette middlewares around the gateway (celery_serve.api.middlewares): module:attribute or JSON.
    http_middlewares: str | None = None
    cors_allow_origins: str | None = None  # comma-separated origins: CORS answered at the gateway
    result_ttl_s: int = Field(default=24 * 3600, ge=1)
    log_level: str = "WARNING"
