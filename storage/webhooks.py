"""Outbound webhook queries: endpoints, the endpoints listening for an event and queuing a delivery to each
(for `pipeline.events.record_event`, in the event's own transaction), claiming due deliveries with a
lease, recording each attempt, and the endpoint's failure streak.

Queuing costs nothing on the event path of a project without endpoints: a per-process cache holds, per
project, the event names and patterns its enabled endpoints listen for (`interest`, as `storage.workflows`
has one). An endpoint written in this process is forgotten at once and again at the
commit; one written by another process is seen within `INTEREST_TTL` seconds.

A delivery's lease is its due time, as in the outbox: a claim moves `due_at` to the end of the lease and
writes its own token into `claimed_by`; only that claim may record the outcome, and a delivery whose
sender died is due again when the lease runs out (at least once; the same `webhook-id` every time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from storage.batch import write_at_commit
from storage.claims import DueClaim
from storage.db import delete_some
from storage.interest import ProjectInterest
from storage.models import (
    Project,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    iso,
    new_id,
    utcnow,
)
from storage.pagination import Page, paginate

ENDPOINTS = WebhookEndpoint.__table__
DELIVERIES = WebhookDelivery.__table__
_INSERT_DELIVERY = DELIVERIES.insert()
PENDING, DELIVERED, FAILED = (WebhookDeliveryStatus.PENDING, WebhookDeliveryStatus.DELIVERED,
                              WebhookDeliveryStatus.FAILED)
STATUSES = tuple(WebhookDeliveryStatus)
SETTLED = (DELIVERED, FAILED)
ATTEMPT_LOG_CAP = 20
"""Attempts kept in a delivery's log (the latest); `attempts` counts them all."""
INTEREST_TTL = 2.0


# ---------------------------------------------------------------------------------------------------
# Which events a project's enabled endpoints listen for (the cheap test on every event).

_interest: ProjectInterest[frozenset[str]] = ProjectInterest("webhooks", INTEREST_TTL)
forget = _interest.forget


def endpoints_changed(session: Session, project_id: str) -> None:
    """Call in a transaction that writes a project's endpoints (see `storage.interest`)."""
    _interest.changed(session, project_id)


def interest(session: Session, project_id: str) -> frozenset[str]:
    """The names and patterns the project's enabled endpoints listen for, from the cache when fresh."""
    def load() -> frozenset[str]:
        rows = session.connection().execute(select(ENDPOINTS.c.events).where(
            ENDPOINTS.c.project_id == project_id, ENDPOINTS.c.enabled.is_(True))).scalars()
        return frozenset(name for events in rows if isinstance(events, list) for name in events)

    return _interest.get(session, project_id, load)


# ---------------------------------------------------------------------------------------------------
# Queuing deliveries.

_LISTENING = select(ENDPOINTS.c.id, ENDPOINTS.c.events).where(ENDPOINTS.c.project_id == bindparam("project_id"),
                                                              ENDPOINTS.c.enabled.is_(True))


def listening_endpoints(session: Session, project_id: str, names: frozenset[str]) -> list[str]:
    """The ids of the project's enabled endpoints whose `events` hold one of `names`."""
    rows = session.connection().execute(_LISTENING, {"project_id": project_id})
    return [row.id for row in rows if isinstance(row.events, list) and not names.isdisjoint(row.events)]


def queue_delivery(session: Session, endpoint_id: str, event_id: str | None, name: str, payload: dict[str, Any],
                   now: datetime) -> str:
    """One PENDING delivery due now, written at commit with the batch's others (`storage.batch`)."""
    delivery_id = new_id()
    write_at_commit(session, _INSERT_DELIVERY, {
        "id": delivery_id, "endpoint_id": endpoint_id, "event_id": event_id, "event_name": name, "payload": payload,
        "status": PENDING, "attempts": 0, "due_at": now, "claimed_by": None, "last_status": None,
        "last_error": None, "attempt_log": [], "created_at": now, "updated_at": now})
    return delivery_id


def queue_test(session: Session, endpoint: WebhookEndpoint, name: str, payload: dict[str, Any],
               now: datetime, event_id: str | None = None) -> WebhookDelivery:
    """A delivery of `payload` to this endpoint, due now, written at once (POST /webhooks/:id/test, and a
    resend of an earlier delivery, which names its event)."""
    delivery = WebhookDelivery(endpoint_id=endpoint.id, event_id=event_id, event_name=name, payload=payload,
                               status=PENDING, attempts=0, due_at=now, attempt_log=[], created_at=now,
                               updated_at=now)
    session.add(delivery)
    session.flush()
    return delivery


# ---------------------------------------------------------------------------------------------------
# Endpoints (the API's side).

def lock_project_webhooks(session: Session, project_id: str) -> None:
    """Serialize endpoint creation in one project until the transaction ends, so two concurrent creates
    cannot both pass the cap (PostgreSQL; SQLite's writer is already alone)."""
    session.execute(select(Project.id).where(Project.id == project_id).with_for_update(key_share=True))


def count_endpoints(session: Session, project_id: str) -> int:
    return session.execute(select(func.count()).select_from(ENDPOINTS)
                           .where(ENDPOINTS.c.project_id == project_id)).scalar_one()


def insert_endpoint(session: Session, project_id: str, url: str, events: list[str], secret: str,
                    enabled: bool) -> WebhookEndpoint:
    now = utcnow()
    endpoint = WebhookEndpoint(project_id=project_id, url=url, events=events, secret=secret, enabled=enabled,
                               consecutive_failures=0, created_at=now, updated_at=now,
                               disabled_reason=None if enabled else "disabled when created",
                               disabled_at=None if enabled else now)
    session.add(endpoint)
    session.flush()
    endpoints_changed(session, project_id)
    return endpoint


def get_endpoint(session: Session, project_id: str, endpoint_id: str,
                 for_update: bool = False) -> WebhookEndpoint | None:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id, WebhookEndpoint.id == endpoint_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def list_endpoints(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id),
                    WebhookEndpoint.id, limit, cursor)


def update_endpoint(session: Session, endpoint: WebhookEndpoint, url: str | None = None,
                    events: list[str] | None = None) -> WebhookEndpoint:
    if url is not None:
        endpoint.url = url
    if events is not None:
        endpoint.events = events
    endpoint.updated_at = utcnow()
    session.flush()
    endpoints_changed(session, endpoint.project_id)
    return endpoint


def enable_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """Enabled again, with its failure streak forgotten (deliveries failed meanwhile are not sent again)."""
    endpoint.enabled = True
    endpoint.consecutive_failures = 0
    endpoint.failing_since = endpoint.disabled_reason = endpoint.disabled_at = None
    endpoint.updated_at = utcnow()
    session.flush()
    endpoints_changed(session, endpoint.project_id)


def disable_endpoint(session: Session, endpoint_id: str, project_id: str, reason: str, now: datetime) -> int:
    """Disable the endpoint, saying why, and fail its pending deliveries (an event recorded while it is
    disabled queues nothing for it). Returns how many deliveries were failed."""
    session.connection().execute(update(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id).values(
        enabled=False, disabled_reason=reason[:2000], disabled_at=now, updated_at=now))
    endpoints_changed(session, project_id)
    return session.connection().execute(update(DELIVERIES).where(
        DELIVERIES.c.endpoint_id == endpoint_id, DELIVERIES.c.status == PENDING).values(
        status=FAILED, last_error=f"endpoint disabled: {reason}"[:2000], due_at=now, claimed_by=None,
        updated_at=now)).rowcount


def rotate_secret(session: Session, endpoint: WebhookEndpoint, secret: str, keep_old_until: datetime) -> None:
    """A new secret; the old one signs too (a second signature) until `keep_old_until`."""
    endpoint.previous_secret, endpoint.previous_secret_expires_at = endpoint.secret, keep_old_until
    endpoint.secret = secret
    endpoint.updated_at = utcnow()
    session.flush()


def delete_deliveries(session: Session, endpoint_id: str, limit: int) -> int:
    """A part of an endpoint's deletion (`storage.db.Database.write_in_chunks`): up to `limit` of its deliveries
    (a sender holding one of them records nothing)."""
    return delete_some(session, DELIVERIES, DELIVERIES.c.endpoint_id == endpoint_id, limit=limit)


def delete_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint and all its deliveries (a sender holding one of them records nothing)."""
    session.connection().execute(delete(DELIVERIES).where(DELIVERIES.c.endpoint_id == endpoint.id))
    session.delete(endpoint)
    session.flush()
    endpoints_changed(session, endpoint.project_id)


def list_deliveries(session: Session, endpoint_id: str, limit: int, cursor: str | None,
                    status: str | None = None, count: bool = True) -> Page:
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    return paginate(session, stmt, WebhookDelivery.id, limit, cursor, count)


def get_delivery(session: Session, endpoint_id: str, delivery_id: str) -> WebhookDelivery | None:
    return session.execute(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id,
                                                         WebhookDelivery.id == delivery_id)).scalar_one_or_none()


# ---------------------------------------------------------------------------------------------------
# The sender's side: claim due deliveries, record attempts, keep the endpoint's failure streak.

@dataclass
class ClaimedDelivery:
    id: str
    endpoint_id: str
    project_id: str
    event_name: str
    payload: dict[str, Any]
    attempts: int
    attempt_log: list[dict[str, Any]]
    created_at: datetime
    url: str
    secrets: list[str]
    """The endpoint's secret, and the one before a rotation while it still signs: one signature each."""
    claim: str
    """The claim's token (`claimed_by`): recording the outcome needs it still to be there."""


@dataclass(frozen=True)
class Attempt:
    at: datetime
    status: int | None
    """The HTTP status, or None when no reply came (refused, timed out, not allowed)."""
    duration_ms: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def as_log(self) -> dict[str, Any]:
        return {"at": iso(self.at), "status": self.status, "durationMs": self.duration_ms, "error": self.error}


@dataclass(frozen=True)
class Recorded:
    status: str
    disabled: str | None = None
    """The endpoint was disabled by this attempt's failure: why."""


_EARLIEST = select(func.min(DELIVERIES.c.due_at)).where(DELIVERIES.c.status == PENDING)
# Built once, with bind parameters: the sender runs these for every delivery, and building a statement
# costs more than the database's work.
_DUE = DueClaim(select(DELIVERIES.c.id).where(DELIVERIES.c.status == PENDING, DELIVERIES.c.due_at <= bindparam("now"))
                .order_by(DELIVERIES.c.due_at).limit(bindparam("limit")), lease=DELIVERIES)
_CLAIMED = (select(DELIVERIES.c.id, DELIVERIES.c.endpoint_id, ENDPOINTS.c.project_id, DELIVERIES.c.event_name,
                   DELIVERIES.c.payload, DELIVERIES.c.attempts, DELIVERIES.c.attempt_log, DELIVERIES.c.created_at,
                   ENDPOINTS.c.url, ENDPOINTS.c.secret, ENDPOINTS.c.previous_secret,
                   ENDPOINTS.c.previous_secret_expires_at, ENDPOINTS.c.enabled)
            .join(ENDPOINTS, ENDPOINTS.c.id == DELIVERIES.c.endpoint_id)
            .where(DELIVERIES.c.id.in_(bindparam("ids", expanding=True))).order_by(DELIVERIES.c.created_at))
_RECORD = (update(DELIVERIES).where(DELIVERIES.c.id == bindparam("delivery_id"),
                                    DELIVERIES.c.claimed_by == bindparam("claim"), DELIVERIES.c.status == PENDING)
           .values(status=bindparam("new_status"), attempts=DELIVERIES.c.attempts + 1, due_at=bindparam("due"),
                   claimed_by=None, last_status=bindparam("http_status"), last_error=bindparam("error"),
                   attempt_log=bindparam("log", type_=DELIVERIES.c.attempt_log.type), updated_at=bindparam("at")))
_STREAK_GROW = (update(ENDPOINTS).where(ENDPOINTS.c.id == bindparam("endpoint_id"), ENDPOINTS.c.enabled.is_(True))
                .values(consecutive_failures=ENDPOINTS.c.consecutive_failures + 1,
                        failing_since=func.coalesce(ENDPOINTS.c.failing_since,
                                                    bindparam("at", type_=ENDPOINTS.c.failing_since.type)))
                .returning(ENDPOINTS.c.consecutive_failures, ENDPOINTS.c.failing_since))


def earliest_due(session: Session) -> datetime | None:
    return session.connection().execute(_EARLIEST).scalar()


def claim_due(session: Session, now: datetime, limit: int, lease_seconds: float,
              postgres: bool) -> list[ClaimedDelivery]:
    """Up to `limit` due deliveries, longest due first, leased until now + `lease_seconds` under a new claim
    token (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so senders on several nodes share the work). A delivery
    whose endpoint was disabled meanwhile is failed here instead."""
    token = new_id()
    ids = [row.id for row in _DUE.claim(session, now, limit, postgres, now + timedelta(seconds=lease_seconds), token)]
    if not ids:
        return []
    conn = session.connection()
    claimed, orphaned = [], []
    for row in conn.execute(_CLAIMED, {"ids": ids}):
        if not row.enabled:
            orphaned.append(row.id)
            continue
        secrets = [row.secret]
        expires = row.previous_secret_expires_at
        if row.previous_secret and expires is not None and expires > now:
            secrets.append(row.previous_secret)
        log = list(row.attempt_log) if isinstance(row.attempt_log, list) else []
        claimed.append(ClaimedDelivery(row.id, row.endpoint_id, row.project_id, row.event_name, row.payload,
                                       row.attempts, log, row.created_at, row.url, secrets, token))
    if orphaned:
        conn.execute(update(DELIVERIES).where(DELIVERIES.c.id.in_(orphaned)).values(
            status=FAILED, last_error="endpoint disabled", due_at=now, claimed_by=None, updated_at=now))
    return claimed


_LOCK_ENDPOINTS = (select(ENDPOINTS.c.id).where(ENDPOINTS.c.id.in_(bindparam("endpoint_ids", expanding=True)))
                   .order_by(ENDPOINTS.c.id).with_for_update(key_share=True))
"""FOR NO KEY UPDATE: an event queuing a delivery (a foreign key to the endpoint) does not wait for it."""
_HELD = select(DELIVERIES.c.id, DELIVERIES.c.claimed_by).where(
    DELIVERIES.c.id.in_(bindparam("ids", expanding=True)), DELIVERIES.c.status == PENDING)
_HELD_LOCKED = _HELD.with_for_update()
_STREAKS_RESET = (update(ENDPOINTS).where(ENDPOINTS.c.id.in_(bindparam("endpoint_ids", expanding=True)),
                                          ENDPOINTS.c.consecutive_failures > 0)
                  .values(consecutive_failures=0, failing_since=None))


@dataclass(frozen=True)
class Outcome:
    """One attempt to record: the claimed delivery, what happened, and when to retry after a failure (None:
    it gives up now)."""

    delivery: ClaimedDelivery
    attempt: Attempt
    retry_at: datetime | None


def record_attempts(session: Session, outcomes: list[Outcome], disable_after_failures: int,
                    disable_after_seconds: float) -> list[Recorded | None]:
    """Record what each attempt did to its delivery (DELIVERED on a 2xx, else PENDING again at `retry_at`, or
    FAILED when that is None) and to its endpoint's failure streak, disabling the endpoint when the streak is
    at least `disable_after_failures` attempts over at least `disable_after_seconds`. An outcome whose claim
    no longer holds its delivery (the lease ran out and another sender took it, or the endpoint was disabled
    or deleted meanwhile) writes nothing: its result is None.

    The sender records what finished meanwhile in one go: the delivered ones with one executemany (after
    reading which of them each claim still holds) and one statement for their endpoints' streaks. On
    PostgreSQL the endpoints' rows are locked first, in id order, as the API locks an endpoint before its
    deliveries: senders on several nodes and the API never wait for each other in a circle."""
    results: list[Recorded | None] = [None] * len(outcomes)
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        session.connection().execute(_LOCK_ENDPOINTS, {"endpoint_ids": sorted(
            {outcome.delivery.endpoint_id for outcome in outcomes})})
    delivered = [index for index, outcome in enumerate(outcomes) if outcome.attempt.ok]
    if delivered:
        conn = session.connection()
        held_query = _HELD_LOCKED if postgres else _HELD
        held = dict(conn.execute(held_query, {"ids": [outcomes[index].delivery.id for index in delivered]}).all())
        mine = [index for index in delivered if held.get(outcomes[index].delivery.id) == outcomes[index].delivery.claim]
        if mine:
            conn.execute(_RECORD, [_record_params(outcomes[index]) for index in mine])
            conn.execute(_STREAKS_RESET, {"endpoint_ids": sorted({outcomes[index].delivery.endpoint_id
                                                                  for index in mine})})
        for index in mine:
            results[index] = Recorded(DELIVERED)
    for index, outcome in enumerate(outcomes):
        if not outcome.attempt.ok:
            results[index] = _record_one(session, outcome, disable_after_failures, disable_after_seconds)
    return results


def _record_params(outcome: Outcome) -> dict[str, Any]:
    delivery, attempt, retry_at = outcome.delivery, outcome.attempt, outcome.retry_at
    status = DELIVERED if attempt.ok else (PENDING if retry_at is not None else FAILED)
    error = attempt.error
    if status == FAILED:
        error = f"gave up after {delivery.attempts + 1} attempts: {attempt.error}"
    return {"delivery_id": delivery.id, "claim": delivery.claim, "new_status": status,
            "due": retry_at if status == PENDING else attempt.at, "http_status": attempt.status,
            "error": None if attempt.ok or error is None else error[:2000],
            "log": [*delivery.attempt_log, attempt.as_log()][-ATTEMPT_LOG_CAP:], "at": attempt.at}


def _record_one(session: Session, outcome: Outcome, disable_after_failures: int,
                disable_after_seconds: float) -> Recorded | None:
    conn = session.connection()
    params = _record_params(outcome)
    if not conn.execute(_RECORD, params).rowcount:
        return None
    status, delivery, attempt = params["new_status"], outcome.delivery, outcome.attempt
    if attempt.ok:
        conn.execute(_STREAKS_RESET, {"endpoint_ids": [delivery.endpoint_id]})
        return Recorded(status)
    streak = conn.execute(_STREAK_GROW, {"endpoint_id": delivery.endpoint_id, "at": attempt.at}).first()
    if streak is None:  # disabled meanwhile
        return Recorded(status)
    since = streak.failing_since
    if (streak.consecutive_failures >= disable_after_failures
            and (attempt.at - since).total_seconds() >= disable_after_seconds):
        reason = (f"{streak.consecutive_failures} consecutive failed attempts since {iso(since)}; "
                  f"the last: {attempt.error}")
        disable_endpoint(session, delivery.endpoint_id, delivery.project_id, reason, attempt.at)
        return Recorded(FAILED if status == PENDING else status, reason)
    return Recorded(status)


def prune_settled(session: Session, before: datetime, limit: int) -> int:
    """Delete up to `limit` deliveries that settled before `before`; returns how many."""
    ids = session.connection().execute(select(DELIVERIES.c.id).where(
        DELIVERIES.c.status.in_(SETTLED), DELIVERIES.c.due_at < before).limit(limit)).scalars().all()
    if not ids:
        return 0
    return session.connection().execute(delete(DELIVERIES).where(DELIVERIES.c.id.in_(ids))).rowcount

