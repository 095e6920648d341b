"""Result records in Celery's result-backend format, so `AsyncResult(task_id).get()` reads ours too.

A record is JSON: {"status": SUCCESS|FAILURE|REVOKED, "result": value or exception dict, "task_id", ...}.
For an HTTP call the value is the response itself ({"status_code", "headers", "body", "body_encoding"}),
built in the replica, because only the replica knows what the user's code returned.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery_serve._wire import strictjson
from celery_serve.exceptions import ServeError, error_from_dict

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"


def _record(task_id: str, status: str, result: Any, **extra: Any) -> str:
    record = {
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": datetime.now(UTC).isoformat(),
        "task_id": task_id,
        **extra,
    }
    return strictjson.dumps(record).decode()  # NaN refused (NotJSONError), wide integers exact


def success(task_id: str, value: Any) -> str:
    return _record(task_id, SUCCESS, value)


def failure(task_id: str, error: dict[str, Any], http_status: int = 500) -> str:
    return _record(task_id, FAILURE, error, http_status=http_status)


def expired(task_id: str, deployment: str, *, started: bool = False) -> str:
    message = (
        f"the request to '{deployment}' was still running well past its deadline (its replica may have stalled)"
        if started
        else f"the request to '{deployment}' passed its deadline before a replica started it"
    )
    error = {
        "exc_type": "RequestTimeoutError",
        "exc_message": message,
        "exc_module": "celery_serve.exceptions",
    }
    return _record(task_id, REVOKED, error, http_status=504)


def job_status(record: str) -> str:
    """The job state a record (as built here: status first) ends in: succeeded, failed, expired, cancelled."""
    head = record[:24]
    if '"SUCCESS"' in head:
        return "succeeded"
    if '"FAILURE"' in head:
        return "failed"
    return "cancelled" if '"JobCancelledError"' in record else "expired"


def cancelled(task_id: str) -> str:
    error = {
        "exc_type": "JobCancelledError",
        "exc_message": f"job {task_id} was cancelled",
        "exc_module": "celery_serve.exceptions",
    }
    return _record(task_id, REVOKED, error, http_status=409)


def decode(raw: bytes | str) -> dict[str, Any]:
    return strictjson.loads(raw)


def unwrap(record: dict[str, Any], deployment: str = "") -> Any:
    """Return a record's value, or raise the error it carries as a `ServeError`."""
    if record["status"] == SUCCESS:
        return record["result"]
    raise error_from(record, deployment)


def error_from(record: dict[str, Any], deployment: str = "") -> ServeError:
    return error_from_dict(record.get("result") or {}, deployment)
