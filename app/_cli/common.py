"""What every subcommand shares: the same option names, defaults read from the environment (and shown in
`--help`), importing the user's application, and finding the Redis to talk to."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from celery_serve.exceptions import DeploymentConfigError, ServeError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows each option's default (and the variable it comes from)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
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
    """Import `module:attribute` (default attribute `app`) with the current directory importable."""
    module_name, _, attr = path.partition(":")
    attr = attr or "app"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise DeploymentConfigError(
            f"cannot import '{module_name}' ({exc}); run from the folder that holds it"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise DeploymentConfigError(f"module '{module_name}' has no attribute '{attr}'") from None


def source_of(target: str) -> str:
    return target if ":" in target else f"{target}:app"


def require_redis(args: argparse.Namespace) -> str:
    url = getattr(args, "redis_url", None) or os.environ.get("REDIS_URL")
    if not url:
        raise ServeError("this command needs a Redis: pass --redis-url or set REDIS_URL")
    return str(url)
