"""The gateway's OpenAPI document: its own endpoints plus every application's routes under its prefix.

The gateway never imports user code, so each FastAPI ingress's schema is written to Redis by its replicas
when they start (`celery_serve.workers.replica_main`); `/openapi.json` merges what is there. An
application without a FastAPI ingress appears as one operation on its route prefix. Component schemas
keep their names unless two applications define one name differently; then the later one is renamed
`<application>__<Name>` (and its references with it).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from celery_serve._runtime.spec import AppSpec

_REF = "#/components/schemas/"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def merge_openapi(base: dict[str, Any], apps: list[tuple[AppSpec, dict[str, Any] | None]]) -> dict[str, Any]:
    """`base` (the gateway's own schema) with every application's paths added under its route prefix."""
    merged = copy.deepcopy(base)
    paths: dict[str, Any] = merged.setdefault("paths", {})
    schemas: dict[str, Any] = merged.setdefault("components", {}).setdefault("schemas", {})
    for spec, schema in sorted(apps, key=lambda item: item[0].route_prefix):
        prefix = "" if spec.route_prefix == "/" else spec.route_prefix.rstrip("/")
        if not schema:
            paths.setdefault(prefix or "/", _plain_operation(spec))
            continue
        schema = _rename_clashing(spec.name, schema, schemas)
        for path, item in (schema.get("paths") or {}).items():
            for method in _METHODS:
                if method in item and not item[method].get("tags"):
                    item[method]["tags"] = [spec.name]
            paths[prefix + path if path != "/" or not prefix else prefix] = item
        schemas.update((schema.get("components") or {}).get("schemas") or {})
    if not schemas:
        merged["components"].pop("schemas", None)
        if not merged["components"]:
            merged.pop("components")
    return merged


def _plain_operation(spec: AppSpec) -> dict[str, Any]:
    target = spec.ingress if not spec.is_pipeline else f"the pipeline {spec.ingress}"
    return {
        "post": {
            "tags": [spec.name],
            "summary": f"Call {target}",
            "description": (
                f"Application '{spec.name}': any method and sub-path under {spec.route_prefix} reaches "
                f"{target} with the HTTP request (a Starlette Request in the replica)."
            ),
            "operationId": f"{spec.name}__call",
            "responses": {"200": {"description": "What the deployment returned"}},
        }
    }


def _rename_clashing(app: str, schema: dict[str, Any], taken: dict[str, Any]) -> dict[str, Any]:
    own = (schema.get("components") or {}).get("schemas") or {}
    renames = {name: f"{app}__{name}" for name, body in own.items() if name in taken and taken[name] != body}
    if not renames:
        return schema
    text = json.dumps(schema)
    for old, new in renames.items():
        text = text.replace(f'"{_REF}{old}"', f'"{_REF}{new}"')
    renamed: dict[str, Any] = json.loads(text)
    components = renamed["components"]["schemas"]
    for old, new in renames.items():
        components[new] = components.pop(old)
    return renamed
