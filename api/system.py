"""/health, /ready and /openapi.json (built from the route table actually served)."""

from __future__ import annotations

import copy
import hmac
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode
from sqlalchemy import text

from api.context import CONFIG, DB
from api.envelope import json_reply, success
from api.errors import Unauthorized
from api.routing import Route
from api.schemas import Failure, ReadyStatus, Status
from api.validation import NO_NUL
from core import metrics as plunkd_metrics
from storage import emails as email_store
from storage import holds
from storage import reputation as reputation_store
from storage.models import utcnow

OPENAPI = web.AppKey("openapi", dict)
REF = "#/components/schemas/{model}"
STATUS_NAMES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 409: "CONFLICT",
                413: "PAYLOAD_TOO_LARGE", 422: "VALIDATION_ERROR", 429: "RATE_LIMIT_EXCEEDED",
                503: "SERVICE_UNAVAILABLE"}


async def health(request: web.Request) -> web.Response:
    return success({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    async with request.app[DB].engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return success({"status": "ready", "database": "ok"})


async def openapi(request: web.Request) -> web.Response:
    return json_reply(request.app[OPENAPI])


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: this server's processes' samples, the outbox as the database sees it now (depth per
    priority, how long the longest-waiting due email has waited, held emails by reason) and each project's
    bounce and complaint rates over the last 7 days."""
    token = request.app[CONFIG].api.metrics_token
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("GET /metrics needs the metrics token",
                               "Send Authorization: Bearer <api.metrics_token>.")
    now = utcnow()
    summary = await request.app[DB].read(email_store.outbox_summary, now)
    for priority, name in plunkd_metrics.PRIORITY_NAMES.items():
        plunkd_metrics.OUTBOX_DEPTH.labels(name).set(summary.depth.get(priority, 0))
    oldest = (now - summary.oldest_due).total_seconds() if summary.oldest_due is not None else 0.0
    plunkd_metrics.OUTBOX_OLDEST_DUE.set(max(0.0, oldest))
    held, rates = await request.app[DB].read(_held_and_rates)
    for reason, count in held.items():
        plunkd_metrics.OUTBOX_HELD.labels(reason).set(count)
    for gauge in (plunkd_metrics.PROJECT_BOUNCE_RATE, plunkd_metrics.PROJECT_COMPLAINT_RATE):
        gauge.clear()
    for project_id, window in rates.items():
        plunkd_metrics.PROJECT_BOUNCE_RATE.labels(project_id).set(window.bounce_rate)
        plunkd_metrics.PROJECT_COMPLAINT_RATE.labels(project_id).set(window.complaint_rate)
    body, content_type = plunkd_metrics.exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response


def _held_and_rates(session) -> tuple[dict[str, int], dict[str, reputation_store.Window]]:
    """Held emails by reason (the partial index of parked rows) and each project's 7-day window (the
    reputation counters of those days)."""
    today = reputation_store.day_of(utcnow())
    return ({hold: holds.held_count(session, hold) for hold in (holds.HOLD_DKIM, holds.HOLD_PAUSED)},
            reputation_store.windows(session, today - reputation_store.WINDOW_DAYS, today))


class _Spec:
    """Collects component schemas while operations are built."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def schema_of(self, kind: Any, mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        schema = TypeAdapter(kind).json_schema(ref_template=REF, mode=mode)
        self.schemas.update(schema.pop("$defs", {}))
        return schema

    def model_ref(self, model: type[BaseModel], mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        name = model.__name__
        if name not in self.schemas:
            self.schemas[name] = self.schema_of(model, mode)
        return {"$ref": REF.format(model=name)}


def _reply_schema(spec: _Spec, route: Route, legacy: bool) -> dict[str, Any]:
    if isinstance(route.response, type) and issubclass(route.response, BaseModel):
        data = spec.model_ref(route.response)
    else:
        data = spec.schema_of(route.response) if route.response is not None else {}
    if route.raw:
        return data
    if not legacy:
        return {"type": "object", "required": ["success", "data"], "additionalProperties": False,
                "properties": {"success": {"const": True}, "data": data}}
    if route.legacy == "items":
        return spec.schema_of(route.response.model_fields["items"].annotation)
    if "$ref" in data:
        data = spec.schemas[data["$ref"].rsplit("/", 1)[1]]
    if route.legacy == "bare" or data.get("type") != "object":
        return data
    return {**data, "required": ["success", *data.get("required", [])],
            "properties": {"success": {"const": True}, **data.get("properties", {})}}


def _error_statuses(route: Route) -> set[int]:
    statuses = set(route.errors)
    if route.auth:
        statuses |= {401, 422, 429}
    if route.auth == "secret":
        statuses.add(403)
    if route.body is not None:
        statuses |= {400, 413, 422}
    if route.query:
        statuses |= {400, 422}
    if _path_params(route.path):
        statuses |= {400, 404}
    return statuses


def _operation(spec: _Spec, route: Route, legacy: bool, status: int) -> dict[str, Any]:
    failure = {"content": {"application/json": {"schema": spec.model_ref(Failure)}}}
    responses: dict[str, Any] = {str(status): {
        "description": "Success" if not legacy else "Success, in the flat seed-002 shape",
        "content": {route.media_type: {"schema": _reply_schema(spec, route, legacy)}}}}
    for status in sorted(_error_statuses(route)):
        responses[str(status)] = {"description": STATUS_NAMES[status], **failure}
    operation: dict[str, Any] = {"summary": route.summary, "tags": [route.tag] if route.tag else [],
                                 "responses": responses}
    if route.auth:
        operation["security"] = [{"bearerAuth": []}]
        operation["x-key-kinds"] = ["sk_", "pk_"] if route.auth == "public" else ["sk_"]
    if route.body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": spec.model_ref(route.body, mode="validation")}}}
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1, "pattern": NO_NUL}}
                  for name in _path_params(route.path)]
    parameters += [{"name": name, "in": "query", "schema": schema} for name, schema in route.query.items()]
    if parameters:
        operation["parameters"] = parameters
    return operation


def _without_nul(schema: Any, inside_data: bool = False) -> Any:
    """Every request string without a pattern, format or enum of its own gets NO_NUL (what the door
    enforces), except inside `data` objects, whose values the JSON column stores escaped."""
    if isinstance(schema, list):
        return [_without_nul(item, inside_data) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _without_nul(value, inside_data or key == "data") for key, value in schema.items()}
    if (not inside_data and out.get("type") == "string"
            and not {"pattern", "format", "enum", "const"} & out.keys()):
        out["pattern"] = NO_NUL
    return out


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    """An OpenAPI 3.1 document with one operation per (path, method) the router serves, each with
    every status it can answer and the schema of each reply."""
    spec = _Spec()
    paths: dict[str, dict[str, Any]] = {}
    for route in (r for r in routes if not r.page):
        for legacy, route_paths in ((False, route.paths()), (True, route.legacy_paths())):
            for path in route_paths:
                operation = _operation(spec, route, legacy, route.status_at(path))
                methods = paths.setdefault(path, {})
                methods[route.method.lower()] = operation
                if route.head:
                    head = copy.deepcopy(operation)
                    head["responses"] = {str(code): {"description": r["description"]}
                                         for code, r in operation["responses"].items()}
                    methods["head"] = head
                if route.cors:
                    methods["options"] = {"summary": "CORS preflight", "tags": operation["tags"],
                                          "responses": {"204": {"description": "CORS headers, no body"}}}
    for name in [n for n in spec.schemas if n.endswith("Body")]:
        spec.schemas[name] = _without_nul(spec.schemas[name])
    return {
        "openapi": "3.1.0",
        "info": {"title": "plunkd", "version": "0.1.0",
                 "description": "Self-hosted, Plunk-compatible email platform API. /v1 and unversioned paths "
                                "answer in the {success, data} envelope; /api/v1 in the flat shapes of "
                                "Plunk's older self-hosted docs."},
        "paths": paths,
        "components": {"schemas": spec.schemas,
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


ROUTES = [
    Route("GET", "/health", health, "Liveness", auth=None, scope="root", tag="System", response=Status, head=True),
    Route("GET", "/ready", ready, "Database reachable", auth=None, scope="root", tag="System",
          response=ReadyStatus, head=True),
    Route("GET", "/openapi.json", openapi, "This document", auth=None, scope="root", tag="System",
          response=dict[str, Any], raw=True),
    Route("GET", "/metrics", metrics, "Prometheus metrics (a bearer token when api.metrics_token is set)",
          auth=None, scope="root", tag="System", response=str, raw=True, media_type="text/plain",
          errors=frozenset({401}), head=True),
]
