"""Reading a request: body size, JSON, then a pydantic model, each with the Plunk error it deserves."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from aiohttp import web
from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from api.errors import BadRequest, PayloadTooLarge
from pipeline.errors import FieldError, ValidationFailed
from storage.pagination import is_valid_cursor

M = TypeVar("M", bound=BaseModel)
MAX_DATA_KEYS = 256


def normalize_email(value: str) -> str:
    """Check syntax (no DNS) and lower-case the address; the stored form of every email."""
    if len(value) > 320:
        raise PydanticCustomError("invalid_string", "Invalid email: longer than 320 characters")
    try:
        result = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise PydanticCustomError("invalid_string", "Invalid email: {reason}", {"reason": str(exc)}) from None
    return result.normalized.lower()


def check_data(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        if len(value) > MAX_DATA_KEYS:
            raise PydanticCustomError("too_big", "At most {n} data keys", {"n": MAX_DATA_KEYS})
        if any(len(key) > 200 or not key for key in value):
            raise PydanticCustomError("invalid_string", "Data keys must be 1-200 characters")
    return value


Email = Annotated[str, AfterValidator(normalize_email)]
Data = Annotated[dict[str, Any] | None, AfterValidator(check_data)]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", str_max_length=1_000_000)


_CODES = {"missing": "invalid_type", "string_too_long": "too_big", "string_too_short": "too_small",
          "too_long": "too_big", "too_short": "too_small", "greater_than_equal": "too_small",
          "less_than_equal": "too_big", "literal_error": "invalid_enum_value", "enum": "invalid_enum_value"}


def field_errors(exc: ValidationError) -> list[FieldError]:
    errors = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"] if "[" not in str(part)]
        kind = err["type"]
        code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else kind)
        message = "Required" if kind == "missing" else err["msg"]
        errors.append(FieldError(".".join(loc) or "body", message, code))
    return errors


def validate(model: type[M], payload: Any) -> M:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc)) from None


async def read_json(request: web.Request, max_bytes: int) -> Any:
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
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None


async def read_body(request: web.Request, model: type[M], max_bytes: int) -> M:
    payload = await read_json(request, max_bytes)
    if not isinstance(payload, dict):
        raise ValidationFailed([FieldError("body", "Expected a JSON object", "invalid_type")])
    return validate(model, payload)


def page_params(request: web.Request) -> tuple[int, str | None]:
    errors = []
    limit = 20
    raw_limit = request.query.get("limit")
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            errors.append(FieldError("limit", "limit must be an integer from 1 to 100", "invalid_type"))
        else:
            limit = int(raw_limit)
    cursor = request.query.get("cursor") or None
    if cursor is not None and not is_valid_cursor(cursor):
        errors.append(FieldError("cursor", "cursor is not one this API returned", "invalid_string"))
    if errors:
        raise ValidationFailed(errors)
    return limit, cursor


def bool_param(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise ValidationFailed([FieldError(name, f"{name} must be true or false", "invalid_type")])
