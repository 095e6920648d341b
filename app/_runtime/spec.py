"""An application's spec: the JSON written to Redis that gateways, workers and the scaler agree on.

Workers never receive code over Redis: they import the user's module, as every machine has the user's
code. The spec says where to import from: the application object (`module:attribute`, or a script's file
path) when it is reachable, otherwise each deployment's class or function plus its JSON bind arguments.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from celery_serve._runtime import by_value
from celery_serve._wire import keys as _keys
from celery_serve.application import Application, Pipeline, flatten, name_of, replace_applications
from celery_serve.config import DeploymentConfig, validate_route_prefix
from celery_serve.deployment import Deployment, definition_at, definition_index
from celery_serve.exceptions import DeploymentConfigError

_HANDLE_MARK = "__serve_handle__"
# Options a running replica takes without a restart, as Ray Serve's "lightweight" updates.
LIGHTWEIGHT_OPTIONS = frozenset(
    {
        "user_config",
        "num_replicas",
        "autoscaling_config",
        "max_queued_requests",
        "request_timeout_s",
        "job_retention_s",
        "request_retention_s",
        "health_check_period_s",
        "health_check_timeout_s",
        "graceful_shutdown_wait_loop_s",
        "graceful_shutdown_timeout_s",
        "logging_config",
    }
)
# Options that the worker (the pool process) itself was started with (its pool follows num_replicas).
WORKER_OPTIONS = (
    "num_cpus",
    "num_gpus",
    "memory",
    "max_replicas_per_node",
    "allow_cpu_fallback",
)
_MAIN_ALIAS = "__serve_main__"


@dataclass
class DeploymentSpec:
    name: str
    app: str
    config: dict[str, Any]
    target: dict[str, Any]
    is_function: bool
    init: dict[str, Any] | None = None
    code_version: str | None = None  # `version`, or a hash of the code and bind arguments (see code_version)

    @property
    def identity(self) -> str:
        """What a running replica is: its code version and every option that needs a restart to change.
        Replicas of an equal identity take a new spec in place (`reconfigure()`); others are replaced."""
        heavy = {k: v for k, v in sorted(self.config.items()) if k not in LIGHTWEIGHT_OPTIONS}
        # as Ray's DeploymentVersion: the code version (which covers the code and bind arguments unless
        # `version` is given) and the options, not the bind arguments themselves
        text = json.dumps([self.code_version, heavy], sort_keys=True, default=repr)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def worker_options(self) -> dict[str, Any]:
        """The options a deployment's worker process was started with: changing one needs a new worker."""
        return {k: self.config.get(k) for k in WORKER_OPTIONS}

    @property
    def queue(self) -> str:
        return _keys.queue(self.app, self.name, gpu=float(self.config.get("num_gpus") or 0) > 0)

    @property
    def multiplexed(self) -> bool:
        """Does it load models with `@multiplexed` (requests naming a model then go to that model's queue)?"""
        return bool(self.target.get("multiplexed"))

    @property
    def options(self) -> DeploymentConfig:
        return DeploymentConfig(**self.config)


@dataclass
class AppSpec:
    name: str
    route_prefix: str
    ingress: str
    deployments: dict[str, DeploymentSpec]
    source: dict[str, Any] | None = None
    deployed_at: float = field(default_factory=time.time)
    pipeline: list[list[str]] | None = None  # stages of deployment names, for a pipeline application
    owner: dict[str, Any] | None = None  # the run serving it {id, pid, host, kind, started_at}; None: `deploy`

    @property
    def is_pipeline(self) -> bool:
        return self.pipeline is not None

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "route_prefix": self.route_prefix,
                "ingress": self.ingress,
                "source": self.source,
                "deployed_at": self.deployed_at,
                "pipeline": self.pipeline,
                "owner": self.owner,
                "deployments": {
                    name: {
                        "config": d.config,
                        "target": d.target,
                        "is_function": d.is_function,
                        "init": d.init,
                        "code_version": d.code_version,
                    }
                    for name, d in self.deployments.items()
                },
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> AppSpec:
        data = json.loads(raw)
        deployments = {
            name: DeploymentSpec(name=name, app=data["name"], **d) for name, d in data["deployments"].items()
        }
        return cls(
            name=data["name"],
            route_prefix=data["route_prefix"],
            ingress=data["ingress"],
            deployments=deployments,
            source=data.get("source"),
            deployed_at=data.get("deployed_at", 0.0),
            pipeline=data.get("pipeline"),
            owner=data.get("owner"),
        )


def validate_app_name(name: str) -> str:
    if not name or not all(ch.isalnum() or ch in "_-" for ch in name) or len(name) > 100:
        raise DeploymentConfigError(f"application name must be letters, digits, '_' or '-', got {name!r}")
    return name


def build_spec(root: Application | Pipeline, name: str, route_prefix: str | None, source: str | None = None) -> AppSpec:
    """Describe an application graph (or pipeline); `source` is its import path (`module:attr`) when known."""
    if not isinstance(root, (Application, Pipeline)):
        raise DeploymentConfigError(
            f"expected an application built with .bind() (or a pipeline, A.bind() >> B.bind()), got "
            f"{type(root).__name__}; for a deployment named X, pass X.bind()"
        )
    validate_app_name(name)
    first = root if isinstance(root, Application) else root.stages[0][0]
    try:
        prefix = validate_route_prefix(route_prefix or first.deployment.config.route_prefix or "/")
    except ValueError as exc:
        raise DeploymentConfigError(f"route_prefix {exc}, got {route_prefix!r}") from None
    graph = flatten(root.applications if isinstance(root, Pipeline) else root)
    stages = [[name_of(graph, app) for app in stage] for stage in root.stages] if isinstance(root, Pipeline) else None
    ingress = pipeline_ingress(stages) if stages else name_of(graph, root)  # type: ignore[arg-type]
    if not source and by_value.needs_by_value([n.deployment.func_or_class for n in graph.values()]):
        app_source: dict[str, Any] | None = by_value.pack(root)  # nothing for workers to import: ship the code
    else:
        app_source = _source_from_path(source) if source else _find_app_source(root)
    deployments = {}
    for dep_name, node in graph.items():
        config = node.deployment.config.model_dump()
        config["name"] = dep_name
        target = node.deployment.func_or_class
        deployments[dep_name] = DeploymentSpec(
            name=dep_name,
            app=name,
            config=config,
            target=_target_source(target),
            is_function=not inspect.isclass(target),
            init=None if app_source else _json_init(graph, node, name),
            code_version=code_version(node, app_source),
        )
    return AppSpec(
        name=name,
        route_prefix=prefix or "/",
        ingress=ingress,
        deployments=deployments,
        source=app_source,
        pipeline=stages,
    )


def code_version(node: Application, app_source: dict[str, Any] | None) -> str:
    """`version` when given (as in Ray: an unchanged version is not restarted), otherwise a hash of the
    class's (function's) source and its bind arguments, so that a redeploy of unchanged code is not either."""
    given = node.deployment.config.version
    if given is not None:
        return f"v:{given}"
    target = node.deployment.func_or_class
    try:
        source = _code_text(target)
    except (OSError, TypeError):
        source = f"{target.__module__}.{target.__qualname__}@{id(target)}"  # unknown code: always a new version
    args = json.dumps(
        [replace_applications(list(node.args), _app_mark), replace_applications(dict(node.kwargs), _app_mark)],
        sort_keys=True,
        default=repr,
    )
    text = json.dumps([source, args, app_source], sort_keys=True, default=repr)
    return "h:" + hashlib.sha1(text.encode()).hexdigest()[:16]


def _code_text(target: Any) -> str:
    """The source of a function, or of every function defined in a class (found through their code objects:
    `inspect.getsource` of a class finds the first class of that name in the file, not this one)."""
    if not inspect.isclass(target):
        return inspect.getsource(target)
    parts = [target.__qualname__, repr([b.__qualname__ for b in target.__bases__])]
    for name, value in sorted(vars(target).items()):
        func = getattr(value, "__func__", value)
        if inspect.isfunction(func):
            parts.append(inspect.getsource(func))
        elif not name.startswith("__"):
            parts.append(f"{name}={value!r}")
    return "\n".join(parts)


def _app_mark(child: Application) -> str:
    return f"<deployment {child.deployment.name}>"


def pipeline_ingress(stages: list[list[str]]) -> str:
    """A pipeline's name where an ingress deployment's would be: 'A >> parallel(B, C) >> D'."""
    return " >> ".join(s[0] if len(s) == 1 else f"parallel({', '.join(s)})" for s in stages)


def _target_source(target: Any) -> dict[str, Any]:
    module = target.__module__
    source: dict[str, Any] = {"module": module, "qualname": target.__qualname__}
    index = definition_index(target)
    if index:
        source["definition"] = index  # the script defines this name again later (see definition_at)
    if is_multiplexed(target):  # requests naming a model then wait on that model's queue (_wire/affinity.py)
        source["multiplexed"] = True
    if module == "__main__" and not by_value.main_has_no_file():
        source["file"] = os.path.abspath(sys.modules["__main__"].__file__ or "")
    return source


def is_multiplexed(target: Any) -> bool:
    """Has this deployment class a `@multiplexed` model loader?"""
    from celery_serve.multiplex import MULTIPLEX_ATTR

    return inspect.isclass(target) and any(
        getattr(getattr(target, name, None), MULTIPLEX_ATTR, None) for name in dir(target)
    )


def _source_from_path(path: str) -> dict[str, Any]:
    module, _, attr = path.partition(":")
    return {"module": module, "attr": attr or "app"}


def _find_app_source(root: Application | Pipeline) -> dict[str, Any] | None:
    """Find the module-level variable that holds this application, so workers can import it."""
    first = root if isinstance(root, Application) else root.stages[0][0]
    module_name = first.deployment.func_or_class.__module__
    module = sys.modules.get(module_name)
    if module is None:
        return None
    for attr, value in vars(module).items():
        if value is root:
            source: dict[str, Any] = {"module": module_name, "attr": attr}
            if module_name == "__main__":
                source["file"] = os.path.abspath(getattr(module, "__file__", None) or "")
            return source
    return None


def _json_init(graph: dict[str, Application], node: Application, app_name: str) -> dict[str, Any]:
    def to_mark(child: Application) -> dict[str, Any]:
        return {_HANDLE_MARK: {"app": app_name, "deployment": name_of(graph, child)}}

    init = {
        "args": replace_applications(list(node.args), to_mark),
        "kwargs": replace_applications(dict(node.kwargs), to_mark),
    }
    try:
        json.dumps(init)
    except (TypeError, ValueError) as exc:
        raise DeploymentConfigError(
            f"bind() arguments of '{node.deployment.name}' must be JSON-serializable when the application is not "
            f"a module-level variable ({exc}); assign the application to a module-level name, e.g. app = ...bind()"
        ) from None
    return init


def import_object(source: dict[str, Any], attr: str) -> Any:
    """Import `attr` (dotted) from a spec's module or script file."""
    file = source.get("file")
    if file:
        module = sys.modules.get(_MAIN_ALIAS)
        if module is None or getattr(module, "__file__", None) != file:
            spec = importlib.util.spec_from_file_location(_MAIN_ALIAS, file)
            if spec is None or spec.loader is None:
                raise DeploymentConfigError(f"cannot import the application's script {file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[_MAIN_ALIAS] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source["module"])
    obj: Any = module
    for part in attr.split("."):
        if part == "<locals>":
            raise DeploymentConfigError(
                f"'{source.get('qualname', attr)}' is defined inside a function; define deployments at module "
                "level so workers can import them"
            )
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DeploymentConfigError(f"'{attr}' not found in {file or source['module']}") from None
    return obj


def resolve_deployment(spec: AppSpec, dep_name: str, make_handle: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Return (class or function, init args, init kwargs) for a deployment, with handles in place of apps."""
    dep = spec.deployments[dep_name]
    if spec.source:
        if by_value.KEY in spec.source:
            root = by_value.unpack(spec.source)
        else:
            root = import_object(spec.source, spec.source["attr"])
        if not isinstance(root, (Application, Pipeline)):
            raise DeploymentConfigError(
                f"{spec.source.get('module')}:{spec.source.get('attr', '(by value)')} is not an application (.bind())"
            )
        graph = flatten(root.applications if isinstance(root, Pipeline) else root)
        node = graph[dep_name]

        def to_handle(child: Application) -> Any:
            return make_handle(spec.name, name_of(graph, child))

        args = replace_applications(node.args, to_handle)
        kwargs = replace_applications(node.kwargs, to_handle)
        return node.deployment.func_or_class, tuple(args), dict(kwargs)

    obj = import_object(dep.target, dep.target["qualname"])
    target = obj.func_or_class if isinstance(obj, Deployment) else obj
    target = definition_at(target, int(dep.target.get("definition") or 0))
    init = dep.init or {"args": [], "kwargs": {}}

    def from_marks(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_HANDLE_MARK}:
                ref = value[_HANDLE_MARK]
                return make_handle(ref["app"], ref["deployment"])
            return {k: from_marks(v) for k, v in value.items()}
        if isinstance(value, list):
            return [from_marks(v) for v in value]
        return value

    return target, tuple(from_marks(init["args"])), from_marks(init["kwargs"])
