"""Run the gateway under uvicorn: `celery-serve gateway` or `python -m celery_serve.api.main`."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from celery_serve.api.gateway import create_gateway
from celery_serve.config import ServeSettings


def serve(settings: ServeSettings) -> None:
    gateway = create_gateway(settings)
    config = uvicorn.Config(
        gateway,
        host=settings.host,
        port=settings.port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="on",
        access_log=False,  # one line per request is too much at thousands of requests per second
        log_level=settings.log_level.lower(),
        timeout_keep_alive=30,  # load balancers and benchmark clients keep connections open
        timeout_graceful_shutdown=5,  # on SIGTERM, give in-flight requests 5 s (their jobs stay in Redis)
        backlog=4096,  # thousands of clients may connect at once
    )
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="celery-serve gateway")
    parser.add_argument("--host", default=os.environ.get("SERVE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SERVE_PORT", "8000")))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--log-level", default=os.environ.get("SERVE_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s [gateway] %(name)s: %(message)s"
    )
    settings = ServeSettings(host=args.host, port=args.port, log_level=args.log_level)
    if args.redis_url:
        settings.redis_url = args.redis_url
    serve(settings)


if __name__ == "__main__":
    main()
