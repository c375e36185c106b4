"""What the system page reads and the processes write for it: the node registry (one row per running
process, its heartbeat), the per-minute send rollup, and the outbox's depth per priority.

Every query here is bounded: the nodes table holds the processes of the last day, the rollup at most
`ROLLUP_KEEP_MINUTES` × `SHARDS` rows (read by primary-key range), and the outbox counts stop at `COUNT_CAP` rows
each (an index range each; the partial index `ix_outbox_leased` holds only the leased rows).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, delete, func, select
from sqlalchemy.orm import Session

from storage.batch import write_at_commit
from storage.fastpath import insert_for
from storage.models import Node, OutboxItem, SendMinute

NODES = Node.__table__
MINUTES = SendMinute.__table__
_OUTBOX = OutboxItem.__table__
COUNT_CAP = 1_000
"""Outbox rows counted per figure at most: the page shows "1000+" beyond (/metrics has the exact depth)."""
ROLLUP_KEEP_MINUTES = 2 * 24 * 60
SHARDS = 16
_SHARD_KEY = "plunkd.send_minute_shard"


# ---------------------------------------------------------------------------------------------------
# Nodes.

def heartbeat(session: Session, node: dict[str, Any]) -> None:
    """Insert the process's row, or move its `last_heartbeat` (a row pruned meanwhile comes back)."""
    insert = insert_for(session.get_bind().dialect.name)(NODES).values(**node)
    session.connection().execute(insert.on_conflict_do_update(index_elements=[NODES.c.id], set_={
        "last_heartbeat": insert.excluded.last_heartbeat, "roles": insert.excluded.roles}))


def remove_node(session: Session, node_id: str) -> None:
    session.connection().execute(delete(NODES).where(NODES.c.id == node_id))


def prune_nodes(session: Session, unseen_since: datetime) -> int:
    return session.connection().execute(delete(NODES).where(NODES.c.last_heartbeat < unseen_since)).rowcount


def list_nodes(session: Session) -> list[Node]:
    return list(session.execute(select(Node).order_by(Node.hostname, Node.started_at, Node.id)).scalars())


# ---------------------------------------------------------------------------------------------------
# Sends per minute.

_ADD_MINUTE: dict[str, Insert] = {}


def _add_minute(session: Session) -> Insert:
    dialect = session.get_bind().dialect.name
    if dialect not in _ADD_MINUTE:
        insert = insert_for(dialect)(MINUTES)
        _ADD_MINUTE[dialect] = insert.on_conflict_do_update(
            index_elements=[MINUTES.c.minute, MINUTES.c.shard],
            set_={"sent": MINUTES.c.sent + insert.excluded.sent, "failed": MINUTES.c.failed + insert.excluded.failed})
    return _ADD_MINUTE[dialect]


def minute_of(at: datetime) -> int:
    return int(at.timestamp()) // 60


def count_settled(session: Session, at: datetime, sent: bool) -> None:
    """Add one sent (or failed) email to `at`'s minute, in the transaction recording it; the batch writes
    its rows with one executemany at commit (`storage.batch.write_at_commit`), all to the shard the
    transaction drew (one shard per transaction: two transactions never lock each other's rows in
    opposite orders)."""
    shard = session.info.setdefault(_SHARD_KEY, random.randrange(SHARDS))
    write_at_commit(session, _add_minute(session), {"minute": minute_of(at), "shard": shard, "sent": int(sent),
                                                     "failed": int(not sent)})


def send_minutes(session: Session, first: int, last: int) -> dict[int, tuple[int, int]]:
    """(sent, failed) per minute from `first` to `last` (epoch minutes, both included), summed over the
    shards (a primary-key range); minutes without a row sent nothing."""
    rows = session.connection().execute(
        select(MINUTES.c.minute, func.sum(MINUTES.c.sent).label("sent"), func.sum(MINUTES.c.failed).label("failed"))
        .where(MINUTES.c.minute >= first, MINUTES.c.minute <= last).group_by(MINUTES.c.minute))
    return {row.minute: (int(row.sent), int(row.failed)) for row in rows}


def prune_send_minutes(session: Session, before: int) -> int:
    return session.connection().execute(delete(MINUTES).where(MINUTES.c.minute < before)).rowcount


# ---------------------------------------------------------------------------------------------------
# The outbox.

@dataclass
class QueueDepth:
    priority: int
    due: int
    """Due now and not leased (waiting for a dispatcher)."""
    later: int
    """Due later (a retry's backoff, a scheduled send) and not leased."""
    leased: int
    """Being sent: a dispatcher holds it until its lease ends."""
    oldest_due: datetime | None


def _capped_count(*where: Any) -> Any:
    capped = select(_OUTBOX.c.id).where(*where).limit(COUNT_CAP + 1).subquery()
    return select(func.count()).select_from(capped).scalar_subquery()


def queue_depths(session: Session, now: datetime, priorities: tuple[int, ...]) -> list[QueueDepth]:
    """Per priority: rows due now, due later, leased (each counted up to COUNT_CAP + 1), and the earliest due
    time of the rows due now. A lease moves `due_at` to its end, so leased rows are the later ones with a
    `claimed_by`; a lease that ran out is due again. One statement of scalar subqueries (four a priority),
    each an index range on (priority, due_at)."""
    leased_now = _OUTBOX.c.claimed_by.isnot(None)
    figures = []
    for priority in priorities:
        at = _OUTBOX.c.priority == priority
        figures += [_capped_count(at, _OUTBOX.c.due_at <= now), _capped_count(at, _OUTBOX.c.due_at > now),
                    _capped_count(at, _OUTBOX.c.due_at > now, leased_now),
                    select(func.min(_OUTBOX.c.due_at)).where(at, _OUTBOX.c.due_at <= now).scalar_subquery()]
    row = session.connection().execute(select(*figures)).one()
    depths = []
    for index, priority in enumerate(priorities):
        due, later, leased, oldest = row[4 * index:4 * index + 4]
        depths.append(QueueDepth(priority, due, later if later > COUNT_CAP else later - leased, leased, oldest))
    return depths
