"""Process-wide settings of the gateway and the CLI, read from the environment.

Apart from `celery_serve.config` so that replicas, which never read them, do not import pydantic-settings.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from celery_serve.config import DEFAULT_MAX_BODY_BYTES


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
