"""One logging set-up for every celery-serve process: the CLI, gateway, workers, replicas, scaler and Flower.

Each entry point calls `configure(level, component)` once (nothing is configured at import). Every line
has the same shape, `time LEVEL [component pid] logger: message`, or is one JSON object per line with
`SERVE_LOG_FORMAT=json` (or `--log-format json`). Redis URLs in messages lose their password on the way
out, so a secret never reaches a log even when a library prints its connection string.

The gateway's access log (one line per request: request id, method, path, deployment, status, latency)
goes to the `celery_serve.access` logger at INFO; it is on under `celery-serve run` and switchable off
(`SERVE_ACCESS_LOG=0`, `--no-access-log`).
"""

from __future__ import annotations

import logging
import os
import re
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(component)s %(process)d] %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(component)s %(process)d %(name)s %(message)s"
ACCESS_LOGGER = "celery_serve.access"
FORMATS = ("text", "json")

# user:password@ or :password@ in any URL-looking text (redis://, rediss://, redis+sentinel://, amqp://...)
_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<secret>[^@/\s]+)@", re.I)
# Libraries that are chatty at INFO with nothing an operator needs.
_QUIET = ("celery.worker.consumer", "celery.bootsteps", "kombu", "urllib3", "httpx", "httpcore", "asyncio")


def redact(text: str) -> str:
    """The text with every password in a URL replaced by `***`."""
    return _SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


class _Context(logging.Filter):
    """Stamps each record with the process's component and strips secrets from its message."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        if _may_hold_url(record):
            try:
                record.msg, record.args = redact(record.getMessage()), None
            except (TypeError, ValueError):
                pass  # a malformed logging call: let logging report it as it always does
        return True


def _may_hold_url(record: logging.LogRecord) -> bool:
    if "://" in str(record.msg):
        return True
    args = record.args
    if not args:
        return False
    values = args.values() if isinstance(args, dict) else args
    return any(not isinstance(v, (int, float)) and "://" in str(v) for v in values)


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"})
    return logging.Formatter(TEXT_FORMAT)


def log_format() -> str:
    fmt = (os.environ.get("SERVE_LOG_FORMAT") or "text").lower()
    return fmt if fmt in FORMATS else "text"


def configure(level: str, component: str, fmt: str | None = None, *, access_log: bool | None = None) -> None:
    """Set up this process's logging (replacing any handler already on the root logger).

    `component` names the process in every line (gateway, worker, replica, scaler, flower, cli); `fmt` is
    "text" or "json" (default `$SERVE_LOG_FORMAT`); `access_log` turns the gateway's request lines on or
    off (default `$SERVE_ACCESS_LOG`, on unless "0").
    """
    fmt = (fmt or log_format()).lower()
    os.environ["SERVE_LOG_FORMAT"] = fmt  # children started from here log the same way
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    handler.addFilter(_Context(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    if access_log is None:
        access_log = os.environ.get("SERVE_ACCESS_LOG", "1") != "0"
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
    # Library warnings (Celery's "running as root", say) as log lines in the same format, not raw stderr.
    logging.captureWarnings(True)
