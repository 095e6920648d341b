"""What every subcommand shares: the same option names, defaults read from the environment (and shown in
`--help`), importing the user's application, and finding the Redis to talk to."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Any

from celery_serve._runtime.state import RunRecord, find_runs
from celery_serve._wire.connections import check_url, wait_for_redis
from celery_serve.exceptions import DeploymentConfigError, ServeError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows each option's default (and the variable it comes from)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if action.nargs == 0:  # a flag: its default is "not given"
            return text
        return f"{text} (default: %(default)s)"


def env_default(name: str, fallback: str | None = None) -> str | None:
    return os.environ.get(name) or fallback


def add_redis_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=env_default("REDIS_URL"),
        metavar="URL",
        help="the Redis every part talks through, e.g. redis://host:6379/0 ($REDIS_URL)",
    )


def add_log_level(parser: argparse.ArgumentParser, env: str = "SERVE_LOG_LEVEL", fallback: str = "WARNING") -> None:
    parser.add_argument(
        "--log-level",
        default=env_default(env, fallback),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help=f"how much to log (${env})",
    )
    parser.add_argument(
        "--log-format",
        default=env_default("SERVE_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text lines, or one JSON object per line ($SERVE_LOG_FORMAT)",
    )


def add_access_log(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        default=env_default("SERVE_ACCESS_LOG", "1") != "0",
        help="no line per HTTP request from the gateway ($SERVE_ACCESS_LOG=0)",
    )


def add_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        "-n",
        default=env_default("SERVE_APP_NAME", "default"),
        help="the application's name ($SERVE_APP_NAME)",
    )
    parser.add_argument("--app-name", dest="name", help=argparse.SUPPRESS)  # the 0.1 spelling on `worker`


def add_route_prefix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--route-prefix", default=None, help="where the application is served over HTTP (default: the code's, or /)"
    )


def import_application(path: str) -> Any:
    """Import `module:attribute` (default attribute `app`) with the current directory importable; errors
    say what went wrong: a file given instead of a module, a module not found, or the real cause of a
    module that failed while importing."""
    module_name, _, attr = path.partition(":")
    attr = attr or "app"
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        suggestion = module_name.removesuffix(".py").replace("/", ".").replace(os.sep, ".").strip(".")
        raise DeploymentConfigError(
            f"expected MODULE:APP, not a file path ({path!r}); try `{suggestion}:{attr}` from the folder that holds it"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise DeploymentConfigError(
                f"cannot find module '{module_name}' from {cwd}: run from the folder that holds it, or make it "
                "importable (pip install -e ., or PYTHONPATH)"
            ) from None
        raise DeploymentConfigError(_import_failed(module_name, exc)) from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing: say what and where
        raise DeploymentConfigError(_import_failed(module_name, exc)) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        from celery_serve.application import Application, Pipeline

        found = sorted(k for k, v in vars(module).items() if isinstance(v, (Application, Pipeline)))
        hint = f"; its applications are: {', '.join(found)}" if found else " (nor any application built with .bind())"
        raise DeploymentConfigError(f"module '{module_name}' has no attribute '{attr}'{hint}") from None


def _import_failed(module_name: str, exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"importing '{module_name}' failed{where}: {type(exc).__name__}: {exc}"


def source_of(target: str) -> str:
    return target if ":" in target else f"{target}:app"


def add_http_options(parser: argparse.ArgumentParser) -> None:
    """The gateway's middlewares (Ray's http_options): CORS origins, or a list of Starlette middlewares."""
    parser.add_argument(
        "--cors-allow-origins",
        default=None,
        metavar="ORIGINS",
        help="answer CORS at the gateway for these comma-separated origins ($SERVE_CORS_ALLOW_ORIGINS)",
    )
    parser.add_argument(
        "--http-middlewares",
        default=None,
        metavar="MODULE:ATTR",
        help="a list of starlette.middleware.Middleware to wrap the gateway in ($SERVE_HTTP_MIDDLEWARES)",
    )


def require_redis(args: argparse.Namespace) -> str:
    """The Redis named by --redis-url or $REDIS_URL, checked for its form and answering with our credentials.

    Fail closed: a command that cannot reach Redis, or that Redis refuses, ends within seconds with one line
    (`ServeError`) instead of starting and logging warnings forever."""
    url = getattr(args, "redis_url", None) or os.environ.get("REDIS_URL")
    if not url:
        raise ServeError("this command needs a Redis: pass --redis-url or set REDIS_URL")
    wait_for_redis(check_url(str(url)))
    return str(url)


def find_run(args: argparse.Namespace) -> RunRecord | None:
    """The local run these arguments mean: this folder's, else this environment's only one. With a Redis
    URL given, only a run on that Redis (None when there is none: the command works on the Redis alone)."""
    url = getattr(args, "redis_url", None) or os.environ.get("REDIS_URL")
    runs = find_runs()
    if url:
        return next((r for r in runs if r.redis_url == url), None)
    if not runs:
        return None
    if runs[0].cwd == os.getcwd() or len(runs) == 1:
        return runs[0]
    listed = "; ".join(f"pid {r.pid} in {r.cwd} ({', '.join(r.apps) or 'no apps'})" for r in runs)
    raise ServeError(
        f"several celery-serve runs in this environment ({listed}); run this from the folder of the one you "
        "mean, or pass --redis-url"
    )


def resolve_redis(args: argparse.Namespace) -> str:
    """--redis-url, $REDIS_URL, or the Redis of the local run (see `find_run`), answering within seconds."""
    url = getattr(args, "redis_url", None) or os.environ.get("REDIS_URL")
    if not url:
        run = find_run(args)
        if run is None:
            raise ServeError(
                "no Redis given and no celery-serve run found in this folder or this environment: pass "
                "--redis-url or set REDIS_URL (or start one: celery-serve run MODULE:APP)"
            )
        url = run.redis_url
    wait_for_redis(check_url(url))
    return url
