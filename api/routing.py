"""The route table type and the wrapper that applies auth and the rate limit per route."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import BaseModel

from api.auth import Caller
from api.context import KEYS, RATE_LIMITER
from api.errors import RateLimited, Unauthorized
from pipeline.errors import Forbidden

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CALLER = "plunkd.caller"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: str | None = "secret"
    """'secret' (sk_ only), 'public' (sk_ or pk_) or None (no key)."""
    scope: str = "dashboard"
    """'public' → served under /v1 only; 'dashboard' → unversioned and under /v1; 'root' → as is."""
    body: type[BaseModel] | None = None
    query: dict[str, str] = field(default_factory=dict)
    tag: str = ""

    def paths(self) -> list[str]:
        if self.scope == "public":
            return [f"/v1{self.path}"]
        if self.scope == "dashboard":
            return [self.path, f"/v1{self.path}"]
        return [self.path]


def caller(request: web.Request) -> Caller:
    return request[CALLER]


def bearer_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def guarded(route: Route) -> Handler:
    """Wrap a handler with its key check and the project's rate limit."""
    if route.auth is None:
        return route.handler

    async def handler(request: web.Request) -> web.StreamResponse:
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
        return await route.handler(request)

    return handler


def register(app: web.Application, routes: list[Route]) -> None:
    for route in routes:
        wrapped = guarded(route)
        for path in route.paths():
            app.router.add_route(route.method, path, wrapped)

