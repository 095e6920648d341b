"""Async jobs over HTTP: submit and get `202` at once, poll or long-poll, cancel.

    POST   /jobs/<deployment>[/<method>]   a call with arguments, as through a handle; JSON body:
                                           {"args": [...], "kwargs": {...}}, or any JSON value as the one argument
    POST   /jobs/-/<route path>            the same HTTP request a synchronous call to /<route path> takes
                                           (X-HTTP-Method-Override picks GET/PUT/...; default POST)
    GET    /jobs/{id}[?wait=N]             status, and the result or error once it ended
    DELETE /jobs/{id}                      cancel: unstarted work never runs; running async work is stopped

The two submit forms cannot be confused: `-` is never a deployment name, and a name that is not a
deployment (or a pipeline application) answers 404 with the deployments there are, never a guess.
`Idempotency-Key` makes a repeated submit return the first job instead of running it again.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from celery_serve._runtime.spec import AppSpec, DeploymentSpec
from celery_serve._wire import stopped_apps as _stopped_apps
from celery_serve._wire import strictjson
from celery_serve._wire.connections import REDIS_FAULTS
from celery_serve._wire.jobs import TERMINAL, JobStore
from celery_serve._wire.transport import QueueTransport
from celery_serve.api.proxy import accepted_payload, claim_request_id, http_envelope, read_body
from celery_serve.api.routes import RouteTable
from celery_serve.exceptions import (
    ApplicationStoppedError,
    BackpressureError,
    BadRequestError,
    DeploymentNotFoundError,
    ServeError,
)

MAX_WAIT_S = 300.0
ROUTE_JOBS = "-"  # POST /jobs/-/<path>: a job for an HTTP route (deployment names never start with "-")
_METHOD_OVERRIDE = "x-http-method-override"


def _error(exc: ServeError) -> JSONResponse:
    headers = None
    if isinstance(exc, BackpressureError):
        headers = {"Retry-After": "1"}
    elif isinstance(exc, ApplicationStoppedError):
        headers = {"Retry-After": str(_stopped_apps.RETRY_AFTER_S)}
    return JSONResponse(
        {"error": type(exc).__name__, "message": exc.message}, status_code=exc.http_status, headers=headers
    )


def jobs_router(
    transport: QueueTransport, routes: RouteTable, jobs: JobStore, max_body_bytes: int, body_timeout_s: float = 30.0
) -> APIRouter:
    router = APIRouter(prefix="/jobs", tags=["jobs"])

    def find_deployment(name: str, app: str | None) -> DeploymentSpec | AppSpec | None:
        matches: list[DeploymentSpec | AppSpec] = [
            spec.deployments[name] for spec in routes.apps if name in spec.deployments and app in (None, spec.name)
        ]
        matches += [spec for spec in routes.apps if spec.is_pipeline and name == spec.name and app in (None, spec.name)]
        if len(matches) > 1:
            apps = ", ".join(d.app if isinstance(d, DeploymentSpec) else d.name for d in matches)
            raise BadRequestError(f"deployment '{name}' exists in several applications ({apps}); add ?app=NAME")
        return matches[0] if matches else None

    @router.post("/{target:path}", status_code=202, summary="Submit a job; answers 202 with its id at once")
    async def submit(
        target: str, request: Request, app: str | None = Query(None, description="application, when names clash")
    ) -> Any:
        try:
            body = await read_body(
                request.receive,
                request.headers.get("content-length", "").encode() or None,
                max_body_bytes,
                body_timeout_s,
            )
            name, _, rest = target.strip("/").partition("/")
            key = request.headers.get("idempotency-key")
            task_id = await claim_request_id(transport.redis, request.headers.get("x-request-id"))
            if name != ROUTE_JOBS:  # a deployment by name: a call with arguments, as through a handle
                dep = find_deployment(name, app)
                if dep is None and await routes.refresh_on_miss():  # deployed a moment ago?
                    dep = find_deployment(name, app)
                if dep is None:
                    stopped = _stopped_apps.for_deployment(routes.stopped, name, app)
                    if stopped is not None:  # its run is stopping or restarting: retry, not "no such thing"
                        return _error(stopped.error())
                    return _unknown_deployment(name, app)
                args, kwargs = _call_arguments(body)
                sub = await transport.submit(
                    dep,
                    rest or "__call__",
                    args,
                    kwargs,
                    job=True,
                    idempotency_key=key,
                    expect_reply=False,
                    stream="allow",  # a generator method streams: GET /jobs/{id}/stream follows it
                    task_id=task_id,
                )
            else:  # /jobs/-/<path>: the same HTTP request a synchronous call to /<path> takes
                path = "/" + rest.strip("/")
                found = await routes.match_fresh(path, pick=True)
                if found is None:
                    stopped = routes.stopped_for(path)
                    if stopped is not None:
                        raise stopped.error()
                    raise DeploymentNotFoundError(f"no application serves {path}; see /-/routes")
                _, dep = found
                verb = request.headers.get(_METHOD_OVERRIDE, "POST").upper()
                http = http_envelope(request.scope, body, path=path, method=verb)
                method = request.headers.get("x-serve-call-method", "__call__")
                sub = await transport.submit(
                    dep, method, http=http, job=True, idempotency_key=key, expect_reply=False, task_id=task_id
                )
        except ServeError as exc:
            return _error(exc)
        except REDIS_FAULTS as exc:
            return _unavailable(exc)
        payload, headers = accepted_payload(sub.request_id)
        response_headers = {k.decode(): v.decode() for k, v in headers}
        if sub.existing:
            response_headers["Idempotent-Replayed"] = "true"
            payload["status"] = (await jobs.get(sub.task_id))["status"]
        return JSONResponse(payload, status_code=202, headers=response_headers)

    def _unknown_deployment(name: str, app: str | None) -> JSONResponse:
        known = sorted(
            {f"{spec.name}:{d}" for spec in routes.apps for d in spec.deployments if app in (None, spec.name)}
            | {f"{spec.name}:{spec.name}" for spec in routes.apps if spec.is_pipeline and app in (None, spec.name)}
        )
        where = f" in application '{app}'" if app else ""
        message = (
            f"no deployment named '{name}'{where}; POST /jobs/<deployment>[/<method>] calls a deployment (see "
            f"'deployments', as application:deployment), POST /jobs/-/<path> sends an HTTP request to a route"
        )
        return JSONResponse(
            {"error": "DeploymentNotFoundError", "message": message, "deployments": known}, status_code=404
        )

    @router.get("/{job_id}", summary="A job's status, and its result or error once it ended")
    async def get(
        job_id: str, wait: float = Query(0, ge=0, le=MAX_WAIT_S, description="long-poll up to this many seconds")
    ) -> Any:
        try:
            return await (jobs.wait(job_id, wait) if wait > 0 else jobs.get(job_id))
        except ServeError as exc:
            return _error(exc)
        except REDIS_FAULTS as exc:
            return _unavailable(exc)

    @router.delete("/{job_id}", summary="Cancel a job")
    async def cancel(job_id: str) -> Any:
        try:
            job = await jobs.cancel(job_id)
        except ServeError as exc:
            return _error(exc)
        except REDIS_FAULTS as exc:
            return _unavailable(exc)
        if job["was"] in TERMINAL and job["was"] != "cancelled":
            raise HTTPException(409, f"job {job_id} already {job['was']}; nothing to cancel")
        return job

    return router


def _unavailable(exc: BaseException) -> JSONResponse:
    message = f"the queue service (Redis) is unavailable: {exc!r}; retry shortly"
    return JSONResponse(
        {"error": "ServiceUnavailableError", "message": message}, status_code=503, headers={"Retry-After": "1"}
    )


def _call_arguments(body: bytes) -> tuple[list[Any], dict[str, Any]]:
    """A job body for a deployment: {"args": [...], "kwargs": {...}}, or any JSON value as the one argument."""
    if not body.strip():
        return [], {}
    try:
        data = strictjson.loads(body)
    except strictjson.NotJSONError as exc:
        raise BadRequestError(f"job body is not valid JSON: {exc}") from None
    if isinstance(data, dict) and set(data) <= {"args", "kwargs"} and data:
        args, kwargs = data.get("args", []), data.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise BadRequestError('"args" must be a JSON list and "kwargs" a JSON object')
        return args, kwargs
    return [data], {}
