"""The route table type and the wrapper that applies auth, CORS and the rate limit per route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from api.context import CONFIG, KEYS, RATE_LIMITER
from api.envelope import Reply
from api.errors import RateLimited, Unauthorized
from pipeline.errors import FieldError, Forbidden, ValidationFailed
from pipeline.keys import Caller

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CALLER = "plunkd.caller"
DIALECT = "plunkd.dialect"
"""Set on requests under /api/v1: the seed-002 shape of the route's reply (see `api.envelope.legacy`)."""
CORS_ORIGIN = "plunkd.cors_origin"
LEGACY_PREFIX = "/api/v1"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-Id"
CORS_EXPOSE_HEADERS = ("X-Request-Id, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, "
                       "X-RateLimit-Reset")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: str | None = "secret"
    """'secret' (sk_ only), 'public' (sk_ or pk_) or None (no key)."""
    scope: str = "dashboard"
    """'public' → /v1 and /api/v1; 'dashboard' → unversioned, /v1 and /api/v1; 'root' → as is."""
    body: type[BaseModel] | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Query parameter → its JSON schema (what the handler's parsing accepts, exactly)."""
    tag: str = ""
    status: int = 200
    """The success status (a create: 201), set on the handler's `Reply` here, so the table is its one source."""
    seed_status: int | None = None
    """The success status under /v1 and /api/v1 where seed 001 documents another one for this operation
    (its creates of a contact and of a campaign answer 200)."""
    response: Any = None
    """The type of the reply's `data` (a pydantic model, or e.g. `list[Model]`), for /openapi.json."""
    errors: frozenset[int] = frozenset()
    """Error statuses the handler itself raises beyond those its auth, body, query and path imply."""
    legacy: str = "flat"
    """The reply's shape under /api/v1: 'flat', 'items' or 'bare' (see `api.envelope.legacy`)."""
    cors: bool = False
    """Serve CORS (browsers calling with a public key). Only /v1/track does."""
    head: bool = False
    """Answer HEAD like GET (without a body)."""
    raw: bool = False
    """The handler answers its own document, outside the envelope (/openapi.json, /metrics)."""
    media_type: str = "application/json"
    """The success reply's content type in /openapi.json."""
    page: bool = False
    """A server-rendered HTML page for people (the signed contact links), not API: it answers every
    outcome, errors included, as HTML itself, and is left out of /openapi.json."""

    def paths(self) -> list[str]:
        if self.scope == "public":
            return [f"/v1{self.path}"]
        if self.scope == "dashboard":
            return [self.path, f"/v1{self.path}"]
        return [self.path]

    def legacy_paths(self) -> list[str]:
        return [] if self.scope == "root" else [f"{LEGACY_PREFIX}{self.path}"]

    def status_at(self, path: str) -> int:
        if self.seed_status is not None and path.startswith(("/v1/", f"{LEGACY_PREFIX}/")):
            return self.seed_status
        return self.status


def caller(request: web.Request) -> Caller:
    return request[CALLER]


def bearer_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def allowed_origin(request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin value for this request, or None (no CORS for it)."""
    origins = request.app[CONFIG].api.cors_origins
    if "*" in origins:
        return "*"
    origin = request.headers.get("Origin")
    return origin if origin in origins else None


def cors_headers(origin: str) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS}
    if origin != "*":
        headers["Vary"] = "Origin"
    return headers


def preflight(methods: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        origin = allowed_origin(request)
        if origin is None:
            return web.Response(status=204)
        return web.Response(status=204, headers={
            **cors_headers(origin), "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS, "Access-Control-Max-Age": "600"})

    return handler


def guarded(route: Route, status: int) -> Handler:
    """Wrap a handler with its CORS marker, its key check, the project's rate limit and its success status."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if route.cors:
            request[CORS_ORIGIN] = allowed_origin(request)
        if route.auth is not None:
            await authorize(request, route)
            refuse_unknown_query(request, route)
        response = await route.handler(request)
        if isinstance(response, Reply):
            response.set_status(status)
        return response

    return handler


def refuse_unknown_query(request: web.Request, route: Route) -> None:
    """A query parameter the route does not declare is a 422 naming it, not silently ignored (a misspelt
    filter would answer unfiltered data). Only for the API (routes that take a key): pages, tracking links,
    SNS and probes are called with URLs that others may append to."""
    unknown = [name for name in dict.fromkeys(request.query.keys()) if name not in route.query]
    if unknown:
        takes = ", ".join(route.query) or "none"
        raise ValidationFailed([FieldError(name[:100], f"Unknown query parameter; this endpoint takes: {takes}",
                                           "unrecognized_keys") for name in unknown[:10]],
                               suggestion="Remove the parameter, or check its spelling in /openapi.json.")


async def authorize(request: web.Request, route: Route) -> None:
    key = bearer_key(request)
    if key is None:
        raise Unauthorized("Missing API key", "Send 'Authorization: Bearer <key>'.")
    if len(key) > 200 or not key.startswith(("sk_", "pk_")):
        raise Unauthorized("Invalid API key")
    who = await request.app[KEYS].lookup(key)
    if who is None:
        raise Unauthorized("Invalid API key", "Check the key, or rotate it with 'plunkd keys rotate'.")
    if route.auth == "secret" and who.key_kind != "secret":
        raise Forbidden("This endpoint requires a secret key (sk_…); public keys may only call /v1/track")
    allowance = request.app[RATE_LIMITER].take(who.project_id)
    request["plunkd.ratelimit"] = allowance
    if not allowance.allowed:
        raise RateLimited(allowance.retry_after)
    request[CALLER] = who


def in_dialect(handler: Handler, shape: str) -> Handler:
    async def legacy_handler(request: web.Request) -> web.StreamResponse:
        request[DIALECT] = shape
        return await handler(request)

    return legacy_handler


def register(app: web.Application, routes: list[Route]) -> None:
    for route in routes:
        targets = [(path, guarded(route, route.status_at(path))) for path in route.paths()]
        targets += [(path, in_dialect(guarded(route, route.status_at(path)), route.legacy))
                    for path in route.legacy_paths()]
        for path, handler in targets:
            if route.method == "GET" and route.head:
                app.router.add_get(path, handler, allow_head=True)
            else:
                app.router.add_route(route.method, path, handler)
            if route.cors:
                app.router.add_route("OPTIONS", path, preflight(f"{route.method}, OPTIONS"))
