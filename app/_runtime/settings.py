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
    result_ttl_s: int = Field(default=24 * 3600, ge=1)
    log_level: str = "WARNING"
