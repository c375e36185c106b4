"""A project's sending reputation: daily counters of sends, hard bounces and complaints, and where its rates
stood when last judged (`pipeline.reputation` holds the rules).

Counters, not counts: a send adds one to its project's row for the day (written at commit with the batch's
others, to the shard the transaction drew, as `storage.system.count_settled` does), so judging a project's
last seven days reads at most 8 days × `SHARDS` rows by primary-key range, whatever it sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, bindparam, delete, func, select
from sqlalchemy.orm import Session

from storage.batch import write_at_commit, write_in_key_order
from storage.fastpath import insert_for
from storage.models import ReputationDay, ReputationState, utcnow

DAYS = ReputationDay.__table__
STATES = ReputationState.__table__
SHARDS = 16
_SHARD_KEY = "plunkd.reputation_shard"
_ADD: dict[str, Insert] = {}
WINDOW_DAYS = 7
KEEP_DAYS = WINDOW_DAYS + 1
"""Days of rows kept (pruned by the heartbeat): the window, and the day it began in."""
OK, WARN, PAUSE = "OK", "WARN", "PAUSE"
LEVELS = (OK, WARN, PAUSE)


def day_of(at: datetime) -> int:
    return int(at.timestamp()) // 86_400


def _add(session: Session) -> Insert:
    dialect = session.get_bind().dialect.name
    if dialect not in _ADD:
        insert = insert_for(dialect)(DAYS)
        _ADD[dialect] = write_in_key_order(insert.on_conflict_do_update(
            index_elements=[DAYS.c.project_id, DAYS.c.day, DAYS.c.shard],
            set_={name: DAYS.c[name] + insert.excluded[name] for name in ("sent", "bounced", "complained")}),
            lambda row: (row["project_id"], row["day"], row["shard"]))
    return _ADD[dialect]


def _row(session: Session, project_id: str, at: datetime, sent: int = 0, bounced: int = 0,
         complained: int = 0) -> dict[str, Any]:
    shard = session.info.setdefault(_SHARD_KEY, random.randrange(SHARDS))
    return {"project_id": project_id, "day": day_of(at), "shard": shard, "sent": sent, "bounced": bounced,
            "complained": complained}


def count_sent(session: Session, project_id: str, at: datetime) -> None:
    """One more email sent by the project, written at commit with the batch's other rows."""
    write_at_commit(session, _add(session), _row(session, project_id, at, sent=1))


def count_feedback(session: Session, project_id: str, at: datetime, bounced: int = 0, complained: int = 0) -> None:
    """A hard bounce or a complaint, written at commit like the sends (every row of the table is locked in key
    order at commit, so concurrent transactions never deadlock on them)."""
    write_at_commit(session, _add(session), _row(session, project_id, at, bounced=bounced, complained=complained))


@dataclass(frozen=True)
class Window:
    sent: int
    bounced: int
    complained: int

    def plus(self, bounced: int = 0, complained: int = 0) -> Window:
        return Window(self.sent, self.bounced + bounced, self.complained + complained)

    @property
    def bounce_rate(self) -> float:
        return self.bounced / self.sent if self.sent else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complained / self.sent if self.sent else 0.0


_WINDOW = select(func.coalesce(func.sum(DAYS.c.sent), 0), func.coalesce(func.sum(DAYS.c.bounced), 0),
                 func.coalesce(func.sum(DAYS.c.complained), 0)).where(
    DAYS.c.project_id == bindparam("project_id"), DAYS.c.day >= bindparam("first"), DAYS.c.day <= bindparam("last"))


def window(session: Session, project_id: str, first_day: int, last_day: int) -> Window:
    """The project's counts from `first_day` to `last_day` (both included): one primary-key range."""
    sent, bounced, complained = session.connection().execute(
        _WINDOW, {"project_id": project_id, "first": first_day, "last": last_day}).one()
    return Window(int(sent), int(bounced), int(complained))


def windows(session: Session, first_day: int, last_day: int) -> dict[str, Window]:
    """Every project's counts over the days (for /metrics): the rows of those days, grouped by project."""
    rows = session.connection().execute(
        select(DAYS.c.project_id, func.sum(DAYS.c.sent), func.sum(DAYS.c.bounced), func.sum(DAYS.c.complained))
        .where(DAYS.c.day >= first_day, DAYS.c.day <= last_day).group_by(DAYS.c.project_id))
    return {project_id: Window(int(sent), int(bounced), int(complained))
            for project_id, sent, bounced, complained in rows}


def prune_days(session: Session, before_day: int) -> int:
    return session.connection().execute(delete(DAYS).where(DAYS.c.day < before_day)).rowcount


def get_state(session: Session, project_id: str, for_update: bool = False) -> ReputationState | None:
    stmt = select(ReputationState).where(ReputationState.project_id == project_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def state_for_update(session: Session, project_id: str) -> ReputationState:
    """The project's state row, locked for this transaction (made, at OK and not paused, when it has none)."""
    state = get_state(session, project_id, for_update=True)
    if state is None:
        insert = insert_for(session.get_bind().dialect.name)(STATES).values(
            project_id=project_id, bounce_level=OK, complaint_level=OK, marketing_paused=False, updated_at=utcnow())
        session.connection().execute(insert.on_conflict_do_nothing(index_elements=[STATES.c.project_id]))
        state = get_state(session, project_id, for_update=True)
        assert state is not None
    return state


_PAUSED = select(STATES.c.marketing_paused).where(STATES.c.project_id == bindparam("project_id"))


def marketing_paused(session: Session, project_id: str) -> bool:
    """Whether the guard paused the project's campaigns and workflow sends (one primary-key read)."""
    return bool(session.connection().execute(_PAUSED, {"project_id": project_id}).scalar())
