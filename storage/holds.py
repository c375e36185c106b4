"""Parked outbox rows: mail that must wait for something other than time (its domain's DKIM record, its
campaign's resume). A parked row's `due_at` is `PARKED`, beyond every claim, and its `hold` says why; a
release makes it due now. The partial index `ix_outbox_hold` holds only parked rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.models import OutboxItem, utcnow

_OUTBOX = OutboxItem.__table__

PARKED = datetime(9999, 1, 1, tzinfo=UTC)
"""The due time of a parked outbox row (`OutboxItem.hold` says why): no claim reaches it until released."""
HOLD_DKIM = "DKIM"
"""Its sender domain's DKIM record is missing (`domaincheck/`): sent, signed, once the record is back."""
HOLD_PAUSED = "PAUSED"
"""Its campaign is paused (`pipeline.reputation`): sent when a user resumes the campaign."""


def park(session: Session, outbox_id: str, hold: str) -> None:
    """Take a claimed row out of the due ones until it is released (`hold` says why); its email stays QUEUED."""
    session.connection().execute(update(OutboxItem).where(_OUTBOX.c.id == outbox_id).values(
        due_at=PARKED, hold=hold, claimed_by=None))


def release(session: Session, hold: str, *where: Any) -> int:
    """Make the rows parked for `hold` (and matching `where`, on the outbox's columns) due now; how many."""
    return session.connection().execute(update(OutboxItem).where(_OUTBOX.c.hold == hold, *where).values(
        due_at=utcnow(), hold=None)).rowcount


def held_count(session: Session, hold: str) -> int:
    """Rows parked for `hold` (for /metrics): a range of the partial index `ix_outbox_hold`."""
    count = select(func.count()).select_from(_OUTBOX).where(_OUTBOX.c.hold == hold)
    return session.connection().execute(count).scalar_one()
