"""Every dashboard page loaded by a signed-in owner under concurrency, against a bare aiohttp handler that runs
the page's main query and answers JSON (bench/bare_dashboard_server.py), same run, same database.

    python -m bench.dashboard [--contacts 100000] [--emails 1000000] [--loads 200] [--concurrency 8]
                              [--quick] [--cache-dir DIR] [--database-url postgresql+asyncpg://…/<empty db>]
                              [--sending RATE]

One project is seeded with bulk inserts (`storage.bulk`, not the API): contacts with data (some
unsubscribed), emails over 30 days of UUIDv7 ids (mixed statuses and sources, recipients among the
contacts), events for a share of them (sent, delivered, opened; bounced with the SMTP reply), a few
suppressions, two domains and two webhook endpoints; and for the marketing pages (through the API's
rules where they are fast enough) templates, a segment, a workflow with runs at its steps, many events of a
custom name, and a campaign half way through sending to up to 100,000 contacts. The seed is kept for the
next run: SQLite in `--cache-dir` (keyed by the schema revision and the seed parameters), PostgreSQL in the
database given (which must be empty the first time; the encryption key its secrets are sealed with stays in
--cache-dir).

Both servers run as processes of their own (`plunkd serve` with delivery off, and the bare app), loaded
over loopback HTTP; each page is loaded `--loads` times by `--concurrency` clients after a short warm-up.
A page that answers anything but 200 is an error (exit 1); a page whose route this branch does not have
is skipped with a note. The aims are printed with PASS or MISS; a miss does not fail the run. With
`--sending RATE` (SQLite) every page is loaded again while the dispatcher sends the campaign's queued emails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session

from bench.common import free_port, plunkd_env, server_process
from core.config import Config, load_config
from dashboard.app import all_pages
from dashboard.routing import SESSION_COOKIE
from pipeline import accounts
from pipeline.domains import add_domain, save_check
from pipeline.marketing import campaigns as campaign_rules
from pipeline.marketing import segments as segment_rules
from pipeline.marketing import templates as template_rules
from pipeline.marketing.campaigns import CampaignFields
from pipeline.projects import create_project
from pipeline.workflows import rules as workflow_rules
from pipeline.workflows.rules import WorkflowFields
from plunkd.atrest import open_secrets
from storage import accounts as account_store
from storage import campaigns as campaign_store
from storage import contacts as contact_store
from storage import events as event_store
from storage import workflow_admin as workflow_store
from storage.bulk import Columns, insert_rows
from storage.db import Database, alembic_config
from storage.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Content,
    Domain,
    Email,
    EmailStatus,
    Event,
    OutboxItem,
    Project,
    Role,
    RunStatus,
    Segment,
    Suppression,
    Template,
    User,
    WebhookEndpoint,
    Workflow,
    WorkflowRun,
    iso,
)
from storage.webhooks import insert_endpoint

SEED_VERSION = 5
"""Bump when the seeded data changes, so cached seeds are made again."""
USER_EMAIL = "owner@bench.example"
USER_PASSWORD = "bench-dashboard-owner-password"
DAYS = 30
ROWS_PER_WRITE = 20_000
LIST_SIZE = 50
"""Rows a list page shows (the bare handlers fetch one more, as a cursor page does)."""
PAGE_AIM_MS = 150.0
SEARCH_AIM_MS = 100.0
RATIO_AIM = 0.5
WARM_UP = 5
"""Loads of each page before the timed ones (connections opened, caches filled)."""
SEED_TABLE = "bench_dashboard_seed"
STATUSES = [(EmailStatus.SENT, 45), (EmailStatus.DELIVERED, 42), (EmailStatus.BOUNCED, 5), (EmailStatus.FAILED, 2),
            (EmailStatus.SKIPPED, 2), (EmailStatus.SUPPRESSED, 1), (EmailStatus.COMPLAINED, 1),
            (EmailStatus.QUEUED, 1), (EmailStatus.CANCELLED, 1)]
SOURCES = [("api", 40), ("smtp", 20), ("campaign", 30), ("workflow", 10)]
BOUNCE_REPLY = "550 5.1.1 <{0}>: Recipient address rejected: User unknown in virtual mailbox table"
CAMPAIGN_RECIPIENTS = 100_000
CAMPAIGN_MINUTES = 40
"""How long the seeded campaign has been sending."""
CAMPAIGN_STATUSES = [(EmailStatus.DELIVERED, 55), (EmailStatus.SENT, 20), (EmailStatus.QUEUED, 22),
                     (EmailStatus.BOUNCED, 2), (EmailStatus.FAILED, 1)]
CAMPAIGN_LINKS = ["https://shop.bench.example/sale", "https://shop.bench.example/sale/shoes",
                  "https://shop.bench.example/account", "https://bench.example/unsubscribe-help"]
PURCHASE_EVERY = 20
"""One "purchased" event per this many emails (50,000 at full size)."""
SEGMENT_CONDITION = {"all": [{"field": "data.plan", "op": "equals", "value": "pro"},
                             {"event": "purchased", "op": "did", "atLeast": 2, "withinDays": 30},
                             {"field": "subscribed", "op": "equals", "value": True}]}
WORKFLOW_RUNS = 5_000
_DELAYED = ("wait-a-bit", "delay", "delayed")
_SENT = ("welcome", "send", "sent")
_PRO = ("is-pro", "condition", "then")
RUN_PLACES = [((RunStatus.ACTIVE, "wait-a-bit", []), 30),
              ((RunStatus.WAITING, "wait-order", [_DELAYED, _SENT, _PRO, ("wait-order", "wait", "waiting")]), 35),
              ((RunStatus.FAILED, "welcome", [_DELAYED, ("welcome", "send", "failed")]), 3),
              ((RunStatus.COMPLETED, None, [_DELAYED, _SENT, _PRO, ("wait-order", "wait", "event"),
                                            ("tag", "update", "updated")]), 22),
              ((RunStatus.EXITED, None, [_DELAYED, _SENT, ("is-pro", "condition", "else"), ("bye", "exit", "exit")]),
               10)]
"""(status, the step it is at, the steps it passed) of the seeded workflow runs, weighted."""
SENT_STATUSES = frozenset({EmailStatus.SENT, EmailStatus.DELIVERED, EmailStatus.BOUNCED, EmailStatus.COMPLAINED})


# --- The pages: one table, the one place to correct a path or a main query. -------------------------------

Ids = dict[str, str]
"""What a path's placeholders stand for: project, contact, email, recipient, prefix, user."""


def _json_row(row: Any) -> dict[str, Any]:
    """An ORM row's columns (every attribute the page could show, secrets opened as the page opens them)."""
    return {attr.key: getattr(row, attr.key) for attr in inspect(row).mapper.column_attrs}


def _rows(session: Session, statement: Any) -> list[dict[str, Any]]:
    return [_json_row(row) for row in session.execute(statement).scalars()]


def _newest(session: Session, entity: Any, *where: Any) -> list[dict[str, Any]]:
    """A first list page, newest first: the page's cursor query without a cursor."""
    return _rows(session, select(entity).where(*where).order_by(entity.id.desc()).limit(LIST_SIZE + 1))


def _bench_user(ids: Ids) -> User:
    """The signed-in owner as the page's wrapper has it (the bare handler has no session to look up)."""
    return User(id=ids["user"], email=USER_EMAIL, instance_owner=True)


def _projects(session: Session, ids: Ids) -> Any:
    projects = account_store.projects_of(session, _bench_user(ids))
    return [{"id": project.id, "name": project.name, "role": role} for project, role in projects]


def _project(session: Session, ids: Ids) -> Any:
    return _json_row(session.get(Project, ids["project"]))


def _members(session: Session, ids: Ids) -> Any:
    people, pending = account_store.members_and_invitations(session, ids["project"], datetime.now(UTC))
    return {"members": [{"id": user.id, "email": user.email, "role": role} for user, role in people],
            "invitations": [_json_row(invitation) for invitation in pending]}


def _account(session: Session, ids: Ids) -> Any:
    return [_json_row(s) for s in account_store.list_sessions(session, ids["user"])]


def _domains(session: Session, ids: Ids) -> Any:
    return _rows(session, select(Domain).where(Domain.project_id == ids["project"]).order_by(Domain.id))


def _contacts(session: Session, ids: Ids) -> Any:
    return _newest(session, Contact, Contact.project_id == ids["project"])


def _contact_search(session: Session, ids: Ids) -> Any:
    """The addresses starting with the prefix as a range of the (project_id, email) index (a LIKE is no
    range on SQLite, whose LIKE ignores case: it scanned every contact)."""
    prefix = ids["prefix"]
    after_prefix = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return _newest(session, Contact, Contact.project_id == ids["project"], Contact.email >= prefix,
                   Contact.email < after_prefix)


def _contact(session: Session, ids: Ids) -> Any:
    events = _newest(session, Event, Event.contact_id == ids["contact"])
    return {"contact": _json_row(session.get(Contact, ids["contact"])), "events": events}


def _emails(session: Session, ids: Ids) -> Any:
    return _newest(session, Email, Email.project_id == ids["project"])


def _emails_to(session: Session, ids: Ids) -> Any:
    return _newest(session, Email, Email.project_id == ids["project"], Email.recipient == ids["recipient"])


def _bounced(session: Session, ids: Ids) -> Any:
    return _newest(session, Email, Email.project_id == ids["project"], Email.status == EmailStatus.BOUNCED)


def _email(session: Session, ids: Ids) -> Any:
    events = _newest(session, Event, Event.email_id == ids["email"])
    return {"email": _json_row(session.get(Email, ids["email"])), "events": events}


def _suppressions(session: Session, ids: Ids) -> Any:
    return _newest(session, Suppression, Suppression.project_id == ids["project"])


def _webhooks(session: Session, ids: Ids) -> Any:
    return _rows(session, select(WebhookEndpoint).where(WebhookEndpoint.project_id == ids["project"])
                 .order_by(WebhookEndpoint.id))


def _system(session: Session, ids: Ids) -> Any:
    """The outbox's due emails per priority, counted up to a cap (the page shows queue depths)."""
    capped = select(OutboxItem.priority).where(OutboxItem.due_at <= datetime.now(UTC)).limit(1001).subquery()
    return [{"priority": priority, "due": due}
            for priority, due in session.execute(select(capped.c.priority, func.count()).group_by(capped.c.priority))]


def _templates(session: Session, ids: Ids) -> Any:
    return _newest(session, Template, Template.project_id == ids["project"])


def _template(session: Session, ids: Ids) -> Any:
    return _json_row(session.get(Template, ids["template"]))


def _segments(session: Session, ids: Ids) -> Any:
    return _newest(session, Segment, Segment.project_id == ids["project"])


def _segment(session: Session, ids: Ids) -> Any:
    """The segment, and what its builder offers: the data keys and event names seen lately."""
    return {"segment": _json_row(session.get(Segment, ids["segment"])),
            "keys": contact_store.data_keys(session, ids["project"], 500),
            "names": event_store.recent_event_names(session, ids["project"], 1000)}


def _campaigns(session: Session, ids: Ids) -> Any:
    return [dict(row._mapping) for row in campaign_store.campaign_page(session, ids["project"], LIST_SIZE, None).items]


def _campaign_progress(session: Session, ids: Ids) -> Any:
    return campaign_store.campaign_progress(session, ids["project"], ids["campaign"])


def _campaign(session: Session, ids: Ids) -> Any:
    """A sending campaign's page: the campaign and its progress (its stats come when it has sent)."""
    return {"campaign": _json_row(session.get(Campaign, ids["campaign"])),
            "progress": _campaign_progress(session, ids)}


def _recipients(session: Session, ids: Ids) -> Any:
    page = campaign_store.campaign_recipients(session, ids["campaign"], None, LIST_SIZE, None)
    return [dict(row._mapping) for row in page.items]


def _workflows(session: Session, ids: Ids) -> Any:
    workflows = _newest(session, Workflow, Workflow.project_id == ids["project"])
    return {"workflows": workflows, "runs": workflow_store.run_counts(session, [w["id"] for w in workflows])}


def _workflow(session: Session, ids: Ids) -> Any:
    """The workflow, its runs per step and in all, and its newest runs."""
    runs = workflow_store.run_page(session, ids["workflow"], LIST_SIZE, None).items
    counts = workflow_rules.workflow_counts(session, ids["workflow"])
    return {"workflow": _json_row(session.get(Workflow, ids["workflow"])), "steps": counts.steps,
            "runCounts": counts.runs,
            "runs": [dict(row._mapping) for row in runs]}


def _event_names(session: Session, ids: Ids) -> Any:
    return event_store.event_counts(session, ids["project"], datetime.now(UTC) - timedelta(days=7), None)


def _events_named(session: Session, ids: Ids) -> Any:
    return _newest(session, Event, Event.project_id == ids["project"], Event.name == "purchased")


@dataclass(frozen=True)
class PageCase:
    path: str
    """The page's path template with its query string; {placeholders} are filled from the seed's `Ids`."""
    main_query: Callable[[Session, Ids], Any]
    """What the bare handler runs once per request: the storage function the page uses, or the simplest
    query that returns the same rows."""
    aim_ms: float = PAGE_AIM_MS
    served_by: str = ""
    """The route that serves the path when it is not the path itself (a placeholder with a pattern)."""

    @property
    def route(self) -> str:
        return self.served_by or self.path.split("?", 1)[0]


PAGES = [
    PageCase("/projects", _projects),
    PageCase("/projects/{project}", _project),
    PageCase("/projects/{project}/members", _members),
    PageCase("/account", _account),
    PageCase("/projects/{project}/keys", _project),
    PageCase("/projects/{project}/domains", _domains),
    PageCase("/projects/{project}/contacts", _contacts),
    PageCase("/projects/{project}/contacts?q={prefix}", _contact_search),
    PageCase("/projects/{project}/contacts/{contact}", _contact),
    PageCase("/projects/{project}/emails", _emails),
    PageCase("/projects/{project}/emails?recipient={recipient}", _emails_to, SEARCH_AIM_MS),
    PageCase("/projects/{project}/emails?status=BOUNCED", _bounced),
    PageCase("/projects/{project}/emails/{email}", _email),
    PageCase("/projects/{project}/suppressions", _suppressions),
    PageCase("/projects/{project}/webhooks", _webhooks),
    PageCase("/system", _system),
    PageCase("/projects/{project}/templates", _templates),
    PageCase("/projects/{project}/templates/{template}", _template),
    PageCase("/projects/{project}/segments", _segments),
    PageCase("/projects/{project}/segments/{segment}", _segment),
    PageCase("/projects/{project}/campaigns", _campaigns),
    PageCase("/projects/{project}/campaigns/{campaign}", _campaign),
    PageCase("/projects/{project}/campaigns/{campaign}/progress", _campaign_progress),
    PageCase("/projects/{project}/campaigns/{campaign}/recipients", _recipients),
    PageCase("/projects/{project}/workflows", _workflows),
    PageCase("/projects/{project}/workflows/{workflow}", _workflow),
    PageCase("/projects/{project}/events", _event_names),
    PageCase("/projects/{project}/events/purchased", _events_named, served_by="/projects/{project}/events/{name:.+}"),
]


def workflow_steps(template_id: str) -> list[dict[str, Any]]:
    """Onboarding: wait, send the welcome, then for pro contacts wait for an order and tag them."""
    return [{"id": "wait-a-bit", "type": "delay", "minutes": 10, "next": "welcome"},
            {"id": "welcome", "type": "send", "template": template_id, "next": "is-pro"},
            {"id": "is-pro", "type": "condition", "condition": {"field": "data.plan", "op": "equals", "value": "pro"},
             "then": "wait-order", "else": "bye"},
            {"id": "wait-order", "type": "wait", "event": "ordered", "timeoutSeconds": 86400, "then": "tag",
             "timeout": "bye"},
            {"id": "tag", "type": "update", "data": {"customer": True}},
            {"id": "bye", "type": "exit"}]


def fill(path: str, ids: Ids) -> str:
    return path.format(**{key: quote(value, safe="@") for key, value in ids.items()})


def routes_here() -> set[str]:
    """The GET paths this branch's dashboard serves."""
    return {page.path for page in all_pages() if page.method == "GET"}


# --- The seed ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedSize:
    contacts: int
    emails: int


def seed_key(size: SeedSize) -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return hashlib.sha256(f"{SEED_VERSION}:{head}:{size.contacts}:{size.emails}".encode()).hexdigest()[:16]


def id_at(millis: int, counter: int, rng: random.Random) -> str:
    """A UUIDv7 as `storage.models.new_id` makes it at the Unix time `millis` with its 12-bit `counter`."""
    value = (millis << 80) | (0x7 << 76) | ((counter & 0xFFF) << 64) | (0b10 << 62) | rng.getrandbits(62)
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def contact_address(index: int) -> str:
    return f"user{index:06d}@example.com"


def weighted(choices: list[tuple[Any, int]], count: int, rng: random.Random) -> list[Any]:
    values, weights = zip(*choices, strict=True)
    return rng.choices(values, weights=weights, k=count)


CONTACT_COLUMNS: Columns = [("id", "text"), ("project_id", "text"), ("email", "text"), ("subscribed", "bool"),
                            ("data", "json"), ("created_at", "time"), ("updated_at", "time")]
EMAIL_COLUMNS: Columns = [("id", "text"), ("project_id", "text"), ("contact_id", "text"), ("content_id", "text"),
                          ("recipient", "text"), ("sender", "text"), ("subject", "text"), ("source", "text"),
                          ("status", "text"), ("message_id", "text"), ("error", "text"), ("created_at", "time"),
                          ("sent_at", "time"), ("track_opens", "bool"), ("track_clicks", "bool")]
EVENT_COLUMNS: Columns = [("id", "text"), ("project_id", "text"), ("contact_id", "text"), ("email_id", "text"),
                          ("name", "text"), ("data", "json"), ("created_at", "time")]
CAMPAIGN_EMAIL_COLUMNS: Columns = [
    ("id", "text"), ("project_id", "text"), ("contact_id", "text"), ("content_id", "text"), ("campaign_id", "text"),
    ("recipient", "text"), ("sender", "text"), ("envelope_sender", "text"), ("subject", "text"), ("source", "text"),
    ("status", "text"), ("message_id", "text"), ("error", "text"), ("created_at", "time"), ("sent_at", "time"),
    ("track_opens", "bool"), ("track_clicks", "bool")]
OUTBOX_COLUMNS: Columns = [("id", "text"), ("email_id", "text"), ("due_at", "time"), ("attempts", "int"),
                           ("priority", "int"), ("campaign_id", "text")]
RUN_COLUMNS: Columns = [("id", "text"), ("workflow_id", "text"), ("project_id", "text"), ("contact_id", "text"),
                        ("status", "text"), ("step_id", "text"), ("due_at", "time"), ("waiting_for", "text"),
                        ("once_key", "text"), ("context", "json"), ("history", "json"), ("emails_sent", "int"),
                        ("created_at", "time"), ("updated_at", "time")]
SUPPRESSION_COLUMNS: Columns = [("id", "text"), ("project_id", "text"), ("email", "text"), ("reason", "text"),
                                ("created_at", "time")]


class Seeder:
    """Writes the seed's rows in batches of ROWS_PER_WRITE, each one INSERT statement per table."""

    def __init__(self, db: Database, project_id: str, size: SeedSize, now: datetime) -> None:
        self.db = db
        self.project_id = project_id
        self.size = size
        self.rng = random.Random(20261203)
        self.start = now - timedelta(days=DAYS)
        self.start_ms = int(self.start.timestamp() * 1000)
        self.span_ms = DAYS * 86_400_000
        self.contact_ids: list[str] = []

    async def insert(self, table: Any, columns: Columns, rows: list[list[Any]]) -> None:
        for start in range(0, len(rows), ROWS_PER_WRITE):
            batch = rows[start:start + ROWS_PER_WRITE]
            await self.db.write(partial(insert_rows, table=table, columns=columns, rows=batch), alone=True)

    def moment(self, millis: int) -> datetime:
        return datetime.fromtimestamp(millis / 1000, UTC)

    async def contents(self) -> list[str]:
        """A few message bodies the emails share."""
        def write(session: Session) -> list[str]:
            rows = [Content(id=id_at(self.start_ms, index, self.rng), project_id=self.project_id, deferred=False,
                            created_at=self.start,
                            raw=(f"From: Shop <shop@bench.example>\r\nSubject: Your receipt #{index}\r\n"
                                 "Content-Type: text/html; charset=utf-8\r\n\r\n"
                                 + "<p>Line items and totals.</p>\r\n" * 40).encode())
                    for index in range(20)]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

        return await self.db.write(write)

    async def contacts(self) -> None:
        rng, count = self.rng, self.size.contacts
        plans = weighted([("free", 70), ("pro", 25), ("team", 5)], count, rng)
        rows = []
        for index in range(count):
            millis = self.start_ms + index * self.span_ms // max(count - 1, 1)
            contact_id = id_at(millis, index, rng)
            self.contact_ids.append(contact_id)
            moment = self.moment(millis)
            data = {"firstName": f"Ada{index}", "plan": plans[index], "city": rng.choice(["Lyon", "Oslo", "Lima"]),
                    "orders": rng.randrange(40)}
            rows.append([contact_id, self.project_id, contact_address(index), rng.random() >= 0.1, data, moment,
                         moment])
        await self.insert(Contact.__table__, CONTACT_COLUMNS, rows)

    async def emails(self, content_ids: list[str]) -> str:
        """The emails and their events; returns a bounced email's id (one with events)."""
        rng, count, contacts = self.rng, self.size.emails, self.size.contacts
        bounced_with_events = ""
        for first in range(0, count, ROWS_PER_WRITE):
            indexes = range(first, min(first + ROWS_PER_WRITE, count))
            statuses = weighted(STATUSES, len(indexes), rng)
            sources = weighted(SOURCES, len(indexes), rng)
            emails: list[list[Any]] = []
            events: list[list[Any]] = []
            for index, status, source in zip(indexes, statuses, sources, strict=True):
                millis = self.start_ms + index * self.span_ms // max(count - 1, 1)
                email_id = id_at(millis, index, rng)
                moment = self.moment(millis)
                contact = rng.randrange(contacts)
                contact_id, recipient = self.contact_ids[contact], contact_address(contact)
                sent = status in SENT_STATUSES
                error = BOUNCE_REPLY.format(recipient) if status == EmailStatus.BOUNCED else (
                    "421 4.7.0 Try again later (gave up after 5 attempts)" if status == EmailStatus.FAILED else None)
                emails.append([email_id, self.project_id, contact_id, content_ids[index % len(content_ids)], recipient,
                               "shop@bench.example", f"Your receipt #{index}", source, status,
                               f"<{email_id}@bench.example>", error, moment,
                               self.moment(millis + 2000) if sent else None, source == "campaign", False])
                if sent and index % 4 == 0:
                    events += self.events_of(email_id, contact_id, recipient, status, millis, index)
                    if status == EmailStatus.BOUNCED:
                        bounced_with_events = email_id
            await self.db.write(partial(insert_rows, table=Email.__table__, columns=EMAIL_COLUMNS, rows=emails),
                                alone=True)
            await self.db.write(partial(insert_rows, table=Event.__table__, columns=EVENT_COLUMNS, rows=events),
                                alone=True)
        return bounced_with_events

    def events_of(self, email_id: str, contact_id: str, recipient: str, status: str, millis: int,
                  index: int) -> list[list[Any]]:
        rng = self.rng
        later = [("email.sent", 2000, {"messageId": f"<{email_id}@bench.example>", "transport": "smtp"})]
        if status == EmailStatus.BOUNCED:
            later.append(("email.bounce", 5000, {"reply": BOUNCE_REPLY.format(recipient), "bounceType": "Permanent"}))
        if status in (EmailStatus.DELIVERED, EmailStatus.COMPLAINED):
            later.append(("email.delivery", 4000, {"smtpResponse": "250 2.0.0 OK queued"}))
            if rng.random() < 0.4:
                later.append(("email.open", 3_600_000, {"userAgent": "Mozilla/5.0"}))
        if status == EmailStatus.COMPLAINED:
            later.append(("email.complaint", 7_200_000, {"complaintFeedbackType": "abuse"}))
        return [[id_at(millis + delay, index, rng), self.project_id, contact_id, email_id, name, data,
                 self.moment(millis + delay)] for name, delay, data in later]

    async def purchases(self) -> int:
        """A custom event with many rows: "purchased", one per PURCHASE_EVERY emails, over the month."""
        rng, count = self.rng, max(100, self.size.emails // PURCHASE_EVERY)
        rows = []
        for index in range(count):
            millis = self.start_ms + index * self.span_ms // max(count - 1, 1)
            contact = rng.randrange(self.size.contacts)
            rows.append([id_at(millis, index, rng), self.project_id, self.contact_ids[contact], None, "purchased",
                         {"sku": f"SKU-{rng.randrange(300):03d}", "amount": rng.randrange(5, 400)},
                         self.moment(millis)])
        await self.insert(Event.__table__, EVENT_COLUMNS, rows)
        return count

    async def sending_campaign(self, template_id: str, content_id: str, now: datetime) -> str:
        """A campaign SENDING to every contact (up to CAMPAIGN_RECIPIENTS), left as the fan-out and the
        dispatcher leave it half way: its emails (campaign_id set, source "campaign", one per contact)
        mostly sent or delivered with feedback events, a few bounced or failed, and a share still QUEUED
        with their outbox rows (priority 1). Returns its id."""
        started = now - timedelta(minutes=CAMPAIGN_MINUTES)
        fields = CampaignFields(name="Spring sale", subject="{{firstName ?? Friend}}, the spring sale is on",
                                template_id=template_id, from_email="shop@bench.example", from_name="Shop",
                                audience="ALL")

        def create(session: Session) -> str:
            campaign = campaign_rules.create_campaign(session, self.project_id, fields)
            campaign.status, campaign.started_at, campaign.scheduled_at = CampaignStatus.SENDING, started, started
            campaign.content_id, campaign.fanout_done = content_id, True
            session.flush()
            return campaign.id

        campaign_id = await self.db.write(create)
        rng, count = self.rng, min(CAMPAIGN_RECIPIENTS, self.size.contacts)
        start_ms, span_ms = int(started.timestamp() * 1000), CAMPAIGN_MINUTES * 60_000
        statuses = weighted(CAMPAIGN_STATUSES, count, rng)
        emails, outbox, events = [], [], []
        for index, (contact_id, status) in enumerate(zip(self.contact_ids[:count], statuses, strict=False)):
            millis = start_ms + index * span_ms // count
            email_id, recipient = id_at(millis, index, rng), contact_address(index)
            sent = status in SENT_STATUSES
            error = BOUNCE_REPLY.format(recipient) if status == EmailStatus.BOUNCED else (
                "421 4.7.0 Try again later (gave up after 5 attempts)" if status == EmailStatus.FAILED else None)
            emails.append([email_id, self.project_id, contact_id, content_id, campaign_id, recipient,
                           "shop@bench.example", "bounces@bench.example", "Ada, the spring sale is on", "campaign",
                           status, f"<{email_id}@bench.example>", error, self.moment(millis),
                           self.moment(millis + 1000) if sent else None, True, True])
            if status == EmailStatus.QUEUED:
                outbox.append([id_at(millis, index, rng), email_id, started, 0, 1, campaign_id])
            events += self.campaign_events(email_id, contact_id, status, millis, index)
        for start in range(0, count, ROWS_PER_WRITE):
            batch = emails[start:start + ROWS_PER_WRITE]
            await self.db.write(partial(insert_rows, table=Email.__table__, columns=CAMPAIGN_EMAIL_COLUMNS,
                                        rows=batch), alone=True)
        await self.insert(OutboxItem.__table__, OUTBOX_COLUMNS, outbox)
        await self.insert(Event.__table__, EVENT_COLUMNS, events)

        def recipients_counted(session: Session) -> None:
            session.get_one(Campaign, campaign_id).recipient_count = count
        await self.db.write(recipients_counted)
        return campaign_id

    def campaign_events(self, email_id: str, contact_id: str, status: str, millis: int,
                        index: int) -> list[list[Any]]:
        """The feedback a campaign email has had: delivery, then for some an open and a click."""
        rng = self.rng
        later: list[tuple[str, int, dict[str, Any]]] = []
        if status == EmailStatus.BOUNCED:
            later.append(("email.bounce", 5000, {"reply": BOUNCE_REPLY.format(contact_address(index))}))
        if status == EmailStatus.DELIVERED:
            later.append(("email.delivery", 4000, {"smtpResponse": "250 2.0.0 OK queued"}))
            if rng.random() < 0.3:
                later.append(("email.open", 60_000, {"userAgent": "Mozilla/5.0"}))
                if rng.random() < 0.25:
                    later.append(("email.click", 90_000, {"url": rng.choice(CAMPAIGN_LINKS)}))
        return [[id_at(millis + delay, index, rng), self.project_id, contact_id, email_id, name, data,
                 self.moment(millis + delay)] for name, delay, data in later]

    async def workflow(self, template_id: str, now: datetime) -> str:
        """An onboarding workflow of a few steps (made by the API's rules) and its runs spread over them:
        waiting at the delay and at the wait step, failed at the send, completed or exited."""
        fields = WorkflowFields(name="Onboarding", trigger="signed-up", steps=workflow_steps(template_id))
        workflow_id = await self.db.write(lambda s: workflow_rules.create_workflow(s, self.project_id, fields).id)
        rng, count = self.rng, min(WORKFLOW_RUNS, self.size.contacts)
        rows = []
        for index, (status, step_id, passed) in enumerate(weighted(RUN_PLACES, count, rng)):
            created = now - timedelta(minutes=rng.randrange(1, 60 * 24 * 7))
            history = [{"step": step, "type": kind, "at": iso(created), "outcome": outcome}
                       for step, kind, outcome in passed]
            waiting_for = "ordered" if step_id == "wait-order" else None
            due = created + timedelta(days=1) if status in (RunStatus.ACTIVE, RunStatus.WAITING) else None
            run_id = id_at(int(created.timestamp() * 1000), index, rng)
            rows.append([run_id, workflow_id, self.project_id, self.contact_ids[-1 - index], status, step_id, due,
                         waiting_for, run_id, {"plan": "pro"}, history, int(any(p[0] == "welcome" for p in passed)),
                         created, created])
        await self.insert(WorkflowRun.__table__, RUN_COLUMNS, rows)
        return workflow_id

    def new_template(self, session: Session, values: dict[str, Any]) -> str:
        return template_rules.create_template(session, self.project_id, values).id

    async def marketing(self, content_id: str) -> Ids:
        """The marketing pages' rows: templates, a segment, a workflow with runs, the "purchased" events
        and a campaign sending; returns the ids their paths use."""
        now = datetime.now(UTC)
        template_ids = []
        for index, name in enumerate(("Spring sale", "Welcome", "Receipt", "Win back")):
            values = {"name": name, "subject": f"{{{{firstName ?? Friend}}}}, {name.lower()}",
                      "body": "# Hello {{firstName ?? there}}\n\nOur **" + name + "** news, for {{plan}} members.",
                      "type": "MARKETING" if index != 2 else "TRANSACTIONAL"}
            template_ids.append(await self.db.write(partial(self.new_template, values=values)))
        segment = await self.db.write(lambda s: segment_rules.create_segment(s, self.project_id, "Pro buyers",
                                                                             SEGMENT_CONDITION).id)
        await self.purchases()
        workflow_id = await self.workflow(template_ids[1], now)
        campaign_id = await self.sending_campaign(template_ids[0], content_id, now)
        return {"template": template_ids[0], "segment": segment, "workflow": workflow_id, "campaign": campaign_id}

    async def suppressions(self) -> int:
        rows = [[id_at(self.start_ms + index * self.span_ms // self.size.contacts, index, self.rng), self.project_id,
                 contact_address(index), f"bounce: {BOUNCE_REPLY.format(contact_address(index))}", self.start]
                for index in range(0, self.size.contacts, 500)]
        await self.insert(Suppression.__table__, SUPPRESSION_COLUMNS, rows)
        return len(rows)


async def seed(db: Database, size: SeedSize) -> Ids:
    """The project, the owner, and the rows; returns the ids the page paths use."""
    now = datetime.now(UTC)
    issued = await db.write(lambda s: create_project(s, "Bench shop", "shop@bench.example", "Shop"))
    project_id = issued.project.id
    user = await accounts.create_user(db, USER_EMAIL, USER_PASSWORD, instance_owner=True)
    for role in (Role.ADMIN, Role.EDITOR, Role.VIEWER):
        member = await accounts.create_user(db, f"{role}@bench.example", USER_PASSWORD)
        await db.write(partial(account_store.put_membership, project_id=project_id, user_id=member.id, role=role))
    for index in range(2):
        await accounts.invite(db, project_id, f"invited{index}@bench.example", Role.VIEWER, user.id)
    for name in ("bench.example", "mail.bench.example"):
        domain = await db.write(partial(add_domain, project_id=project_id, name=name, selector="plunkd"))
        await db.write(partial(save_check, domain_id=domain.id, check={"verified": True, "method": "bench"}))
    for url in ("https://hooks.bench.example/plunk", "https://crm.bench.example/events"):
        await db.write(partial(insert_endpoint, project_id=project_id, url=url, events=["email.*"],
                               secret="whsec_bench", enabled=True))
    seeder = Seeder(db, project_id, size, now)
    content_ids = await seeder.contents()
    await seeder.contacts()
    email_id = await seeder.emails(content_ids)
    await seeder.suppressions()
    marketing = await seeder.marketing(content_ids[0])
    middle = size.contacts // 2
    return {**marketing, "project": project_id, "user": user.id, "contact": seeder.contact_ids[middle],
            "recipient": contact_address(middle), "prefix": contact_address(min(12, size.contacts - 1))[:9],
            "email": email_id}


async def seeded_manifest(db: Database, key: str) -> dict[str, Any] | None:
    def read(session: Session) -> dict[str, Any] | None:
        session.execute(text(f"CREATE TABLE IF NOT EXISTS {SEED_TABLE} (key VARCHAR(64) PRIMARY KEY, manifest TEXT)"))
        found = session.execute(text(f"SELECT manifest FROM {SEED_TABLE} WHERE key = :key"), {"key": key}).scalar()
        return None if found is None else json.loads(found)

    return await db.write(read)


async def ready_database(db: Database, config: Config, size: SeedSize, key: str) -> tuple[dict[str, Any], bool]:
    """The seed's manifest, seeding first unless this database already holds this seed: (manifest, cached)."""
    await db.migrate()
    await open_secrets(db, config)
    manifest = await seeded_manifest(db, key)
    if manifest is not None:
        return manifest, True
    if await db.read(lambda s: s.execute(select(Project.id).limit(1)).first()) is not None:
        where = "give an empty one" if db.is_postgres else f"remove {config.data_path} to seed again"
        raise SystemExit(f"the database holds other data, or a seed that did not finish: {where}")
    started = time.perf_counter()
    ids = await seed(db, size)
    if db.is_postgres:
        async with db.engine.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(text("ANALYZE"))
    manifest = {"ids": ids, "seconds": round(time.perf_counter() - started, 1), "contacts": size.contacts,
                "emails": size.emails}
    await db.write(lambda s: s.execute(text(f"INSERT INTO {SEED_TABLE} (key, manifest) VALUES (:key, :manifest)"),
                                       {"key": key, "manifest": json.dumps(manifest)}))
    return manifest, False


async def sign_in(db: Database, config: Config) -> str:
    """A new session for the owner (the bench's earlier sessions end, so the account page lists one)."""
    token, row = await accounts.sign_in(db, config.dashboard, USER_EMAIL, USER_PASSWORD, "127.0.0.1", "bench.dashboard")
    await db.write(lambda s: account_store.delete_sessions(s, row.user_id, keep=row.id))
    return token


# --- The load ---------------------------------------------------------------------------------------------

class PageError(Exception):
    """A page or bare handler answered something else than 200."""


async def load(url: str, loads: int, concurrency: int, cookies: dict[str, str]) -> list[float]:
    """`loads` GETs of `url` by `concurrency` clients after a warm-up; each one's milliseconds."""
    timings: list[float] = []
    remaining = loads
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, cookies=cookies) as session:
        async def get() -> float:
            started = time.perf_counter()
            async with session.get(url, allow_redirects=False) as response:
                await response.read()
                if response.status != 200:
                    raise PageError(f"GET {url}: HTTP {response.status}")
            return (time.perf_counter() - started) * 1000

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                timings.append(await get())

        for _ in range(min(WARM_UP, loads)):
            await get()
        await asyncio.gather(*[client() for _ in range(concurrency)])
    return timings


def cpu_seconds(pid: int) -> float | None:
    """A process's user + system CPU time from /proc (Linux), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """A server under load: where it listens and its process (for its CPU time)."""

    port: int
    pid: int


@dataclass
class Figures:
    p50: float
    p95: float
    max: float
    cpu: float | None
    """The server's CPU milliseconds per load: unlike the latencies, barely moved by other work on the machine."""

    @classmethod
    def of(cls, timings: list[float], cpu: float | None) -> Figures:
        ordered = sorted(timings)
        return cls(statistics.median(ordered), ordered[max(0, -(-len(ordered) * 95 // 100) - 1)], ordered[-1], cpu)

    @property
    def cpu_text(self) -> str:
        return "-" if self.cpu is None else f"{self.cpu:.1f}"


async def timed(target: Target, path: str, args: argparse.Namespace, cookies: dict[str, str]) -> Figures:
    before = cpu_seconds(target.pid)
    timings = await load(f"http://127.0.0.1:{target.port}{path}", args.loads, args.concurrency, cookies)
    after = cpu_seconds(target.pid)
    cpu = None if before is None or after is None else (after - before) * 1000 / (args.loads + WARM_UP)
    return Figures.of(timings, cpu)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_row(case: PageCase, ours: Figures, bare: Figures) -> None:
    ratio50, ratio95 = bare.p50 / ours.p50, bare.p95 / ours.p95
    aims = (f"p95<={case.aim_ms:.0f} {verdict(ours.p95 <= case.aim_ms)}  "
            f"ratio>={RATIO_AIM} {verdict(ratio95 >= RATIO_AIM)}")
    print(f"{case.path:54} {ours.p50:6.1f} {ours.p95:6.1f} {ours.max:6.1f} {ours.cpu_text:>5}   {bare.p50:6.1f} "
          f"{bare.p95:6.1f} {bare.cpu_text:>5}   {ratio50:5.2f} {ratio95:5.2f}   {aims}", flush=True)


async def measure(args: argparse.Namespace, ids: Ids, token: str, ours: Target, bare: Target) -> list[str]:
    """Load every page and its bare handler; returns the notes on the pages skipped."""
    routes = routes_here()
    skipped = []
    print(f"{'page':54} {'p50':>6} {'p95':>6} {'max':>6} {'cpu':>5}   {'bare50':>6} {'bare95':>6} {'cpu':>5}   "
          f"{'r50':>5} {'r95':>5}   aims (ms; cpu: the server's per load; ratio = bare / page)")
    for index, case in enumerate(PAGES):
        if case.route not in routes:
            skipped.append(f"{case.path}: no GET {case.route} on this branch, skipped")
            continue
        path = fill(case.path, ids)
        page = await timed(ours, path, args, {SESSION_COOKIE: token})
        query = "&".join(f"{key}={quote(value, safe='@')}" for key, value in ids.items())
        print_row(case, page, await timed(bare, f"/bare/{index}?{query}", args, {}))
    return skipped


# --- The run ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--contacts", type=int, help="contacts to seed (default 100,000; --quick 2,000)")
    parser.add_argument("--emails", type=int, help="emails to seed (default 1,000,000; --quick 20,000)")
    parser.add_argument("--loads", type=int, help="loads per page (default 200; --quick 20)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "plunkd-bench-dashboard"))
    parser.add_argument("--database-url", default="", help="postgresql+asyncpg://… an empty database, or one "
                                                          "this bench seeded before (default: SQLite in --cache-dir)")
    parser.add_argument("--sending", type=float, default=0, metavar="PER_SECOND",
                        help="also load every page again while the dispatcher sends the campaign's queued emails "
                             "at this rate (file transport; SQLite: on a copy of the seed, which stays as it was)")
    args = parser.parse_args(argv)
    if args.sending and args.database_url:
        parser.error("--sending runs on a copy of the SQLite seed, not with --database-url")
    if args.sending < 0:
        parser.error("--sending takes a rate above 0")
    quick = args.quick
    args.contacts = args.contacts or (2_000 if quick else 100_000)
    args.emails = args.emails or (20_000 if quick else 1_000_000)
    args.loads = args.loads or (20 if quick else 200)
    if args.contacts < 20 or args.emails < 100 or args.loads < 1 or args.concurrency < 1:
        parser.error("at least 20 contacts, 100 emails, 1 load and 1 client")
    return args


def data_dir_for(args: argparse.Namespace, key: str) -> Path:
    """The plunkd data dir of this seed (its encryption key; for SQLite also the database)."""
    where = key if not args.database_url else f"{key}-pg-{hashlib.sha256(args.database_url.encode()).hexdigest()[:8]}"
    path = Path(args.cache_dir) / where
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def bench_config(data_dir: Path, database_url: str) -> tuple[Config, dict[str, str]]:
    """The config the servers run with and their environment (delivery and the SMTP relay off)."""
    env = plunkd_env(str(data_dir), 0, PLUNKD_DATABASE_URL=database_url)
    env.pop("PLUNKD_SECURITY_ENCRYPTION_KEY")  # the seed's key file in the data dir, kept with the seed
    return load_config(env=env), env


@contextlib.contextmanager
def servers(env: dict[str, str], database_url: str, data_dir: Path) -> Iterator[tuple[Target, Target]]:
    port, bare_port = free_port(), free_port()
    env = {**env, "PLUNKD_SERVER_HTTP_PORT": str(port)}
    with server_process(["-m", "plunkd.cli", "serve"], port, env) as ours, \
            server_process(["-m", "bench.bare_dashboard_server", database_url, str(data_dir), str(bare_port)],
                           bare_port) as bare:
        yield Target(port, ours.pid), Target(bare_port, bare.pid)


async def prepare(args: argparse.Namespace, config: Config, key: str) -> tuple[dict[str, Any], bool, str]:
    db = Database(config.database_url)
    try:
        manifest, cached = await ready_database(db, config, SeedSize(args.contacts, args.emails), key)
        token = await sign_in(db, config)
    finally:
        await db.dispose()
    return manifest, cached, token


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = seed_key(SeedSize(args.contacts, args.emails))
    data_dir = data_dir_for(args, key)
    config, env = bench_config(data_dir, args.database_url)
    manifest, cached, token = asyncio.run(prepare(args, config, key))
    kind = "PostgreSQL" if args.database_url else f"SQLite ({data_dir / 'plunkd.sqlite3'})"
    seeded = f"seed cached, it took {manifest['seconds']:.1f} s" if cached else f"seeded in {manifest['seconds']:.1f} s"
    print(f"dashboard pages, {kind}: {args.contacts:,} contacts, {args.emails:,} emails ({seeded}); "
          f"{args.loads} loads per page by {args.concurrency} clients; times in ms", flush=True)
    try:
        with servers(env, config.database_url, data_dir) as (ours, bare):
            skipped = asyncio.run(measure(args, manifest["ids"], token, ours, bare))
        if args.sending:
            measure_while_sending(args, manifest["ids"], token, env, config, data_dir)
    except PageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    for note in skipped:
        print(note)
    return 0


def measure_while_sending(args: argparse.Namespace, ids: Ids, token: str, env: dict[str, str], config: Config,
                          data_dir: Path) -> None:
    """The pages again with `plunkd serve`'s dispatcher sending the campaign's queued emails (file
    transport, `--sending` per second), on a copy of the seed so the cached one stays half way."""
    with tempfile.TemporaryDirectory(dir=data_dir, prefix="sending-") as scratch:
        copy = Path(scratch) / "plunkd.sqlite3"
        with contextlib.closing(sqlite3.connect(config.data_path / "plunkd.sqlite3")) as seeded, \
                contextlib.closing(sqlite3.connect(copy)) as target:
            seeded.backup(target)
        outbox = Path(scratch) / "outbox"
        sending = {**env, "PLUNKD_DELIVERY_ENABLED": "true", "PLUNKD_DELIVERY_TRANSPORT": "file",
                   "PLUNKD_DELIVERY_OUTBOX_DIR": str(outbox), "PLUNKD_DELIVERY_RATE_PER_SECOND": str(args.sending),
                   "PLUNKD_WEBHOOKS_ENABLED": "false"}  # the seed's endpoints are not on this machine
        url = f"sqlite+aiosqlite:///{copy}"
        print(f"\nthe same pages while the dispatcher sends the campaign's queued emails at {args.sending:g} per "
              "second (file transport)", flush=True)
        started = time.perf_counter()
        with servers({**sending, "PLUNKD_DATABASE_URL": url}, url, data_dir) as (ours, bare):
            asyncio.run(measure(args, ids, token, ours, bare))
        written = sum(1 for _ in outbox.glob("*.eml")) if outbox.exists() else 0
        print(f"sent while loading: {written:,} emails in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
