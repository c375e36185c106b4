"""HTTP-only failures; everything else comes from `pipeline.errors`."""

from __future__ import annotations

from pipeline.errors import PipelineError


class BadRequest(PipelineError):
    code = "BAD_REQUEST"
    status = 400


class Unauthorized(PipelineError):
    code = "UNAUTHORIZED"
    status = 401


class PayloadTooLarge(PipelineError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class RateLimited(PipelineError):
    code = "RATE_LIMIT_EXCEEDED"
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many requests for this project",
                         f"Wait {retry_after} s (see Retry-After) and retry with exponential backoff.")
        self.retry_after = retry_after


class MethodNotAllowed(PipelineError):
    code = "METHOD_NOT_ALLOWED"
    status = 405


class RequestTimeout(PipelineError):
    code = "REQUEST_TIMEOUT"
    status = 408


class TooManyConnections(PipelineError):
    code = "TOO_MANY_CONNECTIONS"
    status = 503
