"""Errors the pipeline raises; `api/` turns them into the Plunk envelope, `relay/` into SMTP replies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FieldError:
    field: str
    message: str
    code: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message, "code": self.code}


class PipelineError(Exception):
    code = "BAD_REQUEST"
    status = 400

    def __init__(self, message: str, suggestion: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.suggestion = suggestion


class ValidationFailed(PipelineError):
    code = "VALIDATION_ERROR"
    status = 422

    def __init__(self, errors: list[FieldError], message: str = "Request validation failed",
                 suggestion: str = "One or more fields are missing or have incorrect values.") -> None:
        super().__init__(message, suggestion)
        self.errors = errors


class NotFound(PipelineError):
    code = "NOT_FOUND"
    status = 404


class Conflict(PipelineError):
    code = "CONFLICT"
    status = 409


class Forbidden(PipelineError):
    code = "FORBIDDEN"
    status = 403
