"""Reading a request: body size, JSON, then a pydantic model, each with the Plunk error it deserves."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from aiohttp import web
from email_validator import SPECIAL_USE_DOMAIN_NAMES
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError

from api.context import CONFIG
from api.errors import BadRequest, PayloadTooLarge
from core.json_text import parse_json
from pipeline.contact_data import (
    MAX_DATA_KEY_LENGTH,
    MAX_DATA_KEYS,
    MAX_JSON_DEPTH,
    data_size_problem,
    json_problems,
    plainly_storable,
)
from pipeline.errors import FieldError, ValidationFailed
from pipeline.grammar import normalize_email
from storage.pagination import CURSOR_PATTERN, is_valid_cursor

M = TypeVar("M", bound=BaseModel)
_SCREENED = "plunkd.screened_json"
"""The request's parsed body when its text already shows it holds nothing `json_problems` refuses."""
PAGE_LIMIT_MAX = 100
_PAGE_LIMIT = re.compile(r"[0-9]{1,3}")


def check_data(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        if len(value) > MAX_DATA_KEYS:
            raise PydanticCustomError("too_big", "At most {n} data keys", {"n": MAX_DATA_KEYS})
        if any(len(key) > MAX_DATA_KEY_LENGTH or not key for key in value):
            raise PydanticCustomError("invalid_string", "Data keys must be 1-200 characters")
    return value


def case_insensitive(word: str) -> str:
    """`word` as a JSON-schema regex matching any case (JSON schema has no case-insensitive flag)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


EMAIL_SCHEMA: dict[str, Any] = {"type": "string", "format": "email", "maxLength": 320, "not": {
    "pattern": "@([^@]*\\.)?(" + "|".join(case_insensitive(d) for d in SPECIAL_USE_DOMAIN_NAMES) + ")\\.?$"}}
"""email-validator also refuses special-use domains (.test, .invalid, .localhost, .onion…): said here too."""
Email = Annotated[str, AfterValidator(normalize_email), WithJsonSchema(EMAIL_SCHEMA)]
Data = Annotated[dict[str, Any] | None, AfterValidator(check_data),
                 WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": MAX_DATA_KEYS,
                                            "propertyNames": {"minLength": 1, "maxLength": 200}},
                                           {"type": "null"}]})]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", str_max_length=1_000_000)


_CODES = {"missing": "invalid_type", "string_too_long": "too_big", "string_too_short": "too_small",
          "too_long": "too_big", "too_short": "too_small", "greater_than_equal": "too_small",
          "less_than_equal": "too_big", "literal_error": "invalid_enum_value", "enum": "invalid_enum_value",
          "string_unicode": "invalid_string"}


def field_errors(exc: ValidationError) -> list[FieldError]:
    errors = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"] if "[" not in str(part)]
        kind = err["type"]
        code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else kind)
        message = "Required" if kind == "missing" else err["msg"]
        errors.append(FieldError(".".join(loc) or "body", message, code))
    return errors


def validate(model: type[M], payload: Any, screened: bool = False) -> M:
    """The payload as `model`, or 422 naming every bad field. Fields the model keeps are also checked
    for what no store can carry (`json_problems`); fields it ignores are never stored, so never checked.
    `screened`: the whole payload is known to hold none of it (`read_json`), so its fields are not walked."""
    try:
        body = model.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc)) from None
    if screened:
        return body
    errors = json_problems(body.model_dump(by_alias=True, exclude_none=True))
    if errors:
        raise ValidationFailed(errors)
    return body


async def read_json(request: web.Request, max_bytes: int | None = None) -> Any:
    """The request body as JSON, refused with the Plunk error it deserves: 413 over `max_bytes` (default
    `api.max_body_bytes`), 400 unparseable or nested past Python's limit. A body whose text shows it holds
    nothing `json_problems` refuses (`plainly_storable`) is marked so, and `body_from` does not walk it."""
    max_bytes = max_bytes or request.app[CONFIG].api.max_body_bytes
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes")
    raw = bytearray()
    async for chunk in request.content.iter_any():
        raw += chunk
        if len(raw) > max_bytes:
            raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes")
    if not raw.strip():
        raise BadRequest("Request body is empty; expected a JSON object")
    try:
        payload, by_orjson = parse_json(raw)
    except RecursionError:
        raise BadRequest(f"Request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if plainly_storable(raw, by_orjson):
        request[_SCREENED] = payload
    return payload


def check_data_size(request: web.Request, data: dict[str, Any] | None, field: str = "data") -> None:
    """`data` a caller may store in one call is capped (`api.max_data_bytes`), measured as compact JSON."""
    problem = data_size_problem(data, request.app[CONFIG].api.max_data_bytes, field)
    if problem is not None:
        raise ValidationFailed([problem])


def body_from(request: web.Request, payload: Any, model: type[M]) -> M:
    """A parsed JSON body as `model`: an object, valid, and its `data` within `api.max_data_bytes`."""
    if not isinstance(payload, dict):
        raise ValidationFailed([FieldError("body", "Expected a JSON object", "invalid_type")])
    body = validate(model, payload, screened=request.get(_SCREENED) is payload)
    check_data_size(request, getattr(body, "data", None))
    return body


async def read_body(request: web.Request, model: type[M]) -> M:
    return body_from(request, await read_json(request), model)


def page_params(request: web.Request) -> tuple[int, str | None]:
    errors = []
    limit = 20
    raw_limit = request.query.get("limit")
    if raw_limit is not None:
        if not _PAGE_LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= PAGE_LIMIT_MAX:
            errors.append(FieldError("limit", f"limit must be an integer from 1 to {PAGE_LIMIT_MAX}", "invalid_type"))
        else:
            limit = int(raw_limit)
    cursor = request.query.get("cursor")
    if cursor is not None and not is_valid_cursor(cursor):
        errors.append(FieldError("cursor", "cursor is not one this API returned", "invalid_string"))
    if errors:
        raise ValidationFailed(errors)
    return limit, cursor


def bool_param(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw in ("true", "false"):
        return raw == "true"
    raise ValidationFailed([FieldError(name, f"{name} must be true or false", "invalid_type")])


def text_param(request: web.Request, name: str, max_length: int) -> str | None:
    raw = request.query.get(name)
    if raw is not None and len(raw) > max_length:
        raise ValidationFailed([FieldError(name, f"{name} is longer than {max_length} characters", "too_big")])
    return raw or None


PAGE_QUERY: dict[str, dict[str, Any]] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": 20},
    "cursor": {"type": "string", "pattern": f"^{CURSOR_PATTERN.pattern}$"},
}
BOOL_QUERY: dict[str, Any] = {"type": "boolean"}
NO_NUL = "^[^\\u0000]*$"
"""The JSON-schema pattern of text without NUL, which the door refuses outside `data` (see `json_problems`)."""
