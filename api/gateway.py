"""The HTTP gateway: FastAPI for its own endpoints, the proxy for everything the applications serve.

/-/healthz, /-/routes, /docs, /openapi.json   -> the FastAPI control app below
/metrics (also /-/metrics)                     -> Prometheus metrics (celery_serve.api.metrics)
/jobs/...                                      -> celery_serve.api.jobs (submit, poll, cancel)
anything else                                  -> celery_serve.api.proxy.Proxy (route prefix -> deployment queue)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from celery_serve import __version__
from celery_serve._runtime.logs import ACCESS_LOGGER
from celery_serve._runtime.settings import ServeSettings
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import REDIS_FAULTS
from celery_serve._wire.jobs import JobStore
from celery_serve._wire.transport import QueueTransport, target_name
from celery_serve.api.jobs import jobs_router
from celery_serve.api.metrics import CONTENT_TYPE, GatewayMetrics
from celery_serve.api.openapi import merge_openapi
from celery_serve.api.proxy import ROUTED_SCOPE_KEY, Proxy
from celery_serve.api.routes import RouteTable
from celery_serve.api.streaming import StreamRelay, stream_router

logger = logging.getLogger(__name__)

_CONTROL_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/metrics")


class Gateway:
    """The ASGI app uvicorn serves."""

    def __init__(self, settings: ServeSettings) -> None:
        if not settings.redis_url:
            raise ValueError("the gateway needs REDIS_URL (or --redis-url)")
        self.settings = settings
        self.transport = QueueTransport(settings.redis_url)
        self.routes = RouteTable(self.transport.redis, on_data_loss=self.transport.lost_requests)
        self.proxy = Proxy(self.transport, self.routes, settings.max_body_bytes, settings.body_timeout_s)
        self.jobs = JobStore(self.transport.redis)
        self.streams = StreamRelay(self.transport, self.jobs)
        self.proxy.streams = self.streams
        self.metrics = GatewayMetrics()
        self.metrics.registry.register(self.streams.stats)
        self._own_openapi: dict[str, Any] | None = None
        self.control = self._control_app()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        await self.transport.start()
        try:
            await self.routes.refresh()
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("Redis not reachable at start-up (%s); will keep trying", exc)
        refresher = asyncio.create_task(self.routes.run(), name="route-refresher")
        try:
            yield
        finally:
            refresher.cancel()
            await self.streams.close()
            await self.jobs.close()
            await self.transport.close()

    def _control_app(self) -> FastAPI:
        control = FastAPI(
            title="celery-serve gateway",
            description="Deployments are served under their application's route prefix; see /-/routes.",
            version=__version__,
            lifespan=self.lifespan,
            openapi_url=None,  # served below: the gateway's own schema plus every application's routes
            docs_url=None,
            redoc_url=None,
        )

        @control.get("/openapi.json", include_in_schema=False)
        async def openapi_json() -> JSONResponse:
            return JSONResponse(await self._openapi(control))

        @control.get("/docs", include_in_schema=False)
        async def docs() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="celery-serve - Swagger UI")

        @control.get("/docs/oauth2-redirect", include_in_schema=False)
        async def oauth2_redirect() -> Response:
            return get_swagger_ui_oauth2_redirect_html()

        @control.get("/redoc", include_in_schema=False)
        async def redoc() -> Response:
            return get_redoc_html(openapi_url="/openapi.json", title="celery-serve - ReDoc")

        @control.get("/-/healthz", summary="Is the gateway up and can it reach Redis?")
        async def healthz() -> Any:
            try:
                await self.transport.redis.ping()
            except REDIS_FAULTS as exc:
                return JSONResponse({"status": "unhealthy", "redis": repr(exc)}, status_code=503)
            return {"status": "ok", "applications": len(self.routes.apps), "pending": self.transport.waiter.pending}

        @control.get("/-/routes", summary="Route prefix -> ingress deployment")
        async def routes() -> dict[str, str]:
            await self.routes.refresh()
            return self.routes.routes

        @control.get("/-/traffic", summary="Route prefix -> {application: share of its requests}")
        async def traffic() -> dict[str, dict[str, float]]:
            await self.routes.refresh()
            return self.routes.traffic

        @control.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
        @control.get("/-/metrics", summary="Prometheus metrics")
        async def metrics() -> Response:
            return Response(await self.metrics.render(self.transport.redis), media_type=CONTENT_TYPE)

        control.include_router(stream_router(self.streams))
        control.include_router(
            jobs_router(
                self.transport, self.routes, self.jobs, self.settings.max_body_bytes, self.settings.body_timeout_s
            )
        )
        return control

    async def _openapi(self, control: FastAPI) -> dict[str, Any]:
        """The gateway's endpoints and, under each route prefix, the routes of every application."""
        if self._own_openapi is None:
            self._own_openapi = get_openapi(
                title=control.title, version=control.version, description=control.description, routes=control.routes
            )
        try:
            await self.routes.refresh()
            raw = await self.transport.redis.hgetall(_keys.OPENAPI)
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning("could not read the applications' OpenAPI schemas: %s", exc)
            return self._own_openapi
        schemas = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
        return merge_openapi(self._own_openapi, [(spec, schemas.get(spec.name)) for spec in self.routes.apps])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.control(scope, receive, send)
            return
        path = scope.get("path", "")
        control = path.startswith(("/-/", "/jobs/")) or path in _CONTROL_PATHS
        if scope["type"] != "http":
            await (self.control if control else self.proxy)(scope, receive, send)
            return
        await self._http(scope, receive, send, control)

    async def _http(self, scope: Scope, receive: Receive, send: Send, control: bool) -> None:
        """One HTTP request: served, counted for /metrics (application requests), and access-logged."""
        started = time.perf_counter()
        status = 500
        request_id = ""

        async def send_and_note(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers") or ():
                    if name == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        try:
            await (self.control if control else self.proxy)(scope, receive, send_and_note)
        finally:
            elapsed = time.perf_counter() - started
            deployment = ""
            if not control:
                found = scope.get(ROUTED_SCOPE_KEY) or self.routes.match(scope["path"])
                app, deployment = (found[0].name, target_name(found[1])) if found else ("", "")
                self.metrics.observe(app, deployment, status, elapsed)
            if _access.isEnabledFor(logging.INFO):
                _log_access(scope, request_id, deployment, status, elapsed)


_access = logging.getLogger(ACCESS_LOGGER)


def _log_access(scope: Scope, request_id: str, deployment: str, status: int, elapsed_s: float) -> None:
    method, path = scope["method"], scope["path"]
    latency_ms = round(elapsed_s * 1000, 2)
    _access.info(
        "%s %s %s %s %d %.2fms",
        request_id or "-",
        method,
        path,
        deployment or "-",
        status,
        latency_ms,
        extra={
            "request_id": request_id or None,
            "method": method,
            "path": path,
            "deployment": deployment or None,
            "status": status,
            "latency_ms": latency_ms,
        },
    )


def create_gateway(settings: ServeSettings | None = None) -> Gateway:
    return Gateway(settings or ServeSettings())
