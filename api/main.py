"""Run the gateway under uvicorn (`celery-serve gateway`)."""

from __future__ import annotations

import uvicorn

from celery_serve._runtime.settings import ServeSettings
from celery_serve.api.gateway import create_gateway


def serve(settings: ServeSettings) -> None:
    gateway = create_gateway(settings)
    config = uvicorn.Config(
        gateway,
        host=settings.host,
        port=settings.port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="on",
        access_log=False,  # the gateway writes its own access line (request id, deployment, latency)
        log_config=None,  # keep the process's logging (celery_serve._runtime.logs), one format everywhere
        log_level=settings.log_level.lower(),
        timeout_keep_alive=30,  # load balancers and benchmark clients keep connections open
        timeout_graceful_shutdown=5,  # on SIGTERM, give in-flight requests 5 s (their jobs stay in Redis)
        backlog=4096,  # thousands of clients may connect at once
    )
    uvicorn.Server(config).run()
