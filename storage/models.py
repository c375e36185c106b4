"""SQLAlchemy models. Ids are time-ordered UUIDs (v7 layout), so "newest first" is `ORDER BY id DESC`
and a cursor is simply the last id seen: pages stay stable while rows are inserted."""

from __future__ import annotations

import functools
import threading
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false, text
from sqlalchemy.types import TypeDecorator

from core.randomness import random_bytes, uuid_text
from storage.secrets import WEBHOOK_SECRET_SQLITE_TYPE, EncryptedText


class EmailStatus(StrEnum):
    """`emails.status`. Written QUEUED, or SKIPPED (marketing mail to a contact who is not subscribed);
    the dispatcher settles it SENT, FAILED, BOUNCED (refused for good at SMTP) or SUPPRESSED; SES feedback
    makes a sent one DELIVERED, BOUNCED or COMPLAINED; cancelling a campaign makes its waiting ones CANCELLED.
    Stored and shown as the plain text (a StrEnum member is that str)."""

    QUEUED = "QUEUED"
    SKIPPED = "SKIPPED"
    SENT = "SENT"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    BOUNCED = "BOUNCED"
    COMPLAINED = "COMPLAINED"
    SUPPRESSED = "SUPPRESSED"
    CANCELLED = "CANCELLED"


class CampaignStatus(StrEnum):
    """`campaigns.status`: DRAFT → SCHEDULED → SENDING → SENT, or CANCELLED; the reputation guard makes a
    scheduled or sending one PAUSED, and a user's resume takes it back."""

    DRAFT = "DRAFT"
    SCHEDULED = "SCHEDULED"
    SENDING = "SENDING"
    PAUSED = "PAUSED"
    SENT = "SENT"
    CANCELLED = "CANCELLED"


class RunStatus(StrEnum):
    """`workflow_runs.status`: ACTIVE (a step is due), WAITING (for an event or its timeout, or at a delay
    for its end), then one of the ended ones."""

    ACTIVE = "ACTIVE"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    EXITED = "EXITED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class WebhookDeliveryStatus(StrEnum):
    """`webhook_deliveries.status`: PENDING until a 2xx (DELIVERED) or it gives up (FAILED)."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


_last_stamp = 0
_stamp_lock = threading.Lock()


def new_id() -> str:
    """A UUIDv7 id: 48-bit millisecond time, a 12-bit counter, then randomness; increasing per process."""
    global _last_stamp
    with _stamp_lock:
        stamp = max((time.time_ns() // 1_000_000) << 12, _last_stamp + 1)
        _last_stamp = stamp
    rand = int.from_bytes(random_bytes(8), "big") & ((1 << 62) - 1)
    return uuid_text(((stamp >> 12) << 80) | (0x7 << 76) | ((stamp & 0xFFF) << 64) | (0b10 << 62) | rand)


def utcnow() -> datetime:
    return datetime.now(UTC)


@functools.lru_cache(maxsize=256)
def iso(moment: datetime) -> str:
    """The API's time format: ISO 8601 in UTC to the millisecond, with a Z. Also for times stored inside JSON
    (run history, webhook payloads), which reach clients as written. Cached: a batch writes one moment often."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both SQLite (which stores them naive) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


ID_TYPE = String(36).with_variant(String(36, collation="C"), "postgresql")
"""Ids and the other 36-character keys (every column that holds an id). PostgreSQL compares them byte by byte
(COLLATE "C"), as SQLite's BINARY does, whatever the database's own locale: ids are ASCII, and every index on
them (most indexes) compares them at each insert and lookup. Under a locale's rules a campaign's fan-out into
a database made with ICU's en-US took 7.9-8.0 s for 100,000 recipients under bench.campaign's probes, 6.7-7.1
s with these columns in "C" (0026; `python -m bench.campaign --database-icu-locale en-US`). Foreign-key columns
take this type from the column they reference."""


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}

    if TYPE_CHECKING:
        # Declarative types `__table__` as any FromClause (a class may be mapped to a select); every model
        # here is declared with `__tablename__`, so it is a Table, with insert(), update() and delete().
        __table__: ClassVar[Table]


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    secret_key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    """The digest of the project's first secret key, as made. Not read since 0013, which copied it into
    `api_keys` (named "default"): that table holds every secret key and says which are live."""
    public_key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    secret_key_hint: Mapped[str] = mapped_column(String(16))
    """Of the first secret key, as `secret_key_digest`."""
    public_key_hint: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[str | None] = mapped_column(String(80), nullable=True)
    """The public key itself (it is meant to be pasted into browser code); None for a project made before
    0013 until its keys are rotated."""
    from_email: Mapped[str] = mapped_column(String(320))
    from_name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    verp_relay: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Mail relayed over SMTP gets a VERP envelope sender too (else it keeps the client's MAIL FROM)."""


class ApiKey(Base):
    """A named secret key of a project, stored as a digest; revoked keys stay listed (who had which key)."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_project_id_id", "project_id", "id"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Domain(Base):
    __tablename__ = "domains"
    __table_args__ = (UniqueConstraint("project_id", "name"), Index("ix_domains_checked_at", "checked_at"))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(253))
    dkim_selector: Mapped[str] = mapped_column(String(63))
    dkim_private_key: Mapped[str] = mapped_column(EncryptedText())
    """Sealed at rest (`storage.secrets`)."""
    dkim_public_key: Mapped[str] = mapped_column(Text)
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    verified_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_check: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    return_path: Mapped[str | None] = mapped_column(String(253), nullable=True)
    """The MAIL FROM subdomain (e.g. bounces.example.com): when `return_path_verified`, the dispatcher delivers
    with a VERP envelope sender on it (`pipeline.return_path`)."""
    return_path_verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    checked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """When its records were last looked up (by `POST /domains/:id/verify` or the re-check, `domaincheck/`)."""
    held_since: Mapped[datetime | None] = mapped_column(nullable=True)
    """Set while the DKIM record of a domain once verified is missing: its queued mail is held (the outbox's
    `hold` DKIM), not sent unsigned; cleared, and the mail released, when a check finds the record again."""


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (UniqueConstraint("project_id", "email"), Index("ix_contacts_project_id_id", "project_id", "id"),
                      Index("ix_contacts_project_id_subscribed_id", "project_id", "subscribed", "id"),
                      Index("ix_contacts_project_id_email_prefix", "project_id", "email",
                            postgresql_ops={"email": 'COLLATE "C"'}))
    """`..._email_prefix`: email prefix search and order in code-point order whatever PostgreSQL's collation
    (COLLATE "C"; on SQLite the unique constraint's index would do: the twin is the price of one model)."""
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))
    subscribed: Mapped[bool] = mapped_column(Boolean)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_project_id_id", "project_id", "id"),
        Index("ix_events_project_id_name_id", "project_id", "name", "id"),
        Index("ix_events_project_id_name_created_at", "project_id", "name", "created_at"),
        Index("ix_events_contact_id_id", "contact_id", "id"),
        Index("ix_events_email_id", "email_id"),
    )
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    contact_id: Mapped[str | None] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), nullable=True)
    email_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Content(Base):
    """The MIME bytes of one message, shared by every recipient it goes to."""

    __tablename__ = "contents"
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    deferred: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """`raw` is not MIME but a message spec (JSON) shared by a campaign's or a workflow step's emails,
    composed per recipient when each is sent."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _partial(where: str) -> dict[str, Any]:
    """An index of only the rows where `where` holds, on both databases."""
    return {"sqlite_where": text(where), "postgresql_where": text(where)}


_OF_A_CAMPAIGN = _partial("campaign_id IS NOT NULL")
"""Every query on a campaign_id index (of emails or of the outbox) asks for one campaign: API and SMTP mail (no
campaign) stays out of them."""
FOREIGN_MESSAGE_ID = "message_id NOT LIKE '<' || id || '@%'"
"""An email's Message-ID that plunkd did not make (a client's, relayed over SMTP): the ones it makes are the
email's own id at a domain (`storage.emails.generated_message_id`), and are found by that id instead. Only the
others go into ix_emails_message_id, so a campaign's fan-out and every API send write one index entry fewer
per email; a query on it repeats this text, so both databases see that the index covers it."""


class Email(Base):
    __tablename__ = "emails"
    __table_args__ = (Index("ix_emails_project_id_id", "project_id", "id"),
                      Index("uq_emails_campaign_contact", "campaign_id", "contact_id", unique=True,
                            **_OF_A_CAMPAIGN),
                      Index("ix_emails_campaign_id_status_id_sent_at", "campaign_id", "status", "id", "sent_at",
                            **_OF_A_CAMPAIGN),
                      Index("ix_emails_campaign_id_id", "campaign_id", "id", **_OF_A_CAMPAIGN),
                      Index("ix_emails_contact_id_id", "contact_id", "id"),
                      Index("ix_emails_project_id_recipient_id", "project_id", "recipient", "id"),
                      Index("ix_emails_project_id_status_id_source", "project_id", "status", "id", "source"),
                      Index("ix_emails_project_id_source_id", "project_id", "source", "id"),
                      Index("ix_emails_message_id", "message_id", **_partial(FOREIGN_MESSAGE_ID)))
    """The message log's filters: each a range of one index, in id (newest-first) order; a status with a
    source is the status's range with the source read from the same index entries."""
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    contact_id: Mapped[str | None] = mapped_column(ForeignKey("contacts.id", ondelete="SET NULL"), nullable=True)
    content_id: Mapped[str] = mapped_column(ForeignKey("contents.id"), index=True)
    campaign_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """Set on a campaign's live sends: at most one email per campaign and contact, whatever retries.
    Not a foreign key, so the column could be added without rebuilding this (large) table on SQLite."""
    recipient: Mapped[str] = mapped_column(String(320))
    sender: Mapped[str] = mapped_column(String(320))
    envelope_sender: Mapped[str | None] = mapped_column(String(320), nullable=True)
    """The SMTP client's MAIL FROM, delivered as the Return-Path; None: `sender`."""
    subject: Mapped[str] = mapped_column(Text, default="")
    variables: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """A deferred email's own template variables (a workflow run's event data and its send step's data),
    laid over the contact's data when the dispatcher composes it; None: the contact's data alone."""
    source: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default=EmailStatus.QUEUED)
    message_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    transport_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(nullable=True)
    track_opens: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Chosen when the email is queued (`pipeline.tracking.links`): the dispatcher adds the open pixel."""
    track_clicks: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Chosen when the email is queued: the dispatcher sends its links through the click redirect."""


class OutboxItem(Base):
    """One row per email still to deliver; a dispatcher claims it by setting a lease."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_priority_due_at", "priority", "due_at"),
                      Index("ix_outbox_campaign_id", "campaign_id", **_OF_A_CAMPAIGN),
                      Index("ix_outbox_leased", "priority", "due_at", **_partial("claimed_by IS NOT NULL")),
                      Index("ix_outbox_hold", "hold", **_partial("hold IS NOT NULL")))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    email_id: Mapped[str] = mapped_column(ForeignKey("emails.id", ondelete="CASCADE"), unique=True)
    priority: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    """Claimed lowest first: 0 transactional (API, SMTP, tests), 1 campaigns."""
    campaign_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """The email's campaign, here too so a cancel or a 'done yet?' check is one index lookup."""
    due_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hold: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """Why the row is parked (its `due_at` moved to `storage.emails.PARKED`, so no claim sees it): DKIM (its
    domain's DKIM record is missing) or PAUSED (its campaign is paused); None: it is due as `due_at` says."""


class Suppression(Base):
    __tablename__ = "suppressions"
    __table_args__ = (UniqueConstraint("project_id", "email"),
                      Index("ix_suppressions_project_id_id", "project_id", "id"))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))
    reason: Mapped[str] = mapped_column(Text, default="")
    email_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """The email whose bounce or complaint suppressed the address (None: unknown, or from before 0013).
    Not a foreign key: the suppression outlives the email's deletion by retention."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("project_id", "key"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_digest: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Template(Base):
    __tablename__ = "templates"
    __table_args__ = (Index("ix_templates_project_id_id", "project_id", "id"),
                      CheckConstraint("type IN ('MARKETING', 'TRANSACTIONAL')", name="ck_templates_type"),
                      CheckConstraint("style IN ('PLUNK', 'HTML')", name="ck_templates_style"))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="MARKETING")
    style: Mapped[str] = mapped_column(String(8), default="PLUNK")
    from_email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    from_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reply_to: Mapped[str | None] = mapped_column(String(320), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Segment(Base):
    """A named filter over a project's contacts (`condition`, see `pipeline.marketing.segments`)."""

    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("project_id", "slug"), Index("ix_segments_project_id_id", "project_id", "id"))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(100))
    condition: Mapped[dict[str, Any]] = mapped_column(default=dict)
    track_membership: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SegmentMember(Base):
    """Who is in a segment with membership tracking on, so a change can tell entry from exit."""

    __tablename__ = "segment_members"
    __table_args__ = (Index("ix_segment_members_contact_id", "contact_id"),)
    segment_id: Mapped[str] = mapped_column(ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)
    contact_id: Mapped[str] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    entered_at: Mapped[datetime] = mapped_column(default=utcnow)


class Campaign(Base):
    """A marketing send to an audience: every subscribed contact (ALL), a segment, or a LIST of
    contact ids and emails. DRAFT → SCHEDULED → SENDING → SENT, or CANCELLED."""

    __tablename__ = "campaigns"
    __table_args__ = (Index("ix_campaigns_project_id_id", "project_id", "id"),
                      Index("ix_campaigns_status_scheduled_at", "status", "scheduled_at"))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200), default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[str] = mapped_column(Text, default="")
    style: Mapped[str] = mapped_column(String(8), default="PLUNK")
    template_id: Mapped[str | None] = mapped_column(ForeignKey("templates.id"), nullable=True)
    from_email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    from_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reply_to: Mapped[str | None] = mapped_column(String(320), nullable=True)
    audience: Mapped[str] = mapped_column(String(8), default="ALL")
    segment_id: Mapped[str | None] = mapped_column(ForeignKey("segments.id"), nullable=True)
    segment_snapshot: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """The segment (id, name, condition) a finished campaign went to, kept here when that segment is deleted."""
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(12), default=CampaignStatus.DRAFT)
    scheduled_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    content_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """The deferred content (message spec) its emails share, written when the fan-out starts."""
    fanout_cursor: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """The last contact id queued; a fan-out that died resumes after it."""
    fanout_done: Mapped[bool] = mapped_column(Boolean, default=False)
    recipient_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Workflow(Base):
    """An automation: a trigger event starts a run per contact through `definition`'s steps (see
    `pipeline.workflows.engine` for the grammar). Legacy actions (seed 002's /actions) are stored as workflows."""

    __tablename__ = "workflows"
    __table_args__ = (Index("ix_workflows_project_id_id", "project_id", "id"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    exclude_events: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Legacy `notevents`: a contact who has done any of these is not (or no longer) run."""
    definition: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    run_once: Mapped[bool] = mapped_column(Boolean, default=False)
    """At most one run per contact, ever (else a contact re-enters on every trigger)."""
    kind: Mapped[str] = mapped_column(String(8), default="WORKFLOW")
    """WORKFLOW (/workflows) or ACTION (/actions): only the API shape differs."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WorkflowTrigger(Base):
    """An event name that starts runs of a workflow (a legacy action may have several)."""

    __tablename__ = "workflow_triggers"
    __table_args__ = (Index("ix_workflow_triggers_project_id_event", "project_id", "event"),)
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"), primary_key=True)
    event: Mapped[str] = mapped_column(String(200), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))


class WorkflowRun(Base):
    """One contact's way through a workflow. `step_id` is the step to run next, due at `due_at`, or the
    `delay` or `wait` step a WAITING run is at: due at the delay's end, or the event's timeout (the event
    awaited is `waiting_for`)."""

    __tablename__ = "workflow_runs"
    __table_args__ = (Index("ix_workflow_runs_status_due_at", "status", "due_at"),
                      Index("ix_workflow_runs_workflow_id_id", "workflow_id", "id"),
                      Index("ix_workflow_runs_workflow_id_updated_at", "workflow_id", "updated_at"),
                      Index("ix_workflow_runs_workflow_id_status_step_id", "workflow_id", "status", "step_id"),
                      Index("ix_workflow_runs_contact_id", "contact_id"),
                      Index("uq_workflow_runs_once", "workflow_id", "contact_id", "once_key", unique=True))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    workflow_id: Mapped[str] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    contact_id: Mapped[str] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(12), default=RunStatus.ACTIVE)
    """A `RunStatus`."""
    step_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    due_at: Mapped[datetime | None] = mapped_column(nullable=True)
    waiting_for: Mapped[str | None] = mapped_column(String(200), nullable=True)
    once_key: Mapped[str] = mapped_column(ID_TYPE)
    """'once' for a run-once workflow (the unique index then allows one run per contact), else the run id."""
    trigger_event_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The triggering event's data: template variables for send steps."""
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    """Each step taken: {step, type, at, outcome}."""
    emails_sent: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


Index("ix_emails_transport_id", Email.transport_id, **_partial("transport_id IS NOT NULL"))
"""Delivery feedback (SES's notifications, by SES message id) finds its email by the transport's id."""


class AppliedSnsMessage(Base):
    """An SNS message whose effects were committed, written in the same transaction as them: a message SNS
    delivers again (it retries for up to an hour) is applied once. Rows older than the age past which any
    message is refused anyway (`feedback.sns_max_age_seconds`) are pruned."""

    __tablename__ = "applied_sns_messages"
    __table_args__ = (Index("ix_applied_sns_messages_received_at", "received_at"),)
    message_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    topic_arn: Mapped[str] = mapped_column(String(300))
    type: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class RateSchedule(Base):
    """A rate shared by every node (PostgreSQL): GCRA's theoretical arrival time, in the database's
    clock (epoch seconds), so nodes whose clocks disagree still share one schedule."""

    __tablename__ = "rate_schedules"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    tat: Mapped[float] = mapped_column(Float)


class ApiUsage(Base):
    """Requests per project in one rate-limit window, summed over the nodes (PostgreSQL)."""

    __tablename__ = "api_usage"
    project_id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    """Epoch seconds at which the window began."""
    used: Mapped[int] = mapped_column(Integer)


class Node(Base):
    """A running plunkd process (`plunkd.heartbeat`): what it does and when it last said it is alive. A row
    is deleted when its process stops cleanly, and pruned a day after its last heartbeat otherwise."""

    __tablename__ = "nodes"
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    roles: Mapped[str] = mapped_column(String(100))
    """Space-separated: api, relay, dispatcher."""
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column()
    last_heartbeat: Mapped[datetime] = mapped_column()


class SendMinute(Base):
    """Emails settled per minute, over every node, added in the transaction that records each outcome: the
    system page's chart reads a day of small rows instead of a day of emails."""

    __tablename__ = "send_minutes"
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    """Epoch seconds // 60 (UTC)."""
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    """Chosen at random per transaction (`storage.system.SHARDS`), so concurrent writers (several per node
    on PostgreSQL, and several nodes) seldom wait for each other's lock on one minute's row."""
    sent: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    """Bounced or failed for good."""


class ReputationDay(Base):
    """A project's sends, hard bounces and complaints per UTC day, counted in the transactions recording them
    (sharded like `SendMinute`): the reputation guard sums seven days of a project's rows, a primary-key range,
    instead of counting its emails."""

    __tablename__ = "reputation_days"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    """Epoch seconds // 86400 (UTC)."""
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    sent: Mapped[int] = mapped_column(Integer)
    bounced: Mapped[int] = mapped_column(Integer)
    complained: Mapped[int] = mapped_column(Integer)


class ReputationState(Base):
    """Where a project's rates stood when last judged (`pipeline.reputation`): a level per rate (OK, WARN,
    PAUSE), so an event fires once per crossing, and whether its campaigns and workflow sends are paused."""

    __tablename__ = "reputation_states"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    bounce_level: Mapped[str] = mapped_column(String(8))
    complaint_level: Mapped[str] = mapped_column(String(8))
    marketing_paused: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TrackingSettings(Base):
    """A project's open and click tracking defaults, per kind of mail; no row: the defaults of
    `pipeline.tracking.links.DEFAULT_SETTINGS` (marketing mail tracked, transactional not)."""

    __tablename__ = "tracking_settings"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    marketing_opens: Mapped[bool] = mapped_column(Boolean)
    marketing_clicks: Mapped[bool] = mapped_column(Boolean)
    transactional_opens: Mapped[bool] = mapped_column(Boolean)
    transactional_clicks: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookEndpoint(Base):
    """A URL a project's events are POSTed to, signed with `secret` (Standard Webhooks), for the event names
    (or patterns: "*", "email.*", "contact.*", "segment.*") in `events`."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_project_id_id", "project_id", "id"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    secret: Mapped[str] = mapped_column(EncryptedText(WEBHOOK_SECRET_SQLITE_TYPE))
    """`whsec_` + base64 of 32 random bytes; sealed at rest (`storage.secrets`)."""
    previous_secret: Mapped[str | None] = mapped_column(EncryptedText(WEBHOOK_SECRET_SQLITE_TYPE), nullable=True)
    """The secret before the last rotation: requests carry a signature with it too until
    `previous_secret_expires_at`, so receivers can switch without losing a delivery."""
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    """Failed attempts since the last successful one."""
    failing_since: Mapped[datetime | None] = mapped_column(nullable=True)
    """When the first of those failed attempts was made."""
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One event to POST to one endpoint; its id is the `webhook-id` header of every attempt (receivers
    dedupe on it). PENDING until a 2xx (DELIVERED) or until it gives up (FAILED)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_due_at", "status", "due_at"),
                      Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """Not a foreign key: the delivery outlives a deleted event. None for a test delivery."""
    event_name: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(12), default=WebhookDeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    due_at: Mapped[datetime] = mapped_column(default=utcnow)
    """PENDING: when the next attempt is due (a claim moves it to the end of its lease); otherwise when it
    settled (the pruner's clock)."""
    claimed_by: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """The claim that holds the lease: only that claim records the outcome."""
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    """The latest attempts (capped): {at, status, durationMs, error}."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Role(StrEnum):
    """A user's role in one project (`memberships.role`), weakest first: viewer reads; editor also changes
    contacts, suppressions and marketing content; admin also keys, domains, webhooks and members; owner
    also owners and the project itself."""

    VIEWER = "viewer"
    EDITOR = "editor"
    ADMIN = "admin"
    OWNER = "owner"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


class User(Base):
    """A person who signs in to the dashboard. `instance_owner`: runs this plunkd (the system page, every
    project as its owner, new projects)."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    """argon2id, in the PHC string format argon2-cffi writes."""
    instance_owner: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class TemplateDraft(Base):
    """What a dashboard user last typed in a template editor, kept for the sandboxed preview frame to
    load by id (the newest few per user and project, `storage.templates.KEPT_DRAFTS`)."""

    __tablename__ = "template_drafts"
    __table_args__ = (Index("ix_template_drafts_project_id_user_id_id", "project_id", "user_id", "id"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    subject: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    style: Mapped[str] = mapped_column(String(8))
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The sample data the preview renders with (`plunk_id` and `plunk_email` included)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DashboardSession(Base):
    """A signed-in browser. The cookie holds a random token; only its digest is stored."""

    __tablename__ = "dashboard_sessions"
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    token_digest: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(200), default="")


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("project_id", "user_id"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Invitation(Base):
    """An invitation by link to join a project with a role; the link's token is stored as a digest."""

    __tablename__ = "invitations"
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(16))
    token_digest: Mapped[str] = mapped_column(String(64), unique=True)
    invited_by: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    accepted_at: Mapped[datetime | None] = mapped_column(nullable=True)


class LoginFailure(Base):
    """Sign-in attempts counted per account (`account:<email>`) and per client address (`ip:<address>`),
    in the database so every node counts the same attempts."""

    __tablename__ = "login_failures"
    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    first_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImportState(StrEnum):
    """`import_jobs.state`: MAPPING (uploaded, its columns not yet mapped) → RUNNING → DONE, or FAILED."""

    MAPPING = "MAPPING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class ImportJob(Base):
    """A CSV contact import started in the dashboard: the uploaded file (under the data dir of the node that
    took it), its column mapping, and the run's counts and failed rows (at most
    `pipeline.imports.MAX_REPORTED_FAILURES`, with line numbers). `heartbeat_at` moves while it runs."""

    __tablename__ = "import_jobs"
    __table_args__ = (Index("ix_import_jobs_project_id_id", "project_id", "id"),
                      Index("ix_import_jobs_state", "state"))
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default=ImportState.MAPPING)
    columns: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The survey: {"names": [...header...], "types": {column: type}, "rows": n}."""
    mapping: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """{column: "email" | "subscribed" | "skip" | "data:<key>"}."""
    total: Mapped[int] = mapped_column(Integer, default=0)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """[[line, reason], ...] of the first failed rows."""
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class InboundRoute(Base):
    """An address (`support@example.com`) or a whole domain (`*@support.example.com`), lower case, whose
    inbound mail becomes the project's `email.received`. On a domain of the project (`domain_id`, the
    domain itself or a parent): mail is routed only while that domain is verified. A pattern is routed by
    one project at most (unique), so a recipient names one project."""

    __tablename__ = "inbound_routes"
    __table_args__ = (Index("ix_inbound_routes_project_id_id", "project_id", "id"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    domain_id: Mapped[str] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"), index=True)
    pattern: Mapped[str] = mapped_column(String(320), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InboundMessage(Base):
    """A routed inbound message: its raw bytes (what `GET /inbound/:id/raw` answers) and what the event
    says of it. Deleted with its attachments after `delivery.keep_content_days` (its event stays)."""

    __tablename__ = "inbound_messages"
    __table_args__ = (Index("ix_inbound_messages_project_id_id", "project_id", "id"),)
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    route_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    """Not a foreign key: the message stays when its route is deleted."""
    event_id: Mapped[str | None] = mapped_column(ID_TYPE, nullable=True)
    envelope_from: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))
    client_ip: Mapped[str] = mapped_column(String(64))
    helo: Mapped[str] = mapped_column(String(255))
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InboundAttachment(Base):
    """One attachment of an inbound message, decoded: the bytes `GET /inbound/:id/attachments/:id` answers."""

    __tablename__ = "inbound_attachments"
    id: Mapped[str] = mapped_column(ID_TYPE, primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("inbound_messages.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
