"""Request ids, access logs and the error envelope: no stack trace or SQL ever reaches a client."""

from __future__ import annotations

import logging
import re
import time

from aiohttp import web

from api.envelope import Reply, encode_json, enveloped, failure, legacy
from api.errors import BadRequest, MethodNotAllowed, PayloadTooLarge, RateLimited
from api.routing import CORS_ORIGIN, DIALECT, cors_headers
from core.metrics import HTTP_DURATION
from core.randomness import uuid4_text
from core.redaction import LOGGED_PATH
from pipeline.errors import NotFound, PipelineError

log = logging.getLogger("plunkd.api")
REQUEST_ID = "plunkd.request_id"
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(request: web.Request) -> str:
    return request[REQUEST_ID]


class InternalError(PipelineError):
    code = "INTERNAL_ERROR"
    status = 500


@web.middleware
async def envelope_middleware(request: web.Request, handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    rid = incoming if _SAFE_REQUEST_ID.fullmatch(incoming) else uuid4_text()
    request[REQUEST_ID] = rid
    started = time.perf_counter()
    try:
        if "\x00" in request.path or "\x00" in request.query_string:
            raise BadRequest("The URL may not contain NUL characters")
        response = await handler(request)
        if isinstance(response, Reply):
            shape = request.get(DIALECT)
            response.body = encode_json(enveloped(response.data) if shape is None else legacy(response.data, shape))
    except PipelineError as exc:
        response = failure(exc, rid)
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
    except web.HTTPException as exc:
        response = failure(_from_http(exc), rid)
        if exc.status == 405:
            response.headers["Allow"] = await allowed_methods(request)
    except Exception:
        log.exception("request %s %s failed (request id %s)", request.method, request.get(LOGGED_PATH, request.path),
                      rid)
        response = failure(InternalError("Internal server error"), rid)
    elapsed = time.perf_counter() - started
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    HTTP_DURATION.labels(route, request.method, str(response.status)).observe(elapsed)
    log.info("%s %s %d %.1fms rid=%s", request.method, request.get(LOGGED_PATH, request.path), response.status,
             elapsed * 1000, rid)
    return response


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the request id, rate-limit and CORS headers on every reply, as its headers go
    out, so a streamed reply (prepared by its handler) carries them as well as one the middleware returns."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        return
    allowance = request.get("plunkd.ratelimit")
    if allowance is not None:
        response.headers.update(allowance.headers())
    response.headers["X-Request-Id"] = rid
    origin = request.get(CORS_ORIGIN)
    if origin is not None:
        response.headers.update(cors_headers(origin))


async def allowed_methods(request: web.Request) -> str:
    """The methods served at the route template this path resolves to. aiohttp's own Allow header
    unites every template the path matches (`/contacts/count` would also list `/contacts/{id}`'s
    methods); the router picks the first template in table order, and so does this."""
    template = None
    methods: set[str] = set()
    for resource in request.app.router.resources():
        if template is not None and resource.canonical != template:
            continue
        _, allowed = await resource.resolve(request)
        if allowed:
            template = resource.canonical
            methods |= allowed
    return ", ".join(sorted(methods))


def _from_http(exc: web.HTTPException) -> PipelineError:
    if exc.status == 404:
        return NotFound("No such endpoint", "See /openapi.json for the routes this server has.")
    if exc.status == 405:
        return MethodNotAllowed("Method not allowed on this endpoint")
    if exc.status == 413:
        return PayloadTooLarge("Request body too large")
    error = PipelineError(exc.reason or "Bad request")
    error.status = exc.status if 400 <= exc.status < 500 else 400
    return error
