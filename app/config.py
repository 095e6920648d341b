"""Typed configuration: a deployment's options and the process-wide settings read from the environment.

Options are validated once, where they enter (`@deployment(...)`, `.options(...)`, the environment), and
errors name the option and the value so the user knows what to change.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class RayActorOptions(BaseModel):
    """Ray's `ray_actor_options`: `num_cpus`, `num_gpus` and `memory` become this deployment's resources;
    the others are accepted (so Ray modules import unchanged) and have no effect here, with a warning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    memory: float | None = Field(default=None, ge=0)
    object_store_memory: float | None = Field(default=None, ge=0)
    resources: dict[str, float] | None = None
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] | None = None


class LoggingConfig(BaseModel):
    """Ray's `logging_config`: the replica's log level, text or JSON lines, and whether it logs each request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None
    encoding: Literal["TEXT", "JSON"] | None = None
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = Field(default_factory=list)

    @field_validator("log_level", "encoding", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


# Ray options accepted so that Ray modules run unchanged, and why each has no effect here (said once, as a
# warning, where the option is given).
NO_EFFECT: dict[str, str] = {
    "placement_group_bundles": "replicas are processes placed by their worker, not Ray placement groups",
    "placement_group_strategy": "replicas are processes placed by their worker, not Ray placement groups",
    "request_router_config": "replicas pull from one shared queue, so there is no request router to configure",
}
ACTOR_NO_EFFECT: dict[str, str] = {
    "object_store_memory": "there is no Ray object store",
    "resources": "custom Ray resources are not scheduled here (use num_cpus, num_gpus, memory)",
    "accelerator_type": "GPUs are chosen by SERVE_GPU_DEVICES/--devices on the worker, not by type",
    "runtime_env": "workers run in the environment they were started in (install dependencies there)",
}
LOGGING_NO_EFFECT: dict[str, str] = {
    "logs_dir": "replica logs go to the worker's stderr (redirect it, or use a log collector)",
    "additional_log_standard_attrs": "the log format is fixed (text, or JSON with encoding='JSON')",
}
HEALTH_CHECK_FAILURES = 3  # consecutive failed (or hung) health checks after which a replica is replaced, as in Ray


class DeploymentConfig(BaseModel):
    """Everything `@deployment(...)` and `.options(...)` accept: Ray Serve's options plus our own.

    Ray defaults are kept, except `max_ongoing_requests` (100, not 5: a replica drains and batches its queue
    itself, so a low cap starves batching) and `max_queued_requests` (10,000, not unbounded: a full queue
    answers 503 at once, our backpressure principle).
    """

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
    # Caps on one streamed response (None: SERVE_STREAM_MAX_CHUNKS / SERVE_STREAM_MAX_BYTES): a producer that
    # passes one ends its stream with StreamLimitError.
    stream_max_chunks: int | None = Field(default=None, ge=1, le=100_000_000)
    stream_max_bytes: int | None = Field(default=None, ge=1, le=64 * 1024**3)
    # Ray Serve's lifecycle options, with Ray's defaults
    health_check_period_s: float = Field(default=10.0, gt=0, le=24 * 3600)
    health_check_timeout_s: float = Field(default=30.0, gt=0, le=24 * 3600)
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, gt=0, le=3600)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0, le=24 * 3600)
    max_constructor_retry_count: int = Field(default=20, ge=1, le=10_000)
    max_replicas_per_node: int | None = Field(default=None, ge=1, le=1024)
    memory: float | None = Field(default=None, ge=0)  # bytes per replica (ray_actor_options["memory"])
    logging_config: LoggingConfig | None = None
    ray_actor_options: RayActorOptions | None = None
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    request_router_config: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _actor_resources(cls, data: Any) -> Any:
        """`ray_actor_options` num_cpus/num_gpus/memory are this deployment's resources; giving the same one
        both ways with different values is a mistake worth saying. `max_concurrent_queries` (Ray < 2.10) is
        `max_ongoing_requests`."""
        if not isinstance(data, dict):
            return data
        if "max_concurrent_queries" in data:
            data = dict(data)
            old = data.pop("max_concurrent_queries")
            if "max_ongoing_requests" in data and data["max_ongoing_requests"] != old:
                raise ValueError(
                    "max_concurrent_queries is the old name of max_ongoing_requests: give only max_ongoing_requests"
                )
            data["max_ongoing_requests"] = old
        actor = data.get("ray_actor_options")
        if not isinstance(actor, Mapping):
            return data
        data = dict(data)
        for key in ("num_cpus", "num_gpus", "memory"):
            value = actor.get(key)
            if value is None:
                continue
            if data.get(key) is not None and data[key] != value:
                raise ValueError(
                    f"{key} is given twice with different values ({key}={data[key]!r} and "
                    f"ray_actor_options['{key}']={value!r}); give it once"
                )
            data[key] = value
        return data

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


def make_config(*, _given: Mapping[str, Any] | None = None, **options: Any) -> DeploymentConfig:
    """Build a `DeploymentConfig`, turning pydantic's errors into one `DeploymentConfigError`.

    `_given` are the options the user wrote this time (default: all): each Ray option among them that has no
    effect here is reported with one warning saying why.
    """
    given = dict(options if _given is None else _given)
    try:
        config = DeploymentConfig(**options)
    except ValidationError as exc:
        raise DeploymentConfigError(describe_validation_error(exc)) from None
    warn_no_effect(config.name, given)
    return config


def warn_no_effect(name: str, given: Mapping[str, Any]) -> None:
    """One `UserWarning` naming every option given that is accepted for Ray compatibility but does nothing here."""
    reasons = [f"{key} ({why})" for key, why in NO_EFFECT.items() if given.get(key) is not None]
    actor = given.get("ray_actor_options")
    if isinstance(actor, Mapping):
        reasons += [f"ray_actor_options['{k}'] ({why})" for k, why in ACTOR_NO_EFFECT.items() if actor.get(k)]
    logging_config = given.get("logging_config")
    if isinstance(logging_config, Mapping):
        reasons += [f"logging_config['{k}'] ({why})" for k, why in LOGGING_NO_EFFECT.items() if logging_config.get(k)]
        if logging_config.get("enable_access_log") is False:
            reasons.append(
                "logging_config['enable_access_log'] (requests are logged by the gateway: SERVE_ACCESS_LOG=0 "
                "or --no-access-log turns that off)"
            )
    if reasons:
        warnings.warn(
            f"deployment '{name}': accepted for Ray Serve compatibility but without effect here: " + "; ".join(reasons),
            UserWarning,
            stacklevel=4,
        )


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        option = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown deployment option '{option}' (got {err['input']!r})")
            continue
        message = err["msg"].removeprefix("Value error, ")
        message = f"{option} {message[0].lower()}{message[1:]}" if option != "options" else message
        parts.append(message if ", got " in message or option == "options" else f"{message}, got {err.get('input')!r}")
    return "invalid deployment options: " + "; ".join(parts)
