"""Template rules: create, update, delete (refused while something sends the template), and
`template_spec`, which turns a template plus a sender's overrides into the `MessageSpec` every send
path composes from (`/v1/send` today, campaigns and automations too)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from pipeline.compose import Attachment, MessageSpec
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.links import LinkSigner
from storage import templates as template_store
from storage.models import Template
from storage.templates import TemplateUser

TYPES = ("MARKETING", "TRANSACTIONAL")
"""MARKETING mail carries the contact's unsubscribe link (List-Unsubscribe, the PLUNK footer); TRANSACTIONAL
mail does not."""
STYLES = ("PLUNK", "HTML")
"""PLUNK wraps the body in the house layout; HTML sends it as written."""
MAX_BODY = 5_000_000
"""Characters of a template body."""
MAX_NAME = 200
MARKETING_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
"""Written by compose on marketing mail, so a send may not give them too."""
_NAMED_USERS = 5


def require_template(session: Session, project_id: str, template_id: str, for_update: bool = False) -> Template:
    template = template_store.get_template(session, project_id, template_id, for_update)
    if template is None:
        raise NotFound(f"Template {template_id} not found", "Check the template id; it must belong to this project.")
    return template


def create_template(session: Session, project_id: str, values: dict[str, Any]) -> Template:
    """`values` by column: name, subject, body, and optionally type, style, from_email, from_name, reply_to."""
    check_values(values)
    return template_store.insert_template(session, project_id, {"type": "MARKETING", "style": "PLUNK", **values})


def update_template(session: Session, project_id: str, template_id: str, values: dict[str, Any]) -> Template:
    """Set the given columns (a None from_email, from_name or reply_to clears it); the others stay."""
    check_values(values)
    template = require_template(session, project_id, template_id)
    return template_store.update_template(session, template, values) if values else template


def delete_template(session: Session, project_id: str, template_id: str) -> Template:
    """Delete the template, or Conflict while anything refers to it (see `check_unused`)."""
    template = require_template(session, project_id, template_id, for_update=True)
    check_unused(session, template)
    template_store.delete_template(session, template)
    return template


def check_unused(session: Session, template: Template) -> None:
    """Conflict naming what uses the template. Call it with the template's row locked (`require_template(...,
    for_update=True)`): a campaign saved meanwhile with this template waits for the lock or is seen here."""
    users = template_store.template_users(session, template.id)
    if users:
        raise Conflict(f"Template {template.id} is used by {_describe(users)}",
                       "Delete those first, or point them at another template.")


def _describe(users: list[TemplateUser]) -> str:
    named = ", ".join(f"{user.kind} '{user.name}' ({user.id})" for user in users[:_NAMED_USERS])
    more = len(users) - _NAMED_USERS
    return f"{named} and {more} more" if more > 0 else named


def check_values(values: dict[str, Any]) -> None:
    """What the API checks at the door, here too for every other caller."""
    errors = []
    for column in ("name", "subject", "body"):
        if column in values and not isinstance(values[column], str):
            errors.append(FieldError(column, f"{column} is required", "invalid_type"))
    if isinstance(values.get("name"), str) and not 1 <= len(values["name"]) <= MAX_NAME:
        errors.append(FieldError("name", f"name must be 1 to {MAX_NAME} characters", "invalid_string"))
    if "type" in values and values["type"] not in TYPES:
        errors.append(FieldError("type", f"type must be one of {', '.join(TYPES)}", "invalid_enum_value"))
    if "style" in values and values["style"] not in STYLES:
        errors.append(FieldError("style", f"style must be one of {', '.join(STYLES)}", "invalid_enum_value"))
    if isinstance(values.get("body"), str) and len(values["body"]) > MAX_BODY:
        errors.append(FieldError("body", f"body is longer than {MAX_BODY} characters", "too_big"))
    if errors:
        raise ValidationFailed(errors)


def template_spec(template: Template, sender: tuple[str, str], links: LinkSigner | None, *,
                  from_email: str | None = None, from_name: str | None = None, reply_to: str | None = None,
                  subject: str | None = None, body: str | None = None, headers: dict[str, str] | None = None,
                  attachments: list[Attachment] | None = None, campaign_id: str | None = None,
                  marketing: bool | None = None) -> MessageSpec:
    """The message a send of `template` composes for each recipient.

    `sender` is the project's default (email, name). From, From name and Reply-To are each the caller's
    value when given (not None), else the template's, else (From and its name) the project's. Subject
    and body are the caller's when given, else the template's; style comes from the template.
    A MARKETING template is marketing mail: it gets `links` (the app's `LinkSigner`, required then), so
    each recipient's message carries their own List-Unsubscribe / List-Unsubscribe-Post and, in PLUNK
    style, the footer with their unsubscribe link; `headers` may then not set those two. TRANSACTIONAL
    mail gets neither, whatever `links` is. `campaign_id` goes into the links (campaign stats).
    `marketing` overrides the template's type (a campaign is marketing mail whatever template it uses).
    """
    if marketing is None:
        marketing = template.type == "MARKETING"
    if marketing and links is None:
        raise ValueError("a MARKETING template needs the link signer")
    headers = dict(headers or {})
    if marketing:
        refused = [FieldError(f"headers.{name}", f"{name} is written by plunkd on marketing templates",
                              "protected_header") for name in headers if name.lower() in MARKETING_HEADERS]
        if refused:
            raise ValidationFailed(refused)
    return MessageSpec(
        from_email=_first(from_email, template.from_email, sender[0]),
        from_name=_first(from_name, template.from_name, sender[1]),
        subject=_first(subject, template.subject),
        body=_first(body, template.body),
        reply_to=_first(reply_to, template.reply_to, None),
        headers=headers,
        attachments=list(attachments or []),
        style=template.style,
        links=links if marketing else None,
        campaign_id=campaign_id,
    )


def _first(*values: str | None) -> Any:
    return next((value for value in values if value is not None), values[-1])
