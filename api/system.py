"""/health, /ready and /openapi.json (built from the route table actually served)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import text

from api.context import DB
from api.envelope import success
from api.routing import Route

OPENAPI = web.AppKey("openapi", dict)


async def health(request: web.Request) -> web.Response:
    return success({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    async with request.app[DB].engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return success({"status": "ready", "database": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    """An OpenAPI 3.1 document with one operation per (path, method) the router serves."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {"summary": route.summary, "tags": [route.tag] if route.tag else [],
                                     "responses": {"200": {"description": "Success envelope"}}}
        if route.auth:
            operation["security"] = [{"bearerAuth": []}]
            operation["x-key-kinds"] = ["sk_", "pk_"] if route.auth == "public" else ["sk_"]
            operation["responses"].update({"401": {"description": "UNAUTHORIZED"},
                                           "429": {"description": "RATE_LIMIT_EXCEEDED"}})
        if route.body is not None:
            schema = route.body.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[route.body.__name__] = schema
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}}}
            operation["responses"].update({"400": {"description": "BAD_REQUEST"},
                                           "413": {"description": "PAYLOAD_TOO_LARGE"},
                                           "422": {"description": "VALIDATION_ERROR"}})
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in _path_params(route.path)]
        parameters += [{"name": name, "in": "query", "schema": {"type": kind}} for name, kind in route.query.items()]
        if parameters:
            operation["parameters"] = parameters
        for path in route.paths():
            paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "plunkd", "version": "0.1.0",
                 "description": "Self-hosted, Plunk-compatible email platform API"},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


ROUTES = [
    Route("GET", "/health", health, "Liveness", auth=None, scope="root", tag="System"),
    Route("GET", "/ready", ready, "Database reachable", auth=None, scope="root", tag="System"),
    Route("GET", "/openapi.json", openapi, "This document", auth=None, scope="root", tag="System"),
]
