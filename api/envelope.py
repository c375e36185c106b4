"""The Plunk response envelope: `{success, data}` and `{success: false, error, timestamp}`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from pipeline.errors import PipelineError, ValidationFailed


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> str:
    return json.dumps(value, default=_default, separators=(",", ":"), ensure_ascii=False)


def success(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"success": True, "data": data}, status=status, dumps=dumps)


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
    payload = {"success": False, "error": body, "timestamp": iso(datetime.now(UTC))}
    return web.json_response(payload, status=error.status, dumps=dumps)


_SUGGESTIONS = {
    "BAD_REQUEST": "Send a valid JSON body with Content-Type: application/json.",
    "UNAUTHORIZED": "Pass your key as 'Authorization: Bearer sk_…' (or pk_… for /v1/track).",
    "FORBIDDEN": "This endpoint needs the project's secret key (sk_…).",
    "NOT_FOUND": "Check the URL and the id; ids belong to one project.",
    "PAYLOAD_TOO_LARGE": "Send a smaller body.",
    "INTERNAL_ERROR": "Retry later; if it persists, contact the operator with the requestId.",
    "METHOD_NOT_ALLOWED": "Check the HTTP method for this endpoint in /openapi.json.",
}
