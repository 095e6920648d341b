"""Run the gateway under uvicorn (`celery-serve gateway`)."""

from __future__ import annotations

import uvicorn

from celery_serve._runtime.settings import ServeSettings
from celery_serve.api import middlewares
from celery_serve.api.gateway import create_gateway
from celery_serve.api.limits import ConnectionLimits, guarded_protocol


def serve(settings: ServeSettings) -> None:
    gateway = create_gateway(settings)
    app = middlewares.wrap(gateway, middlewares.load(settings.http_middlewares, settings.cors_allow_origins))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="auto",  # uvloop when installed
        # httptools with a header deadline, header size and count limits and connection caps (408/431/503)
        http=guarded_protocol(
            ConnectionLimits(
                header_timeout_s=settings.header_timeout_s,
                max_header_bytes=settings.max_header_bytes,
                max_headers=settings.max_headers,
                max_connections=settings.max_connections,
                max_connections_per_client=settings.max_connections_per_client,
            )
        ),
        lifespan="on",
        access_log=False,  # the gateway writes its own access line (request id, deployment, latency)
        log_config=None,  # keep the process's logging (celery_serve._runtime.logs), one format everywhere
        log_level=settings.log_level.lower(),
        timeout_keep_alive=30,  # load balancers and benchmark clients keep connections open
        timeout_graceful_shutdown=5,  # on SIGTERM, give in-flight requests 5 s (their jobs stay in Redis)
        backlog=4096,  # thousands of clients may connect at once
    )
    uvicorn.Server(config).run()
