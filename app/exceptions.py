"""The exceptions celery-serve raises.

    ServeError                       base of everything below
    ├── DeploymentConfigError        an invalid option or a bad application graph (also ValueError)
    ├── DeploymentNotFoundError      no such application, deployment or route (HTTP 404)
    ├── BadRequestError              the request cannot be read as sent (HTTP 400; also ValueError)
    ├── PayloadTooLargeError         the body is over the gateway's limit (HTTP 413)
    ├── BackpressureError            the deployment's queue is full (HTTP 503, retry later)
    ├── RequestTimeoutError          no result before the request's deadline (HTTP 504; also TimeoutError)
    ├── JobCancelledError            the job was cancelled before it finished (HTTP 409)
    ├── ApplicationConflictError     the application name belongs to another live run (HTTP 409)
    ├── ReplicaCrashError            the request's replica died running it, max_deliveries times (HTTP 500)
    ├── ServiceUnavailableError      Redis cannot be reached or does not answer in time (HTTP 503)
    │   └── ApplicationStoppedError  the application's run stopped a moment ago; retry once it runs again
    ├── RemoteError                  user code raised; carries the remote type and message (HTTP 500)
    └── ServeStartupError            something `run` needed did not come up

Every exception is safe to cross a process boundary: it turns into a JSON dict with `to_dict()` and back
with `error_from_dict()`, so the gateway, a handle and the client raise the same thing for the same failure.
"""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """Base class of every celery-serve error."""

    http_status: int = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))

    def to_dict(self) -> dict[str, Any]:
        return {"exc_type": type(self).__name__, "exc_message": self.message, "exc_module": __name__}


class DeploymentConfigError(ServeError, ValueError):
    """A deployment option or application graph is invalid; the message names the option and value."""


class DeploymentNotFoundError(ServeError):
    http_status = 404


class BadRequestError(ServeError, ValueError):
    http_status = 400


class PayloadTooLargeError(ServeError):
    http_status = 413


class BackpressureError(ServeError):
    """The deployment already has `max_queued_requests` waiting; retry after a short pause."""

    http_status = 503


class RequestTimeoutError(ServeError, TimeoutError):
    http_status = 504


class JobCancelledError(ServeError):
    http_status = 409


class RequestIdInUseError(ServeError):
    """A client-chosen `X-Request-ID` already names a job (ids are never reused: they would read another result)."""

    http_status = 409


class ApplicationConflictError(ServeError):
    """Another live `celery-serve run` (or `serve.run()`) serves an application of this name on this Redis;
    stop it, choose another name, or replace it explicitly (`--replace`, `run(..., replace=True)`)."""

    http_status = 409


class StreamUsageError(ServeError, TypeError):
    """A stream where a value was expected, or the other way round: a generator method called without
    `handle.options(stream=True)`, or a method that returns a value called with it."""

    http_status = 500


class ReplicaCrashError(ServeError):
    """The replica running the request died (or stalled past its liveness timeout) as many times as the
    deployment's `max_deliveries` allows: the request ends failed and is kept in the deployment's dead-letter
    list (`celery-serve dlq list`), so one request that crashes its replica cannot take the service down."""

    http_status = 500


class StreamLimitError(ServeError):
    """A response stream passed its cap in chunks or bytes (`SERVE_STREAM_MAX_CHUNKS` / `_MAX_BYTES`)."""

    http_status = 500


class ResultNotJSONError(ServeError):
    """A deployment returned a value with no JSON form (NaN, an infinity): its caller gets a 500 naming it."""

    http_status = 500


class ServiceUnavailableError(ServeError):
    """Redis cannot be reached or does not answer within `SERVE_REDIS_TIMEOUT_S`; retry shortly."""

    http_status = 503


class ApplicationStoppedError(ServiceUnavailableError):
    """The application's run stopped a few minutes ago at most (`celery-serve shutdown`, Ctrl-C, one of its
    processes exited): nothing serves it now, but it is not deleted; retry once it runs again (HTTP 503)."""


class ServeStartupError(ServeError):
    """A process `run` started (Redis, the gateway, a deployment's workers) did not come up."""


class RemoteError(ServeError):
    """User code raised an exception in a replica.

    `remote_type` and `remote_message` carry the original exception's class name and message; the
    traceback stays in the worker's log.
    """

    http_status = 500

    def __init__(self, remote_type: str, remote_message: str, deployment: str = "") -> None:
        where = f" in deployment '{deployment}'" if deployment else ""
        super().__init__(f"{remote_type}{where}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.deployment = deployment

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.remote_type, self.remote_message, self.deployment))

    def to_dict(self) -> dict[str, Any]:
        return {
            "exc_type": self.remote_type,
            "exc_message": self.remote_message,
            "exc_module": "remote",
            "deployment": self.deployment,
        }


def _serve_errors() -> dict[str, type[ServeError]]:
    """Every ServeError class by name (RemoteError aside: it carries the remote type instead)."""
    found: dict[str, type[ServeError]] = {"ServeError": ServeError}
    pending = list(ServeError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not RemoteError and cls.__module__ == __name__:
            found[cls.__name__] = cls
    return found


def error_from_dict(data: dict[str, Any], deployment: str = "") -> ServeError:
    """Rebuild the exception a replica or the gateway recorded (Celery's JSON exception format)."""
    exc_type = str(data.get("exc_type", "Exception"))
    message = data.get("exc_message", "")
    if isinstance(message, (list, tuple)):
        message = " ".join(str(part) for part in message)
    known = _serve_errors()
    if data.get("exc_module") == __name__ and exc_type in known:
        return known[exc_type](str(message))
    return RemoteError(exc_type, str(message), str(data.get("deployment") or deployment))
