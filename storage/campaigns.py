"""Campaign queries: the rows, the audience, the fan-out into emails and the outbox, cancel, stats.

The fan-out writes one chunk of recipients per transaction together with the cursor that says how far
it got, so a process killed mid fan-out resumes after the last committed chunk; the unique index on
emails (campaign_id, contact_id) makes a second email to the same contact impossible whatever happens.
On PostgreSQL several chunks may run at once as ranges between audience ids (`audience_bounds`), the cursor
moved past them once all are committed; a range run again skips the contacts it already queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Integer,
    SmallInteger,
    String,
    Text,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from storage.emails import message_id_domain
from storage.fastpath import insert_for
from storage.holds import HOLD_PAUSED, PARKED, release
from storage.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Email,
    EmailStatus,
    Event,
    OutboxItem,
    UTCDateTime,
    new_id,
)
from storage.pagination import Page, keyset_page, paginate
from storage.segments import _DataText as json_text  # `data[key]` as text on both databases
from storage.segments import condition_clause

CAMPAIGN_PRIORITY = 1
"""Outbox priority of campaign mail: claimed after every transactional email due (priority 0)."""
_CONTACT = Contact.__table__
_EMAIL = Email.__table__
_OUTBOX = OutboxItem.__table__
_CAMPAIGN = Campaign.__table__
FEEDBACK_EVENTS = {"email.delivery": "delivered", "email.open": "opened", "email.click": "clicked",
                   "email.bounce": "bounced", "email.complaint": "complained", "contact.unsubscribed": "unsubscribed"}


def get_campaign(session: Session, project_id: str, campaign_id: str, for_update: bool = False) -> Campaign | None:
    stmt = select(Campaign).where(Campaign.project_id == project_id, Campaign.id == campaign_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def campaign_status(session: Session, campaign_id: str) -> str | None:
    """The campaign's status; None: it was deleted."""
    return session.connection().execute(select(_CAMPAIGN.c.status).where(_CAMPAIGN.c.id == campaign_id)).scalar()


def get_campaign_by_id(session: Session, campaign_id: str, for_update: bool = False,
                       key_share: bool = False) -> Campaign | None:
    """`for_update`: the row locked for this transaction. `key_share`: locked only against a change of its key
    or a `for_update` lock (PostgreSQL's FOR KEY SHARE), so fan-out ranges hold it at once while a cancel or a
    pause waits for them, and each may still add to its counts."""
    stmt = select(Campaign).where(Campaign.id == campaign_id)
    if for_update or key_share:
        stmt = stmt.with_for_update(read=key_share, key_share=key_share)
    return session.execute(stmt).scalar_one_or_none()


def list_campaigns(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(Campaign).where(Campaign.project_id == project_id), Campaign.id, limit, cursor)


def insert_campaign(session: Session, project_id: str, fields: dict[str, Any]) -> Campaign:
    campaign = Campaign(project_id=project_id, **fields)
    session.add(campaign)
    session.flush()
    return campaign


def delete_campaign(session: Session, campaign: Campaign) -> None:
    session.delete(campaign)
    session.flush()


def known_recipients(session: Session, project_id: str, ids: list[str], emails: list[str]) -> tuple[set[str], set[str]]:
    """Which of these contact ids and emails exist in the project."""
    found_ids: set[str] = set()
    found_emails: set[str] = set()
    if ids:
        found_ids = set(session.execute(select(_CONTACT.c.id).where(
            _CONTACT.c.project_id == project_id, _CONTACT.c.id.in_(ids))).scalars())
    if emails:
        found_emails = set(session.execute(select(_CONTACT.c.email).where(
            _CONTACT.c.project_id == project_id, _CONTACT.c.email.in_(emails))).scalars())
    return found_ids, found_emails


@dataclass(frozen=True)
class Audience:
    """Who a campaign goes to, as data the fan-out turns into SQL: all subscribed contacts, those in
    a segment (its condition tree), or those named in a list (contact ids and emails)."""

    kind: str  # ALL, SEGMENT or LIST
    condition: dict[str, Any] | None = None
    ids: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()

    def clause(self, now: datetime) -> ColumnElement[bool]:
        if self.kind == "SEGMENT":
            return condition_clause(self.condition or {}, now)
        if self.kind == "LIST":
            return or_(_CONTACT.c.id.in_(self.ids), _CONTACT.c.email.in_(self.emails))
        return true()


def _audience_rows(project_id: str, audience: Audience, now: datetime) -> Any:
    return select(_CONTACT.c.id, _CONTACT.c.email).where(
        _CONTACT.c.project_id == project_id, _CONTACT.c.subscribed.is_(True), audience.clause(now))


def count_audience(session: Session, project_id: str, audience: Audience, now: datetime) -> int:
    stmt = select(func.count()).select_from(_audience_rows(project_id, audience, now).subquery())
    return session.execute(stmt).scalar_one()


def campaigns_to_start(session: Session, now: datetime, limit: int = 10) -> list[Campaign]:
    """Scheduled campaigns now due, and SENDING ones whose fan-out has not finished (a process died
    in it), oldest first."""
    stmt = select(Campaign).where(or_(
        (Campaign.status == CampaignStatus.SCHEDULED) & (Campaign.scheduled_at <= now),
        (Campaign.status == CampaignStatus.SENDING) & Campaign.fanout_done.is_(False))
    ).order_by(Campaign.scheduled_at).limit(limit)
    return list(session.execute(stmt).scalars())


def _derived_ids(prefix: str, ids: Any) -> Any:
    """Ids for rows made in SQL from other rows: a fresh UUIDv7's time-and-counter head (18 characters,
    taken once per chunk) and the 62 random bits of the source row's id. They stay time-ordered (the
    retention pruner and pagination rely on it) and unique: the head is never reused by this process,
    and within a chunk the source ids differ in their random bits."""
    return literal(prefix, String) + func.substr(ids, 19)


def refresh_audience_statistics(session: Session) -> None:
    """PostgreSQL: ANALYZE contacts before a fan-out. Contacts imported in bulk since autovacuum last
    looked leave the planner thinking the table holds a handful of rows; it then reads every remaining
    contact and sorts them for each chunk's `ORDER BY id LIMIT` instead of walking the index (100,000
    contacts: each chunk read the rest, and the fan-out grew quadratic). A sample of the table, each time a
    fan-out starts (`marketing.fanout.CampaignFanOut.start`), in a transaction of its own."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE contacts"))


def refresh_email_statistics(session: Session, inserted: int) -> None:
    """PostgreSQL, in a campaign's first chunk, between its emails and their outbox rows: ANALYZE emails if the
    planner believes it holds fewer rows than the chunk just put in. Each outbox row's foreign-key check looks its
    email up with a plan the connection keeps until the table's statistics change; planned on a table last
    analyzed empty (after a prune, say) it is a sequential scan, so every chunk read the whole table once per row
    (100,000 recipients into emails analyzed empty: 28-66 s instead of 5.4 s, each chunk slower than the last).
    ANALYZE counts this transaction's own rows and makes every connection plan again."""
    if session.get_bind().dialect.name != "postgresql":
        return
    believed = session.execute(text("SELECT reltuples FROM pg_class WHERE oid = 'emails'::regclass")).scalar_one()
    if 0 <= believed < inserted:
        session.execute(text("ANALYZE emails"))


def _queue_recipients(session: Session, campaign: Campaign, audience: Audience, sender: str, envelope_sender: str,
                      now: datetime, track_opens: bool, track_clicks: bool, after: str | None,
                      upto: str | None) -> int:
    """Queue the audience's contacts after `after` up to `upto` (each end open when None), an email and an
    outbox row each, with two `INSERT … SELECT`s (no row passes through Python).
    The emails carry the tracking choice given and their Message-IDs (what `storage.emails.generated_message_id`
    makes, in SQL). A contact the campaign already has an email for is skipped: on PostgreSQL ranges run at once,
    and one may run again after a crash. Returns how many were queued."""
    conn = session.connection()
    email_head, outbox_head = new_id()[:18], new_id()[:18]
    email_id = _derived_ids(email_head, _CONTACT.c.id)
    message_id = literal("<", String) + email_id + literal(f"@{message_id_domain(sender)}>", String)
    recipients = _audience_rows(campaign.project_id, audience, now).with_only_columns(
        email_id, literal(campaign.project_id, String), _CONTACT.c.id,
        literal(campaign.content_id, String), literal(campaign.id, String), _CONTACT.c.email,
        literal(sender, String), literal(envelope_sender, String), literal(campaign.subject, Text),
        literal("campaign", String),
        literal(EmailStatus.QUEUED, String), literal(now, UTCDateTime), literal(track_opens, Boolean),
        literal(track_clicks, Boolean), message_id).order_by(_CONTACT.c.id)
    if after is not None:
        recipients = recipients.where(_CONTACT.c.id > after)
    if upto is not None:
        recipients = recipients.where(_CONTACT.c.id <= upto)
    columns = ["id", "project_id", "contact_id", "content_id", "campaign_id", "recipient", "sender",
               "envelope_sender", "subject", "source", "status", "created_at", "track_opens", "track_clicks",
               "message_id"]
    queued = conn.execute(insert_for(conn.dialect.name)(_EMAIL).from_select(columns, recipients).on_conflict_do_nothing(
        index_elements=[_EMAIL.c.campaign_id, _EMAIL.c.contact_id], index_where=_EMAIL.c.campaign_id.is_not(None))
    ).rowcount
    if queued and campaign.recipient_count == 0:
        refresh_email_statistics(session, queued)
    if queued:
        this_call = (_EMAIL.c.id > email_head) & (_EMAIL.c.id < email_head + "~")
        conn.execute(_OUTBOX.insert().from_select(
            ["id", "email_id", "due_at", "attempts", "priority", "campaign_id"],
            select(_derived_ids(outbox_head, _EMAIL.c.id), _EMAIL.c.id, literal(now, UTCDateTime),
                   literal(0, Integer), literal(CAMPAIGN_PRIORITY, SmallInteger), literal(campaign.id, String))
            .where(this_call)))
    return queued


def fan_out_chunk(session: Session, campaign: Campaign, audience: Audience, sender: str, envelope_sender: str,
                  chunk: int, now: datetime, track_opens: bool = False, track_clicks: bool = False) -> int:
    """Queue the next `chunk` recipients after the cursor (`_queue_recipients`) and move the cursor to the last
    of them; when fewer remain, queue the rest and mark the fan-out done. The caller holds the campaign's row.
    Returns how many were queued (on PostgreSQL, fewer if a range run before a crash queued some)."""
    upto = next(iter(audience_bounds(session, campaign.project_id, audience, now, campaign.fanout_cursor, chunk, 1)),
                None)
    queued = _queue_recipients(session, campaign, audience, sender, envelope_sender, now, track_opens, track_clicks,
                               campaign.fanout_cursor, upto)
    campaign.recipient_count += queued
    if upto is None:
        campaign.fanout_done = True
    else:
        campaign.fanout_cursor = upto
    session.flush()
    return queued


def fan_out_range(session: Session, campaign: Campaign, audience: Audience, sender: str, envelope_sender: str,
                  after: str | None, upto: str | None, now: datetime, track_opens: bool = False,
                  track_clicks: bool = False) -> int:
    """PostgreSQL: queue the recipients after `after` up to `upto` (`_queue_recipients`), beside other ranges of
    the same campaign in transactions of their own, and count them in the campaign; the cursor is the caller's
    to move once every range below it is committed. Returns how many were queued."""
    queued = _queue_recipients(session, campaign, audience, sender, envelope_sender, now, track_opens, track_clicks,
                               after, upto)
    if queued:
        session.execute(update(Campaign).where(Campaign.id == campaign.id).values(
            recipient_count=Campaign.recipient_count + queued).execution_options(synchronize_session=False))
    return queued


def audience_bounds(session: Session, project_id: str, audience: Audience, now: datetime, after: str | None,
                    chunk: int, ranges: int) -> list[str]:
    """The upper ends of the next `ranges` ranges of `chunk` audience contacts after `after`: the id of every
    `chunk`-th one, in order (each an index walk of `chunk` entries). Fewer than `ranges`: fewer contacts remain
    than the ranges would hold, and the rest after the last end is the final range."""
    bounds: list[str] = []
    while len(bounds) < ranges:
        rows = _audience_rows(project_id, audience, now).with_only_columns(_CONTACT.c.id)
        if after is not None:
            rows = rows.where(_CONTACT.c.id > after)
        after = session.execute(rows.order_by(_CONTACT.c.id).offset(chunk - 1).limit(1)).scalar_one_or_none()
        if after is None:
            break
        bounds.append(after)
    return bounds


def drained_campaigns(session: Session) -> list[str]:
    """SENDING campaigns whose fan-out is done and whose last email has left the outbox."""
    queued = select(_OUTBOX.c.id).where(_OUTBOX.c.campaign_id == _CAMPAIGN.c.id).exists()
    return list(session.execute(select(_CAMPAIGN.c.id).where(
        _CAMPAIGN.c.status == CampaignStatus.SENDING, _CAMPAIGN.c.fanout_done.is_(True), ~queued)).scalars())


def finish_drained(session: Session, now: datetime) -> list[str]:
    """Campaigns whose fan-out is done and whose last email has left the outbox become SENT."""
    done = drained_campaigns(session)
    if done:
        session.execute(update(Campaign).where(Campaign.id.in_(done)).values(
            status=CampaignStatus.SENT, finished_at=now, updated_at=now))
    return list(done)


CANCELLED_ERROR = "campaign cancelled"


def pausable_campaigns(session: Session, project_id: str) -> list[Campaign]:
    """The project's scheduled and sending campaigns, locked for this transaction (the reputation guard)."""
    stmt = select(Campaign).where(Campaign.project_id == project_id, Campaign.status.in_(
        (CampaignStatus.SCHEDULED, CampaignStatus.SENDING))).order_by(Campaign.id).with_for_update()
    return list(session.execute(stmt).scalars())


def parkable_count(session: Session, campaign_id: str) -> int:
    """The campaign's emails waiting in the outbox, neither claimed by a dispatcher nor parked: what a pause parks
    (one index range)."""
    return session.connection().execute(select(func.count()).select_from(_OUTBOX).where(
        _OUTBOX.c.campaign_id == campaign_id, _OUTBOX.c.claimed_by.is_(None), _OUTBOX.c.hold.is_(None))).scalar_one()


@dataclass
class EmailWalk:
    """How far a part-at-a-time walk over a campaign's emails, in id order, has gone, and how many it changed."""

    campaign_id: str
    after: str = ""
    changed: int = 0


def park_queued(session: Session, walk: EmailWalk, limit: int) -> int:
    """Pause, a part at a time (`storage.db.Database.write_in_chunks`): the campaign's next `limit` emails after
    `walk.after`; those waiting in the outbox (neither claimed nor parked) are parked. Returns how many emails it
    looked at (fewer than `limit`: the end). The walk goes by `ix_emails_campaign_id_id`: the outbox's campaign
    index is in no useful order, and every part would read the rows parked by those before it again. Those a
    dispatcher holds it parks itself when it sees the campaign's status."""
    ids = list(session.execute(select(_EMAIL.c.id).where(
        _EMAIL.c.campaign_id == walk.campaign_id, _EMAIL.c.id > walk.after).order_by(_EMAIL.c.id).limit(limit))
        .scalars())
    if ids:
        walk.after = ids[-1]
        walk.changed += session.connection().execute(update(OutboxItem).where(
            _OUTBOX.c.email_id.in_(ids), _OUTBOX.c.claimed_by.is_(None), _OUTBOX.c.hold.is_(None)).values(
            due_at=PARKED, hold=HOLD_PAUSED)).rowcount
    return len(ids)


def paused_campaigns(session: Session) -> list[tuple[str, datetime]]:
    """(id, last change) of every PAUSED campaign: one range of `ix_campaigns_status_scheduled_at`."""
    return [(row.id, row.updated_at) for row in session.execute(
        select(_CAMPAIGN.c.id, _CAMPAIGN.c.updated_at).where(_CAMPAIGN.c.status == CampaignStatus.PAUSED))]


def release_parked(session: Session, campaign_id: str, limit: int) -> int:
    """Resume, a part at a time (`storage.db.Database.write_in_chunks`): up to `limit` of the campaign's parked
    emails are due now. Returns how many (fewer than `limit`: none is left)."""
    parked = select(_OUTBOX.c.id).where(_OUTBOX.c.hold == HOLD_PAUSED,
                                        _OUTBOX.c.campaign_id == campaign_id).limit(limit)
    return release(session, HOLD_PAUSED, _OUTBOX.c.id.in_(parked))


def campaigns_parked_but_not_paused(session: Session) -> list[str]:
    """Campaigns with emails parked for a pause that is over: a resume whose release (a part at a time) a crash
    cut short. Once per process start (`marketing.fanout`): the parked rows are one range of `ix_outbox_hold`."""
    return list(session.execute(select(_OUTBOX.c.campaign_id).distinct().where(
        _OUTBOX.c.hold == HOLD_PAUSED, _OUTBOX.c.campaign_id == _CAMPAIGN.c.id,
        _CAMPAIGN.c.status != CampaignStatus.PAUSED)).scalars())


def withdraw_queued(session: Session, campaign_id: str, limit: int) -> int:
    """Cancel, a part at a time (`storage.db.Database.write_in_chunks`): take up to `limit` of the campaign's emails
    waiting in the outbox out of it and mark them CANCELLED. Returns how many (fewer than `limit`: none is left).
    Those a dispatcher holds, or is claiming right now (locked, skipped on PostgreSQL), stay; it cancels them
    itself when it sees the campaign's status (`campaign_status`)."""
    waiting = session.execute(select(_OUTBOX.c.id, _OUTBOX.c.email_id).where(
        _OUTBOX.c.campaign_id == campaign_id, _OUTBOX.c.claimed_by.is_(None)).limit(limit)
        .with_for_update(skip_locked=True)).all()
    if waiting:
        session.execute(update(_EMAIL).where(_EMAIL.c.id.in_([row.email_id for row in waiting])).values(
            status=EmailStatus.CANCELLED, error=CANCELLED_ERROR))
        session.execute(delete(_OUTBOX).where(_OUTBOX.c.id.in_([row.id for row in waiting])))
    return len(waiting)


def _tally(stats: dict[str, int], status: str, sent: bool, count: int) -> None:
    """Add `count` emails of this state to sent, queued, cancelled or failed (what the API's stats say)."""
    if sent:
        stats["sent"] += count
    elif status == EmailStatus.QUEUED:
        stats["queued"] += count
    elif status == EmailStatus.CANCELLED:
        stats["cancelled"] += count
    else:
        stats["failed"] += count


def campaign_stats(session: Session, campaign_id: str) -> dict[str, int]:
    """Counts over the campaign's emails: by state, and by the feedback events recorded against them
    (each email counted once per kind, however often it was opened or clicked)."""
    stats = {name: 0 for name in ("queued", "sent", "failed", "cancelled", *FEEDBACK_EVENTS.values())}
    for status, sent, count in session.execute(
            select(_EMAIL.c.status, _EMAIL.c.sent_at.is_not(None), func.count())
            .where(_EMAIL.c.campaign_id == campaign_id).group_by(_EMAIL.c.status, _EMAIL.c.sent_at.is_not(None))):
        _tally(stats, status, sent, count)
    events = Event.__table__
    for name, count in session.execute(
            select(events.c.name, func.count(func.distinct(events.c.email_id)))
            .join(_EMAIL, _EMAIL.c.id == events.c.email_id)
            .where(_EMAIL.c.campaign_id == campaign_id, events.c.name.in_(list(FEEDBACK_EVENTS)))
            .group_by(events.c.name)):
        stats[FEEDBACK_EVENTS[name]] = count
    return stats


@dataclass(frozen=True)
class Progress:
    status: str
    recipients: int
    counts: dict[str, int]
    """queued, sent, failed, cancelled."""


def campaign_progress(session: Session, project_id: str, campaign_id: str) -> Progress | None:
    """The campaign's state and its emails by state in ONE statement: the campaign row joined to its
    emails, summed over the covering index (campaign_id, status, id, sent_at) in one group (no sort), so a
    live progress bar costs one index range scan per update whatever the campaign's size. The states
    are those of `campaign_stats`. None: no such campaign in the project."""
    unsent = _EMAIL.c.sent_at.is_(None)

    def tally(condition: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    row = session.execute(
        select(_CAMPAIGN.c.status, _CAMPAIGN.c.recipient_count, func.count(_EMAIL.c.campaign_id),
               tally(_EMAIL.c.sent_at.is_not(None)), tally(unsent & (_EMAIL.c.status == EmailStatus.QUEUED)),
               tally(unsent & (_EMAIL.c.status == EmailStatus.CANCELLED)))
        .select_from(_CAMPAIGN.outerjoin(_EMAIL, _EMAIL.c.campaign_id == _CAMPAIGN.c.id))
        .where(_CAMPAIGN.c.project_id == project_id, _CAMPAIGN.c.id == campaign_id)
        .group_by(_CAMPAIGN.c.id)).first()
    if row is None:
        return None
    status, recipients, total, sent, queued, cancelled = row
    return Progress(status, recipients, {"queued": int(queued), "sent": int(sent),
                                         "failed": int(total) - int(sent) - int(queued) - int(cancelled),
                                         "cancelled": int(cancelled)})


def campaign_recipients(session: Session, campaign_id: str, status: str | None, limit: int,
                        cursor: str | None) -> Page:
    """The campaign's emails newest first, of one status when given, by cursor (no total: a campaign may
    have 100,000 of them)."""
    stmt = select(_EMAIL.c.id, _EMAIL.c.recipient, _EMAIL.c.contact_id, _EMAIL.c.status, _EMAIL.c.sent_at,
                  _EMAIL.c.error).where(_EMAIL.c.campaign_id == campaign_id)
    if status is not None:
        stmt = stmt.where(_EMAIL.c.status == status)
    return keyset_page(session, stmt, _EMAIL.c.id, limit, cursor)


class _Hour(FunctionElement[str]):
    """A time's hour in UTC as text, 'YYYY-MM-DD HH' (SQLite stores UTC without a zone)."""

    type = String()
    name = "hour_of"
    inherit_cache = True


@compiles(_Hour, "sqlite")
def _hour_sqlite(element, compiler, **kw):
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 13)"


@compiles(_Hour, "postgresql")
def _hour_pg(element, compiler, **kw):
    return f"to_char(({compiler.process(element.clauses, **kw)}) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24')"


TIMELINE_EVENTS = ("email.open", "email.click")


def campaign_timeline(session: Session, campaign_id: str) -> dict[str, dict[str, int]]:
    """Per hour (UTC, 'YYYY-MM-DD HH'): emails sent, and the campaign's emails opened and clicked (each
    open or click counted)."""
    hours: dict[str, dict[str, int]] = {}
    hour = _Hour(_EMAIL.c.sent_at)
    for when, count in session.execute(select(hour, func.count()).where(
            _EMAIL.c.campaign_id == campaign_id, _EMAIL.c.sent_at.is_not(None)).group_by(hour)):
        hours.setdefault(when, {"sent": 0, "opened": 0, "clicked": 0})["sent"] = count
    events = Event.__table__
    hour = _Hour(events.c.created_at)
    for when, name, count in session.execute(
            select(hour, events.c.name, func.count()).join(_EMAIL, _EMAIL.c.id == events.c.email_id)
            .where(_EMAIL.c.campaign_id == campaign_id, events.c.name.in_(TIMELINE_EVENTS))
            .group_by(hour, events.c.name)):
        hours.setdefault(when, {"sent": 0, "opened": 0, "clicked": 0})[
            "opened" if name == "email.open" else "clicked"] = count
    return dict(sorted(hours.items()))


def top_links(session: Session, campaign_id: str, limit: int = 10) -> list[tuple[str, int]]:
    """The links of the campaign's emails clicked most (clicks, not people), most first."""
    events = Event.__table__
    url = json_text(events.c.data, literal("url", String))
    rows = session.execute(
        select(url, func.count()).join(_EMAIL, _EMAIL.c.id == events.c.email_id)
        .where(_EMAIL.c.campaign_id == campaign_id, events.c.name == "email.click", url.is_not(None))
        .group_by(url).order_by(func.count().desc(), url).limit(limit))
    return [(str(link), int(count)) for link, count in rows]


def campaign_page(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    """The project's campaigns newest first by cursor, the columns a list shows."""
    stmt = select(_CAMPAIGN.c.id, _CAMPAIGN.c.name, _CAMPAIGN.c.subject, _CAMPAIGN.c.status,
                  _CAMPAIGN.c.recipient_count, _CAMPAIGN.c.scheduled_at, _CAMPAIGN.c.created_at).where(
        _CAMPAIGN.c.project_id == project_id)
    return keyset_page(session, stmt, _CAMPAIGN.c.id, limit, cursor)
