"""Template queries: the rows of `templates`, and what refers to one (`template_users`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.models import Campaign, Template, TemplateDraft, utcnow
from storage.pagination import Page, paginate
from storage.workflow_admin import template_workflows

COLUMNS = frozenset({"name", "subject", "body", "type", "style", "from_email", "from_name", "reply_to"})
"""The columns a caller may set; id, project and timestamps are kept here."""


@dataclass(frozen=True)
class TemplateUser:
    """Something that sends a template and so keeps it from being deleted."""

    kind: str
    """'campaign', 'workflow' or 'action' (a legacy action)."""
    id: str
    name: str


def insert_template(session: Session, project_id: str, values: dict[str, Any]) -> Template:
    now = utcnow()
    template = Template(project_id=project_id, created_at=now, updated_at=now, **_columns(values))
    session.add(template)
    session.flush()
    return template


def get_template(session: Session, project_id: str, template_id: str, for_update: bool = False) -> Template | None:
    """The project's template, or None. `for_update` locks its row (PostgreSQL) until the transaction ends,
    which also waits for, and then holds off, anything inserting a row that references it."""
    stmt = select(Template).where(Template.project_id == project_id, Template.id == template_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def template_names(session: Session, project_id: str, template_ids: list[str]) -> dict[str, str]:
    """id → name of the project's templates among `template_ids` (one query on the primary key)."""
    if not template_ids:
        return {}
    rows = session.execute(select(Template.id, Template.name).where(
        Template.project_id == project_id, Template.id.in_(sorted(set(template_ids)))))
    return {row.id: row.name for row in rows}


def list_templates(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(Template).where(Template.project_id == project_id), Template.id, limit, cursor)


def update_template(session: Session, template: Template, values: dict[str, Any]) -> Template:
    for column, value in _columns(values).items():
        setattr(template, column, value)
    template.updated_at = utcnow()
    session.flush()
    return template


def delete_template(session: Session, template: Template) -> None:
    session.delete(template)
    session.flush()


def template_users(session: Session, template_id: str) -> list[TemplateUser]:
    """What refers to the template, oldest first.

    The one "is it in use?" query: every table that references templates adds its own select here
    (workflows: their send steps). Matched on the template id alone, as the foreign key is: a reference
    from any row blocks the delete."""
    rows = session.execute(select(Campaign.id, Campaign.name).where(Campaign.template_id == template_id)
                           .order_by(Campaign.id)).all()
    users = [TemplateUser("campaign", row.id, row.name) for row in rows]
    users += [TemplateUser(ref.kind.lower(), ref.id, ref.name) for ref in template_workflows(session, template_id)]
    return users


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - COLUMNS
    if unknown:
        raise ValueError(f"not template columns: {sorted(unknown)}")
    return values


KEPT_DRAFTS = 4
"""A user's newest drafts kept per project. The editor posts a preview as you type and the requests overlap:
a frame still loading the draft before the newest (or one committed after a newer one) finds it."""


def save_draft(session: Session, project_id: str, user_id: str, values: dict[str, Any]) -> TemplateDraft:
    """Add a draft of the user's in the project (subject, body, type, style, variables), dropping all but
    the newest `KEPT_DRAFTS` - 1 before it."""
    mine = (TemplateDraft.project_id == project_id, TemplateDraft.user_id == user_id)
    newest = select(TemplateDraft.id).where(*mine).order_by(TemplateDraft.id.desc()).limit(KEPT_DRAFTS - 1)
    session.execute(delete(TemplateDraft).where(*mine, TemplateDraft.id.not_in(newest.scalar_subquery())))
    draft = TemplateDraft(project_id=project_id, user_id=user_id, created_at=utcnow(), **values)
    session.add(draft)
    session.flush()
    return draft


def get_draft(session: Session, project_id: str, user_id: str, draft_id: str) -> TemplateDraft | None:
    return session.execute(select(TemplateDraft).where(
        TemplateDraft.id == draft_id, TemplateDraft.project_id == project_id,
        TemplateDraft.user_id == user_id)).scalar_one_or_none()
