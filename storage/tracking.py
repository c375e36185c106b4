"""Open and click tracking queries: a project's tracking defaults, and the email a tracking link names."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage import fastpath
from storage.models import Email, Event, TrackingSettings, utcnow

_SETTINGS = TrackingSettings.__table__
_EMAIL = Email.__table__
_EVENT = Event.__table__
SETTING_COLUMNS = ("marketing_opens", "marketing_clicks", "transactional_opens", "transactional_clicks")
_READ_SETTINGS = select(*(_SETTINGS.c[name] for name in SETTING_COLUMNS)).where(
    _SETTINGS.c.project_id == bindparam("project"))
_TRACKED = select(_EMAIL.c.project_id, _EMAIL.c.contact_id, _EMAIL.c.campaign_id).where(
    _EMAIL.c.id == bindparam("email"))
_TRACKED_LOCKED = _TRACKED.with_for_update()
_HAS_EVENT = select(_EVENT.c.id).where(_EVENT.c.email_id == bindparam("email"),
                                       _EVENT.c.name == bindparam("name")).limit(1)


def tracking_settings(session: Session, project_id: str) -> dict[str, bool] | None:
    """The project's stored defaults by column, or None when it never changed them."""
    rows = fastpath.fetch(session, _READ_SETTINGS, {"project": project_id})
    return dict(zip(SETTING_COLUMNS, rows[0], strict=True)) if rows else None


def save_tracking_settings(session: Session, project_id: str, defaults: dict[str, bool],
                           changes: dict[str, bool]) -> dict[str, bool]:
    """Apply `changes` (by column) to the project's row, made from `defaults` first if it has none (two
    requests at once cannot both insert it); returns the row as it is now."""
    conn = session.connection()
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(_SETTINGS).values(project_id=project_id, updated_at=utcnow(), **defaults)
                 .on_conflict_do_nothing(index_elements=["project_id"]))
    if changes:
        conn.execute(update(_SETTINGS).where(_SETTINGS.c.project_id == project_id).values(
            updated_at=utcnow(), **changes))
    saved = tracking_settings(session, project_id)
    assert saved is not None
    return saved


@dataclass(frozen=True)
class TrackedEmail:
    project_id: str
    contact_id: str | None
    campaign_id: str | None


def tracked_email(session: Session, email_id: str, for_update: bool = False) -> TrackedEmail | None:
    """The email a tracking link names, or None when there is none (never was, or retention deleted it).
    `for_update` locks its row (PostgreSQL), so two opens at once cannot both be the first."""
    row = session.connection().execute(_TRACKED_LOCKED if for_update else _TRACKED, {"email": email_id}).first()
    return None if row is None else TrackedEmail(*row)


def email_has_event(session: Session, email_id: str, name: str) -> bool:
    return session.connection().execute(_HAS_EVENT, {"email": email_id, "name": name}).first() is not None
