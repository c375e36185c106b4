"""The Plunk response envelope: `{success, data}` and `{success: false, error, message, timestamp}`.

Handlers return a `Reply` holding their data; the middleware turns it into bytes in the caller's
dialect (the envelope, or the flat seed-002 shapes under /api/v1), so one handler serves both.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from pipeline.errors import PipelineError, ValidationFailed
from storage.models import iso

JSON_TYPE = "application/json"
_UNENCODABLE = re.compile("[\ud800-\udfff]")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> str:
    return json.dumps(value, default=_default, separators=(",", ":"), ensure_ascii=False)


def _scrubbed(value: Any) -> Any:
    """A copy that any JSON reader can take: lone surrogates become U+FFFD, NaN/±Infinity null.
    Only used when the fast path fails, i.e. for rows stored before the door refused such input."""
    if isinstance(value, str):
        return _UNENCODABLE.sub("\ufffd", value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {_scrubbed(k) if isinstance(k, str) else k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    return value


_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def encode_json(value: Any) -> bytes:
    """Strict JSON in UTF-8, whatever the database holds. orjson writes the common case (a fifth of the
    stdlib's time on a /v1/send reply); what it refuses (a lone surrogate, an integer beyond 64 bits) takes
    the stdlib's path. orjson writes NaN and ±Infinity as null, as the scrubbed path does."""
    try:
        return orjson.dumps(value, default=_default, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(value, default=_default, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()
    except (UnicodeEncodeError, ValueError):
        return json.dumps(_scrubbed(value), default=_default, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()


def json_reply(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode_json(payload), status=status, content_type=JSON_TYPE)


class Reply(web.Response):
    """A handler's success data; the middleware encodes it in the caller's dialect, and the route table
    sets its status (`Route.status`)."""

    def __init__(self, data: Any) -> None:
        super().__init__(content_type=JSON_TYPE)
        self.data = data


def success(data: Any) -> Reply:
    return Reply(data)


def enveloped(data: Any) -> dict[str, Any]:
    return {"success": True, "data": data}


def legacy(data: Any, shape: str) -> Any:
    """Seed 002's flat shapes: `items` → the plain array of a page or list; `bare` → the data as is
    (`{count}`); `flat` → the data's fields beside `success` (a list stays a plain array)."""
    if shape == "items":
        return data["items"] if isinstance(data, dict) else data
    if shape == "bare" or not isinstance(data, dict):
        return data
    return {"success": True, **data}


def failure(error: PipelineError, request_id: str) -> web.Response:
    body: dict[str, Any] = {
        "code": error.code,
        "message": error.message,
        "statusCode": error.status,
        "requestId": request_id,
    }
    if isinstance(error, ValidationFailed):
        body["errors"] = [e.as_dict() for e in error.errors]
    body["suggestion"] = error.suggestion or _SUGGESTIONS.get(error.code, "")
    payload = {"success": False, "error": body, "message": error.message, "timestamp": iso(datetime.now(UTC))}
    return json_reply(payload, error.status)


_SUGGESTIONS = {
    "BAD_REQUEST": "Send a valid JSON body with Content-Type: application/json.",
    "UNAUTHORIZED": "Pass your key as 'Authorization: Bearer sk_…' (or pk_… for /v1/track).",
    "FORBIDDEN": "This endpoint needs the project's secret key (sk_…).",
    "NOT_FOUND": "Check the URL and the id; ids belong to one project.",
    "PAYLOAD_TOO_LARGE": "Send a smaller body.",
    "INTERNAL_ERROR": "Retry later; if it persists, contact the operator with the requestId.",
    "METHOD_NOT_ALLOWED": "Check the HTTP method for this endpoint in /openapi.json.",
}
