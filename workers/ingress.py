"""A FastAPI app as a deployment's ingress: its class-method routes bound to the replica's instance.

Routes are declared on methods (`@app.get("/") def get(self): ...`), so FastAPI cannot call them until it
knows `self`. In the replica we give each such route's `self` parameter a dependency that returns the
replica's instance, then let FastAPI analyse the routes again; from then on the app is plain FastAPI:
path and query parameters, validation (422), status codes and response models behave as they always do.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute

from celery_serve.exceptions import DeploymentConfigError


def bind_ingress(fastapi_app: FastAPI, cls: type, instance: Any) -> FastAPI:
    """Rewire `fastapi_app`'s routes that are methods of `cls` to call them on `instance`."""

    def current_instance() -> Any:
        return instance

    owned = [
        route
        for route in fastapi_app.routes
        if isinstance(route, APIRoute) and route.endpoint.__qualname__.startswith(cls.__qualname__ + ".")
    ]
    router = APIRouter()
    for route in owned:
        fastapi_app.router.routes.remove(route)
        signature = inspect.signature(route.endpoint)
        params = list(signature.parameters.values())
        if not params or params[0].name != "self":
            raise DeploymentConfigError(
                f"route {route.path} ({route.endpoint.__qualname__}) must take `self` as its first parameter"
            )
        new_params = [params[0].replace(default=Depends(current_instance))] + [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            else p
            for p in params[1:]
        ]
        route.endpoint.__signature__ = signature.replace(parameters=new_params)  # type: ignore[attr-defined]
        router.routes.append(route)
    fastapi_app.include_router(router)
    return fastapi_app
