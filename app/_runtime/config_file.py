"""Config files in Ray Serve's schema (`serve build` / `serve deploy` / `serve config`).

    http_options: {host: 127.0.0.1, port: 8000}   # also cors_allow_origins: [...], middlewares: [{cls, kwargs}]
    applications:
    - name: default
      route_prefix: /
      import_path: examples.hello:app
      args: {}                      # for an application builder: import_path names a function of args
      deployments:
      - name: Hello
        num_replicas: 2             # any deployment option: overrides what the code says
        user_config: {greeting: hi}

A file is checked whole before anything is deployed: an unknown field, application or deployment, or an
option of the wrong type, is refused with `file:line` of what is wrong.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from celery_serve._runtime.spec import AppSpec, build_spec
from celery_serve.application import Application, Pipeline
from celery_serve.config import DeploymentConfig
from celery_serve.exceptions import DeploymentConfigError

_ACCEPTED_WITHOUT_EFFECT = {
    "proxy_location": "the gateway runs where you start it (celery-serve gateway / run)",
    "grpc_options": "there is no gRPC proxy; the gateway serves HTTP",
    "target_capacity": "replica counts follow num_replicas and autoscaling_config",
    "runtime_env": "workers run in the environment they were started in",
    "external_scaler_enabled": "the scaler is celery-serve's own",
}
# deployment options a config file may set: every option of the code except its name (the entry's key)
OVERRIDABLE = sorted(set(DeploymentConfig.model_fields) - {"name"})


class MiddlewareEntry(BaseModel):
    """One gateway middleware: a Starlette middleware class by import path, and its (JSON) arguments."""

    model_config = ConfigDict(extra="forbid")

    cls: str  # module:Class, e.g. starlette.middleware.gzip:GZipMiddleware
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class HTTPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float | None = None
    # the gateway's middlewares (celery_serve.api.middlewares), outermost first; CORS is the short way to one
    cors_allow_origins: list[str] | None = None
    middlewares: list[MiddlewareEntry] | None = None

    @model_validator(mode="after")
    def _importable(self) -> HTTPOptions:
        """Each middleware class must import here, as the gateway will import it: checked with the file."""
        spec = self.middleware_spec()
        if spec:
            from celery_serve.api import middlewares

            middlewares.load(spec)  # DeploymentConfigError (a ValueError) names what does not import
        return self

    def middleware_spec(self) -> str | None:
        """The middlewares as the gateway reads them (`SERVE_HTTP_MIDDLEWARES` JSON); None when there are none."""
        from celery_serve.api.middlewares import cors_entry

        entries = [entry.model_dump() for entry in self.middlewares or []]
        if self.cors_allow_origins:
            entries.insert(0, cors_entry(self.cors_allow_origins))
        return json.dumps(entries) if entries else None


class DeploymentOverride(BaseModel):
    """One entry of an application's `deployments`: its name and the options it overrides."""

    model_config = ConfigDict(extra="allow")

    name: str


class ApplicationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)
    runtime_env: dict[str, Any] | None = None
    external_scaler_enabled: bool | None = None
    deployments: list[DeploymentOverride] = Field(default_factory=list)


class ServeConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proxy_location: str | None = None
    http_options: HTTPOptions = Field(default_factory=HTTPOptions)
    grpc_options: dict[str, Any] | None = None
    logging_config: dict[str, Any] | None = None
    target_capacity: float | None = None
    applications: list[ApplicationConfig]


class ConfigFile:
    """A parsed config file, with the line of every field so errors can point at it."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        text = Path(path).read_text()
        try:
            node = yaml.compose(text)
        except yaml.YAMLError as exc:
            raise DeploymentConfigError(f"{self.path}: not valid YAML: {exc}") from None
        self.lines: dict[tuple[Any, ...], int] = {}
        data = _to_python(node, (), self.lines) if node is not None else None
        if not isinstance(data, dict):
            raise DeploymentConfigError(
                f"{self.path}: expected a mapping with 'applications', got {type(data).__name__}"
            )
        try:
            self.config = ServeConfigFile(**data)
        except ValidationError as exc:
            raise DeploymentConfigError(self._describe(exc, ())) from None
        self._warn_no_effect(data)

    def where(self, path: tuple[Any, ...]) -> str:
        """`file:line` of the deepest known part of `path`."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return f"{self.path}:{line}"
        return self.path

    def _describe(self, exc: ValidationError, prefix: tuple[Any, ...]) -> str:
        parts = []
        for err in exc.errors():
            loc = prefix + tuple(err["loc"])
            field = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                parts.append(f"{self.where(loc)}: unknown field '{loc[-1]}' ({field})")
            else:
                parts.append(f"{self.where(loc)}: {field}: {err['msg'].removeprefix('Value error, ')}")
        return "invalid config file: " + "; ".join(parts)

    def _warn_no_effect(self, data: dict[str, Any]) -> None:
        reasons = [f"{k} ({why})" for k, why in _ACCEPTED_WITHOUT_EFFECT.items() if data.get(k) is not None]
        for app in data.get("applications") or []:
            for key in ("runtime_env", "external_scaler_enabled"):
                if isinstance(app, dict) and app.get(key):
                    reasons.append(f"applications[{app.get('name')}].{key} ({_ACCEPTED_WITHOUT_EFFECT[key]})")
        if reasons:
            warnings.warn(
                f"{self.path}: accepted for Ray Serve compatibility but without effect here: " + "; ".join(reasons),
                UserWarning,
                stacklevel=3,
            )

    def specs(self, import_target: Any) -> list[AppSpec]:
        """Every application's spec, with the file's overrides applied; `import_target(import_path)` imports."""
        names: dict[str, int] = {}
        prefixes: dict[str, str] = {}
        specs = []
        for index, app in enumerate(self.config.applications):
            at = ("applications", index)
            if app.name in names:
                raise DeploymentConfigError(f"{self.where(at + ('name',))}: application name '{app.name}' is repeated")
            names[app.name] = index
            prefix = app.route_prefix or "/"
            if prefix in prefixes:
                raise DeploymentConfigError(
                    f"{self.where(at + ('route_prefix',))}: route_prefix '{prefix}' is already used by application "
                    f"'{prefixes[prefix]}'"
                )
            prefixes[prefix] = app.name
            root = _application(import_target(app.import_path), app.args, self.where(at + ("import_path",)))
            try:
                spec = build_spec(root, app.name, prefix, source=app.import_path if not app.args else None)
            except DeploymentConfigError as exc:
                raise DeploymentConfigError(f"{self.where(at)}: {exc}") from None
            self._override(spec, app, at)
            specs.append(spec)
        return specs

    def _override(self, spec: AppSpec, app: ApplicationConfig, at: tuple[Any, ...]) -> None:
        for index, entry in enumerate(app.deployments):
            here = at + ("deployments", index)
            dep = spec.deployments.get(entry.name)
            if dep is None:
                raise DeploymentConfigError(
                    f"{self.where(here + ('name',))}: application '{app.name}' has no deployment '{entry.name}' "
                    f"(it has: {', '.join(sorted(spec.deployments))})"
                )
            overrides = dict(entry.model_extra or {})
            for key in overrides:
                if key not in OVERRIDABLE:
                    raise DeploymentConfigError(
                        f"{self.where(here + (key,))}: unknown option '{key}' of deployment '{entry.name}' "
                        f"(options: {', '.join(OVERRIDABLE)})"
                    )
            merged = dict(dep.config)
            if "num_replicas" in overrides and "autoscaling_config" not in overrides:
                merged["autoscaling_config"] = None
            if "autoscaling_config" in overrides and "num_replicas" not in overrides:
                merged["num_replicas"] = 1
            actor = overrides.get("ray_actor_options")
            if isinstance(actor, dict):
                for key in ("num_cpus", "num_gpus", "memory"):
                    if key in actor and key not in overrides:
                        merged.pop(key, None)
            merged.update(overrides)
            try:
                config = DeploymentConfig(**merged)
            except ValidationError as exc:
                raise DeploymentConfigError(self._describe(exc, here)) from None
            dep.config = config.model_dump()
            dep.config["name"] = entry.name


def _application(found: Any, args: dict[str, Any], where: str) -> Application | Pipeline:
    """The application at an import path: an application, or a builder function called with `args`."""
    if isinstance(found, (Application, Pipeline)):
        if args:
            raise DeploymentConfigError(
                f"{where}: 'args' are given but the import path names an application, not a builder function"
            )
        return found
    if callable(found) and not inspect.isclass(found):
        built = found(args)
        if isinstance(built, (Application, Pipeline)):
            return built
        raise DeploymentConfigError(f"{where}: the builder returned {type(built).__name__}, not an application")
    raise DeploymentConfigError(f"{where}: expected an application (.bind()) or a builder function, got {found!r}")


def _to_python(node: Any, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            result[key] = _to_python(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


# --- writing ------------------------------------------------------------------------------------------------

_WRITTEN_OPTIONS = (
    "num_replicas",
    "autoscaling_config",
    "max_ongoing_requests",
    "max_queued_requests",
    "user_config",
    "ray_actor_options",
    "max_batch_size",
    "request_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
)


def config_of(specs: list[AppSpec], host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    """A config file (as data) that deploys these applications as they are."""
    applications = []
    for spec in specs:
        deployments = []
        for name, dep in spec.deployments.items():
            entry: dict[str, Any] = {"name": name}
            for key in _WRITTEN_OPTIONS:
                value = dep.config.get(key)
                if key == "num_replicas" and dep.config.get("autoscaling_config") is not None:
                    continue
                if key == "ray_actor_options":
                    value = {k: dep.config.get(k) for k in ("num_cpus", "num_gpus", "memory") if dep.config.get(k)}
                if value is not None and value != {}:
                    entry[key] = value
            deployments.append(entry)
        source = spec.source or {}
        import_path = f"{source['module']}:{source['attr']}" if source.get("attr") and not source.get("file") else None
        applications.append(
            {
                "name": spec.name,
                "route_prefix": spec.route_prefix,
                "import_path": import_path or "<not importable: deploy it from a module-level variable>",
                "args": {},
                "deployments": deployments,
            }
        )
    return {"http_options": {"host": host, "port": port}, "applications": applications}


def dump(config: dict[str, Any], header: str = "") -> str:
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return (header + "\n" if header else "") + text
