"""Gateway middlewares, as Ray Serve's `http_options={"middlewares": [...]}`: Starlette middlewares around the
whole gateway, so CORS preflights, compression or authentication are answered there, before any job exists.

The gateway is a process of its own, so middlewares travel as data in `SERVE_HTTP_MIDDLEWARES`:

- `module:attribute`, naming a list of `starlette.middleware.Middleware` (importable by the gateway), or
- JSON written by `encode()` (what `run(..., http_options={"middlewares": [...]})` sends): each middleware's
  class by import path and its arguments, which must be JSON (CORS's are).

`SERVE_CORS_ALLOW_ORIGINS` (`--cors-allow-origins`, comma-separated) is the short way to CORS: Starlette's
`CORSMiddleware` with those origins, every method and header.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from celery_serve.exceptions import DeploymentConfigError

HTTP_OPTIONS = frozenset({"middlewares"})


def cors_options(origins: list[str]) -> dict[str, Any]:
    """CORSMiddleware's arguments for the short way to CORS: these origins, every method and header."""
    return {"allow_origins": origins, "allow_methods": ["*"], "allow_headers": ["*"]}


def cors_entry(origins: list[str]) -> dict[str, Any]:
    """The same CORS middleware as a JSON entry of `SERVE_HTTP_MIDDLEWARES` (see `encode`)."""
    return {"cls": _path_of(CORSMiddleware), "args": [], "kwargs": cors_options(origins)}


def _path_of(cls: Any) -> str:
    path = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise DeploymentConfigError(
            f"middleware {cls.__qualname__} must be importable by the gateway process: define it in a module"
        )
    return path


def encode(middlewares: list[Middleware]) -> str:
    """Middlewares as JSON for the gateway process; `DeploymentConfigError` if one cannot travel."""
    out = []
    for item in middlewares:
        if not isinstance(item, Middleware):
            raise DeploymentConfigError(
                f"http_options middlewares must be starlette.middleware.Middleware(...), got {type(item).__name__}"
            )
        cls, args, kwargs = item
        try:
            out.append({"cls": _path_of(cls), "args": json.loads(json.dumps(list(args))), "kwargs": kwargs})
            json.dumps(kwargs)
        except (TypeError, ValueError) as exc:
            raise DeploymentConfigError(
                f"the arguments of middleware {cls.__qualname__} must be JSON data to reach the gateway ({exc}); "
                "or name a list of middlewares by import path in SERVE_HTTP_MIDDLEWARES (module:attribute)"
            ) from None
    return json.dumps(out)


def from_http_options(http_options: dict[str, Any] | None) -> str | None:
    """`run()`'s `http_options` as the `SERVE_HTTP_MIDDLEWARES` value (None when there are none)."""
    if not http_options:
        return None
    unknown = set(http_options) - HTTP_OPTIONS
    if unknown:
        raise DeploymentConfigError(
            f"unknown http_options {sorted(unknown)}: celery-serve takes 'middlewares' there (host and port are "
            "arguments of run())"
        )
    middlewares = http_options.get("middlewares") or []
    return encode(list(middlewares)) if middlewares else None


def _import(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        raise DeploymentConfigError(f"cannot import {path!r} for SERVE_HTTP_MIDDLEWARES: {exc}") from None
    return value


def load(spec: str | None, cors_allow_origins: str | None = None) -> list[Middleware]:
    """The gateway's middlewares, outermost first."""
    middlewares: list[Middleware] = []
    if cors_allow_origins:
        origins = [o.strip() for o in cors_allow_origins.split(",") if o.strip()]
        middlewares.append(Middleware(CORSMiddleware, **cors_options(origins)))
    if not spec:
        return middlewares
    if spec.lstrip().startswith("["):
        for entry in json.loads(spec):
            middlewares.append(Middleware(_import(entry["cls"]), *entry.get("args", []), **entry.get("kwargs", {})))
        return middlewares
    found = _import(spec)
    if not isinstance(found, (list, tuple)) or not all(isinstance(m, Middleware) for m in found):
        raise DeploymentConfigError(f"{spec!r} must be a list of starlette.middleware.Middleware")
    return [*middlewares, *found]


def wrap(app: ASGIApp, middlewares: list[Middleware]) -> ASGIApp:
    """`app` inside `middlewares` (the first one outermost, as Starlette orders them)."""
    for cls, args, kwargs in reversed(middlewares):
        app = cls(app, *args, **kwargs)
    return app
