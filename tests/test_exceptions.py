"""Every exception crosses a process boundary intact: as a JSON dict and through pickle."""

from __future__ import annotations

import json
import pickle

import pytest

from celery_serve import (
    ApplicationConflictError,
    BackpressureError,
    BadRequestError,
    DeploymentConfigError,
    DeploymentNotFoundError,
    JobCancelledError,
    PayloadTooLargeError,
    RemoteError,
    RequestTimeoutError,
    ServeError,
    ServeStartupError,
)
from celery_serve.exceptions import error_from_dict

SERVE_ERRORS = [
    ServeError,
    DeploymentConfigError,
    DeploymentNotFoundError,
    BadRequestError,
    PayloadTooLargeError,
    BackpressureError,
    RequestTimeoutError,
    JobCancelledError,
    ApplicationConflictError,
    ServeStartupError,
]


@pytest.mark.parametrize("cls", SERVE_ERRORS)
def test_serve_errors_round_trip_through_json_dicts(cls: type[ServeError]) -> None:
    error = cls("something specific")
    data = json.loads(json.dumps(error.to_dict()))
    back = error_from_dict(data)
    assert type(back) is cls
    assert back.message == "something specific" and str(back) == "something specific"
    assert back.http_status == error.http_status


@pytest.mark.parametrize("cls", SERVE_ERRORS)
def test_serve_errors_round_trip_through_pickle(cls: type[ServeError]) -> None:
    back = pickle.loads(pickle.dumps(cls("pickled")))
    assert type(back) is cls and back.message == "pickled"


def test_remote_error_round_trips_with_its_remote_type_and_message() -> None:
    error = RemoteError("KeyError", "'missing'", deployment="Model")
    for back in (error_from_dict(json.loads(json.dumps(error.to_dict()))), pickle.loads(pickle.dumps(error))):
        assert isinstance(back, RemoteError)
        assert (back.remote_type, back.remote_message, back.deployment) == ("KeyError", "'missing'", "Model")
        assert str(back) == "KeyError in deployment 'Model': 'missing'"


def test_a_user_exception_record_becomes_a_remote_error() -> None:
    back = error_from_dict(
        {"exc_type": "ZeroDivisionError", "exc_message": ["division by zero"], "exc_module": "builtins"},
        "Calc",
    )
    assert isinstance(back, RemoteError)
    assert (back.remote_type, back.remote_message, back.deployment) == (
        "ZeroDivisionError",
        "division by zero",
        "Calc",
    )


def test_a_user_exception_named_like_ours_is_not_mistaken_for_ours() -> None:
    back = error_from_dict({"exc_type": "BadRequestError", "exc_message": "theirs", "exc_module": "user.module"})
    assert isinstance(back, RemoteError) and back.remote_type == "BadRequestError"


def test_http_statuses_and_builtin_bases() -> None:
    assert [cls.http_status for cls in (DeploymentNotFoundError, BadRequestError, PayloadTooLargeError)] == [
        404,
        400,
        413,
    ]
    assert (BackpressureError.http_status, RequestTimeoutError.http_status, RemoteError.http_status) == (
        503,
        504,
        500,
    )
    assert issubclass(DeploymentConfigError, ValueError) and issubclass(BadRequestError, ValueError)
    assert issubclass(RequestTimeoutError, TimeoutError)
    assert all(issubclass(cls, ServeError) for cls in [*SERVE_ERRORS, RemoteError])
