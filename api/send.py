"""POST /v1/send: validate, compose (from the request, or from one of the project's templates), and hand to
the one send pipeline."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from aiohttp import web
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from api.context import CONFIG, DB, LINKS, ON_QUEUED
from api.envelope import dumps, success
from api.routing import Route, caller
from api.schemas import Sent
from api.tracking_settings import TrackingChoice
from api.validation import EMAIL_SCHEMA, Body, Data, Email, body_from, case_insensitive, read_json
from pipeline.compose import (
    HEADER_CONTROL,
    HEADER_NAME,
    RESERVED_HEADERS,
    Attachment,
    MessageSpec,
    is_safe_header_value,
    reserved_header,
)
from pipeline.errors import FieldError, ValidationFailed
from pipeline.marketing.templates import require_template, template_spec
from pipeline.submit import Submission, run_idempotent, submit

MAX_RECIPIENTS = 50
MAX_ATTACHMENTS = 5
MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024
MAX_CUSTOM_HEADERS = 50
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def refuse_control_characters(value: Any) -> Any:
    """Fields that end up in a mail header are refused at the door when they hold a control character
    (TAB excepted); compose would only blank them out. Other types pass to the type check."""
    if isinstance(value, str) and not is_safe_header_value(value):
        raise PydanticCustomError("invalid_header_value", "Must not contain CR, LF, NUL or other control characters "
                                                          "(TAB is allowed): it is written into a mail header")
    return value


InHeader = BeforeValidator(refuse_control_characters)
HEADER_CONTROLS = HEADER_CONTROL.pattern[1:-1]
"""The character-class body of `HEADER_CONTROL`, for the JSON-schema patterns below."""
HEADER_SAFE = f"^[^{HEADER_CONTROLS}]*$"
"""JSON-schema form of `is_safe_header_value`."""
HeaderText = Annotated[str, StringConstraints(max_length=998), InHeader,
                       WithJsonSchema({"type": "string", "maxLength": 998, "pattern": HEADER_SAFE})]
HeaderEmail = Annotated[Email, InHeader]
DisplayName = Annotated[str, StringConstraints(max_length=200), InHeader,
                       WithJsonSchema({"type": "string", "maxLength": 200, "pattern": HEADER_SAFE})]
"""A From display name: used as given (not rendered), in a header."""
BASE64 = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""What `base64.b64decode(validate=True)` accepts."""


HEADER_NAMES_SCHEMA = {"pattern": f"^{HEADER_NAME.pattern}$", "not": {"pattern": "^(" + "|".join(
    [case_insensitive(name) for rule in RESERVED_HEADERS for name in sorted(rule.names)]
    + [case_insensitive(prefix) + ".*" for rule in RESERVED_HEADERS for prefix in rule.prefixes]) + ")$"}}
"""JSON-schema form of `HEADER_NAME` and `reserved_header`."""


def refuse_too_many_headers(value: Any) -> Any:
    """Counted before each header is validated, so 100,000 of them cost one `len`."""
    if isinstance(value, dict) and len(value) > MAX_CUSTOM_HEADERS:
        raise PydanticCustomError("too_big", "At most {n} custom headers; got {count}",
                                  {"n": MAX_CUSTOM_HEADERS, "count": len(value)})
    return value


def no_attachments_as_none(value: Any) -> Any:
    """Seed 002's own send example (its docs call the field an object) writes `"attachments": {}`: no
    attachments. Any other object, or a non-list, goes on to the type check and its 422."""
    return None if value == {} and isinstance(value, dict) else value


class AttachmentBody(Body):
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255), InHeader,
                        WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 255,
                                        "pattern": f"^[^{HEADER_CONTROLS}/\\\\]*$"})]
    content: Annotated[str, StringConstraints(min_length=1, max_length=14_000_000),
                       WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 14_000_000,
                                       "pattern": BASE64})]
    contentType: Annotated[str, StringConstraints(pattern=r"^[\w.+-]+/[\w.+-]+$")] | None = None
    type: Annotated[str, StringConstraints(pattern=r"^[\w.+-]+/[\w.+-]+$")] | None = None

    @field_validator("filename")
    @classmethod
    def safe_filename(cls, value: str) -> str:
        if any(ch in value for ch in "/\\"):
            raise ValueError("filename may not contain path separators")
        return value

    def decoded(self) -> bytes:
        return base64.b64decode(self.content, validate=True)


def _send_schema(schema: dict[str, Any]) -> None:
    """Subject and body, or a template; and `attachments` may be `{}` (see `no_attachments_as_none`)."""
    schema["anyOf"] = [
        {"required": ["subject", "body"], "properties": {"subject": {"type": "string"}, "body": {"type": "string"}}},
        {"required": ["template"], "properties": {"template": {"type": "string"}}}]
    schema["properties"]["attachments"]["anyOf"].insert(1, {
        "type": "object", "maxProperties": 0, "description": "No attachments, as seed 002's send example writes it"})


class SendBody(Body):
    model_config = ConfigDict(json_schema_extra=_send_schema)

    to: Annotated[list[HeaderEmail], BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
                  Field(min_length=1, max_length=MAX_RECIPIENTS),
                  WithJsonSchema({"anyOf": [EMAIL_SCHEMA, {"type": "array", "items": EMAIL_SCHEMA, "minItems": 1,
                                                           "maxItems": MAX_RECIPIENTS}]})]
    subject: Annotated[HeaderText | None, Field(description="Rendered per recipient; with `template`, replaces "
                                                           "the template's subject")] = None
    body: Annotated[Annotated[str, StringConstraints(max_length=5_000_000)] | None,
                    Field(description="HTML or text, rendered per recipient; with `template`, replaces the "
                                      "template's body (in the template's style)")] = None
    template: Annotated[Annotated[str, StringConstraints(max_length=64)] | None,
                        Field(description="The id of one of the project's templates (404 if there is none): its "
                                          "subject, body and style, and its from, fromName and reply where the "
                                          "request gives none. A MARKETING template adds each recipient's "
                                          "List-Unsubscribe (one-click) and, in PLUNK style, an unsubscribe "
                                          "footer")] = None
    data: Data = None
    name: DisplayName | None = None
    from_: HeaderEmail | None = Field(default=None, alias="from")
    reply: HeaderEmail | None = None
    headers: Annotated[dict[str, HeaderText] | None, BeforeValidator(refuse_too_many_headers),
                       WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": MAX_CUSTOM_HEADERS,
                                                  "propertyNames": HEADER_NAMES_SCHEMA,
                                                  "additionalProperties": {"type": "string", "maxLength": 998,
                                                                           "pattern": HEADER_SAFE}},
                                                 {"type": "null"}]})] = None
    attachments: Annotated[Annotated[list[AttachmentBody], Field(max_length=MAX_ATTACHMENTS)] | None,
                           BeforeValidator(no_attachments_as_none)] = None
    subscribed: bool | None = None
    tracking: Annotated[TrackingChoice | None, Field(
        description="Open and click tracking for this send: `opens` adds a 1×1 pixel to the HTML part, `clicks` "
                    "sends its http(s) links through a redirect that records `email.click`. An omitted field (or "
                    "`tracking` itself) takes the project's default (GET /settings/tracking): on for a MARKETING "
                    "template, off otherwise. Mail without an HTML part has nothing to track")] = None

    @model_validator(mode="after")
    def content_given(self):
        if self.template is None and (self.body is None or self.subject is None):
            raise ValueError("Give subject and body, or a template")
        return self


def _header_errors(headers: dict[str, str]) -> list[FieldError]:
    """Header names; their values were checked with the other fields (`HeaderText`)."""
    errors = []
    for name in headers:
        if not HEADER_NAME.fullmatch(name):
            errors.append(FieldError(f"headers.{name}", "Header names are printable ASCII without ':' or spaces",
                                     "invalid_header"))
        elif (why := reserved_header(name)) is not None:
            errors.append(FieldError(f"headers.{name}", f"{name} cannot be set through headers: {why}",
                                     "protected_header"))
    return errors


def _attachments(items: list[AttachmentBody]) -> list[Attachment]:
    errors, decoded = [], []
    total = 0
    for index, item in enumerate(items):
        try:
            content = item.decoded()
        except (binascii.Error, ValueError):
            errors.append(FieldError(f"attachments.{index}.content", "content is not valid base64", "invalid_base64"))
            continue
        total += len(content)
        decoded.append(Attachment(item.filename, content, item.contentType or item.type or "application/octet-stream"))
    if total > MAX_ATTACHMENT_BYTES:
        errors.append(FieldError("attachments", f"attachments total more than {MAX_ATTACHMENT_BYTES} bytes", "too_big"))
    if errors:
        raise ValidationFailed(errors)
    return decoded


async def send_email(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    who = caller(request)
    payload = await read_json(request)
    body = body_from(request, payload, SendBody)
    errors = _header_errors(body.headers or {})
    if errors:
        raise ValidationFailed(errors)
    attachments = _attachments(body.attachments or [])
    idem_key = request.headers.get("Idempotency-Key")
    if idem_key is not None and not IDEMPOTENCY_KEY.fullmatch(idem_key):
        raise ValidationFailed([FieldError("Idempotency-Key", "1-255 printable ASCII characters", "invalid_string")])
    if body.template is None:
        spec = MessageSpec(body.from_ or who.from_email, body.name if body.name is not None else who.from_name,
                           body.subject or "", body.body or "", body.reply, dict(body.headers or {}), attachments)
    else:
        template = await request.app[DB].read(require_template, who.project_id, body.template)
        spec = template_spec(template, (who.from_email, who.from_name), request.app[LINKS], from_email=body.from_,
                             from_name=body.name, reply_to=body.reply, subject=body.subject, body=body.body,
                             headers=body.headers, attachments=attachments)
    submission = Submission(who.project_id, "api", spec.from_email, body.to,
                            body.subscribed, body.data,
                            compose=functools.partial(spec.build, limit=config.smtp.max_message_bytes),
                            subject=spec.subject,
                            size=len(spec.body) + sum(len(a.content) for a in attachments),
                            marketing=spec.links is not None,
                            tracking=body.tracking.choice() if body.tracking is not None else None)
    digest = "" if idem_key is None else hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def work(session) -> dict[str, Any]:
        def produce() -> dict[str, Any]:
            queued = submit(session, submission)
            return {"emails": [{"contact": {"id": q.contact_id, "email": q.email}, "email": q.email_id}
                               for q in queued],
                    "timestamp": datetime.now(UTC)}

        if idem_key is None:
            return produce()
        # kept as the JSON it is answered with, so a replay answers the same
        return run_idempotent(session, who.project_id, idem_key, digest, config.api.idempotency_hours,
                              lambda: json.loads(dumps(produce())))

    data = await request.app[DB].write(submission.as_work(work), light=submission.light)
    for wake in request.app[ON_QUEUED]:
        wake()
    return success(data)


ROUTES = [
    Route("POST", "/send", send_email, "Send an email: subject and body, or a template", scope="public",
          body=SendBody,
          tag="Transactional", response=Sent, errors=frozenset({404, 409})),
]
