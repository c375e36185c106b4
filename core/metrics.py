"""Prometheus metrics: the objects every package updates, and `GET /metrics`'s exposition.

Like `core.config`, this module imports nothing from the rest of the project, so any package may
import it. `plunkd serve` runs acceptance and delivery in two processes; prometheus-client's
multiprocess mode (`use_shared_directory`, called before the first import of prometheus_client) lets
both write their samples to files in one folder, which the API process reads when scraped. Without
it (tests, `python -m` tools) the samples live in this process's default registry.

Counts that follow a database write (emails accepted) are added when the transaction commits
(`count_at_commit`), so a rolled-back send counts nothing.
"""

from __future__ import annotations

import os
from collections import deque
from time import monotonic
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import event
from sqlalchemy.orm import Session

from core.multiproc import MULTIPROC_ENV

EMAILS_ACCEPTED = Counter("plunkd_emails_accepted", "Emails accepted for delivery (queued or recorded skipped)",
                          ["source"])
EMAILS_SENT = Counter("plunkd_emails_sent", "Emails the transport accepted", ["transport"])
EMAILS_FAILED = Counter("plunkd_emails_failed", "Emails settled without being sent, by final status",
                        ["transport", "status"])
EMAILS_BOUNCED = Counter("plunkd_emails_bounced", "Bounces reported for sent emails (kind: permanent or "
                         "transient)", ["transport", "kind"])
DISPATCH_RATE_LIMIT = Gauge("plunkd_dispatch_rate_limit_per_second", "The send rate the dispatcher holds to "
                            "(0: unlimited)", multiprocess_mode="max")
DISPATCH_RATE = Gauge("plunkd_dispatch_rate_per_second", "Emails sent per second over the last 10 seconds",
                      multiprocess_mode="livesum")
OUTBOX_DEPTH = Gauge("plunkd_outbox_depth", "Emails waiting in the outbox (due or not), by priority",
                     ["priority"], multiprocess_mode="mostrecent")
OUTBOX_OLDEST_DUE = Gauge("plunkd_outbox_oldest_due_seconds", "How long the longest-waiting due email has been "
                          "due (0: none due)", multiprocess_mode="mostrecent")
OUTBOX_HELD = Gauge("plunkd_outbox_held", "Emails held in the outbox, by reason (DKIM: their domain's DKIM record "
                    "is missing; PAUSED: their campaign is paused)", ["reason"], multiprocess_mode="mostrecent")
PROJECT_BOUNCE_RATE = Gauge("plunkd_project_bounce_rate", "A project's hard bounces per send over the last 7 days "
                            "(projects that sent in them)", ["project"], multiprocess_mode="mostrecent")
PROJECT_COMPLAINT_RATE = Gauge("plunkd_project_complaint_rate", "A project's complaints per send over the last 7 "
                               "days (projects that sent in them)", ["project"], multiprocess_mode="mostrecent")
SMTP_SESSIONS_OPEN = Gauge("plunkd_smtp_sessions_open", "SMTP sessions open now", multiprocess_mode="livesum")
SMTP_SESSIONS = Counter("plunkd_smtp_sessions", "SMTP sessions accepted")
INBOUND_MESSAGES = Counter("plunkd_inbound_messages", "Messages taken by inbound SMTP, by what they were (dsn, "
                           "arf, routed, dropped: a reply to a VERP address that is neither a DSN nor an ARF "
                           "report, or a report naming no email)", ["kind"])
INBOUND_REFUSED = Counter("plunkd_inbound_refused_recipients", "RCPT TO refused by inbound SMTP (550 5.1.1)")
SMTP_AUTH_FAILURES = Counter("plunkd_smtp_auth_failures", "SMTP AUTH attempts refused")
HTTP_DURATION = Histogram("plunkd_http_request_duration_seconds", "HTTP requests by route template, method and "
                          "status", ["route", "method", "status"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
PRIORITY_NAMES = {0: "transactional", 1: "campaign"}

_AT_COMMIT = "plunkd.metrics_at_commit"


def count_at_commit(session: Session, counter: Any, amount: float = 1.0) -> None:
    """Add `amount` to `counter` (a labelled child) when this session's transaction commits."""
    if amount:
        pending: dict[Any, float] = session.info.setdefault(_AT_COMMIT, {})
        pending[counter] = pending.get(counter, 0.0) + amount


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for counter, amount in session.info.pop(_AT_COMMIT, {}).items():
        counter.inc(amount)


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back(session: Session, previous: Any) -> None:
    if not previous.nested:
        session.info.pop(_AT_COMMIT, None)


class SendRate:
    """Emails sent per second over a sliding 10 s window, published as `DISPATCH_RATE`."""

    WINDOW = 10.0

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def sent(self) -> None:
        now = monotonic()
        self._times.append(now)
        self.publish(now)

    def publish(self, now: float | None = None) -> None:
        now = monotonic() if now is None else now
        while self._times and self._times[0] < now - self.WINDOW:
            self._times.popleft()
        DISPATCH_RATE.set(len(self._times) / self.WINDOW)


def exposition() -> tuple[bytes, str]:
    """The text every process of this server wrote (multiprocess mode), or this process's."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_ended(pid: int) -> None:
    """A child process of this server is gone: its live gauges (open sessions, send rate) go with it."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
