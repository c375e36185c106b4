"""A template as it will be mailed, before it is sent: the preview (composed by the very `MessageSpec.build`
every send uses, then read back out of the MIME), the variables it uses, the sample data it is shown with,
and a test copy to one address."""

from __future__ import annotations

import email.policy
import functools
import json
from dataclasses import dataclass
from email.parser import BytesParser
from typing import Any

from sqlalchemy.orm import Session

from pipeline.compose import Template as Text
from pipeline.errors import FieldError, NotFound, ValidationFailed
from pipeline.links import LinkSigner
from pipeline.marketing.templates import template_spec
from pipeline.submit import Queued, Submission, submit
from pipeline.tracking.links import tracking_for
from storage import contacts as contact_store
from storage.models import Project, Template

FILLED_BY_PLUNKD = ("plunk_id", "plunk_email", "unsubscribe_url", "subscribe_url", "preferences_url")
"""Variables every send fills (the last three in marketing mail)."""
MAX_SAMPLE_JSON = 64 * 1024
"""Characters of sample data typed as JSON."""


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    has_default: bool
    filled_by_plunkd: bool


@dataclass(frozen=True)
class Preview:
    subject: str
    html: str | None
    """The text/html part as mailed (None: a plain-text email)."""
    text: str


def variables_used(subject: str, body: str) -> list[Variable]:
    """Each `{{name}}` / `{{name ?? default}}` of the subject and body, once, in order of first use."""
    seen: dict[tuple[str, str], Variable] = {}
    for text in (subject, body):
        for part in Text(text).parts:
            if not isinstance(part, str) and (part.name, part.default) not in seen:
                seen[(part.name, part.default)] = Variable(part.name, part.default, part.default != "",
                                                           part.name in FILLED_BY_PLUNKD)
    return list(seen.values())


def sample_variables(session: Session, project_id: str, contact_email: str, typed_json: str,
                     fallback_email: str) -> dict[str, Any]:
    """The variables a preview renders with: a contact's data (by email; 404 when there is none), else
    the typed JSON object (422 when it is not one), as a send to that contact would see them."""
    contact_email = contact_email.strip().lower()
    if contact_email:
        contact = contact_store.get_contact_by_email(session, project_id, contact_email[:320])
        if contact is None:
            raise NotFound(f"No contact {contact_email} in this project", "Pick the email of a contact.")
        return {**contact.data, "plunk_id": contact.id, "plunk_email": contact.email}
    data: Any = {}
    if typed_json.strip():
        if len(typed_json) > MAX_SAMPLE_JSON:
            raise ValidationFailed([FieldError("sampleData", f"At most {MAX_SAMPLE_JSON} characters", "too_big")])
        try:
            data = json.loads(typed_json)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ValidationFailed([FieldError("sampleData", "A JSON object, such as {\"name\": \"Ada\"}",
                                               "invalid_json")])
    return {**data, "plunk_id": "", "plunk_email": fallback_email}


def preview(template: Template, sender: tuple[str, str], links: LinkSigner, variables: dict[str, Any],
            max_bytes: int) -> Preview:
    """`template` (a row, or an unsaved one) composed for the recipient `variables["plunk_email"]` with
    the layout, footer and links a send gives it, within `max_bytes` (MessageTooLarge otherwise)."""
    spec = template_spec(template, sender, links)
    raw = spec.build(variables["plunk_email"], variables, max_bytes)
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    html_part = message.get_body(("html",))
    text_part = message.get_body(("plain",))
    return Preview(str(message["Subject"] or ""),
                   html_part.get_content() if html_part is not None else None,
                   text_part.get_content() if text_part is not None else "")


def send_test_copy(session: Session, project: Project, template: Template, address: str, links: LinkSigner,
                   variables: dict[str, Any], max_bytes: int) -> list[Queued]:
    """One copy of the saved template to `address` now, as a campaign's test copy goes: an email of no
    contact (none created or changed), from a verified sender (422 `unverified_domain` otherwise)."""
    spec = template_spec(template, (project.from_email, project.from_name), links)
    sample = {key: value for key, value in variables.items() if key not in FILLED_BY_PLUNKD}
    return submit(session, Submission(project.id, "api", spec.from_email, [address],
                                      compose=functools.partial(spec.build, limit=max_bytes), subject=spec.subject,
                                      size=len(spec.body), variables=sample,
                                      tracking=tracking_for(session, project.id, marketing=spec.links is not None),
                                      test_copy=True))
