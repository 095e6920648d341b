"""The HTTP gateway: FastAPI for its own endpoints, the proxy for everything the applications serve.

/-/healthz, /-/routes, /docs, /openapi.json   -> the FastAPI control app below
/metrics (also /-/metrics)                     -> Prometheus metrics (celery_serve.api.metrics)
/jobs/...                                      -> celery_serve.api.jobs (submit, poll, cancel)
anything else                                  -> celery_serve.api.proxy.Proxy (route prefix -> deployment queue)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.exceptions
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from celery_serve._wire.jobs import JobStore
from celery_serve._wire.transport import QueueTransport, target_name
from celery_serve.api.jobs import jobs_router
from celery_serve.api.metrics import CONTENT_TYPE, GatewayMetrics
from celery_serve.api.proxy import Proxy
from celery_serve.api.routes import RouteTable
from celery_serve.config import ServeSettings

logger = logging.getLogger(__name__)

_CONTROL_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/metrics")


class Gateway:
    """The ASGI app uvicorn serves."""

    def __init__(self, settings: ServeSettings) -> None:
        if not settings.redis_url:
            raise ValueError("the gateway needs REDIS_URL (or --redis-url)")
        self.settings = settings
        self.transport = QueueTransport(settings.redis_url)
        self.routes = RouteTable(self.transport.redis)
        self.proxy = Proxy(self.transport, self.routes, settings.max_body_bytes)
        self.jobs = JobStore(self.transport.redis)
        self.metrics = GatewayMetrics()
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
            await self.jobs.close()
            await self.transport.close()

    def _control_app(self) -> FastAPI:
        control = FastAPI(
            title="celery-serve gateway",
            description="Deployments are served under their application's route prefix; see /-/routes.",
            lifespan=self.lifespan,
        )

        @control.get("/-/healthz", summary="Is the gateway up and can it reach Redis?")
        async def healthz() -> Any:
            try:
                await self.transport.redis.ping()
            except (redis.exceptions.RedisError, OSError) as exc:
                return JSONResponse({"status": "unhealthy", "redis": str(exc)}, status_code=503)
            return {"status": "ok", "applications": len(self.routes.apps), "pending": self.transport.waiter.pending}

        @control.get("/-/routes", summary="Route prefix -> ingress deployment")
        async def routes() -> dict[str, str]:
            await self.routes.refresh()
            return self.routes.routes

        @control.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
        @control.get("/-/metrics", summary="Prometheus metrics")
        async def metrics() -> Response:
            return Response(await self.metrics.render(self.transport.redis), media_type=CONTENT_TYPE)

        control.include_router(jobs_router(self.transport, self.routes, self.jobs, self.settings.max_body_bytes))
        return control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.control(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith(("/-/", "/jobs/")) or path in _CONTROL_PATHS:
            await self.control(scope, receive, send)
        elif scope["type"] == "http":
            await self._proxy_counted(scope, receive, send)
        else:
            await self.proxy(scope, receive, send)

    async def _proxy_counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The proxy, with the request counted by deployment and status for /metrics."""
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.proxy(scope, receive, send_and_note)
        finally:
            found = self.routes.match(scope["path"])
            app, deployment = (found[0].name, target_name(found[1])) if found else ("", "")
            self.metrics.observe(app, deployment, status, time.perf_counter() - started)


def create_gateway(settings: ServeSettings | None = None) -> Gateway:
    return Gateway(settings or ServeSettings())
