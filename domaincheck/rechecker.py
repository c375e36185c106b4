"""The domain re-check: every verified domain (and every domain holding mail) has its records looked up
again every `dns.recheck_hours`. A loop of small named steps:

    claim_due (checked_at moved on, in one short transaction) → look_up (DNS, outside any transaction)
    → save_check (verdict, events, hold or release of its mail: `pipeline.domains.save_check`)

It runs beside the dispatcher (one per node). On PostgreSQL several nodes may run it at once: the claim takes
due domains with SKIP LOCKED and moves their `checked_at` in the same transaction, so each domain is looked
up by one node per interval.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from core.config import Config
from core.loop import DueLoop
from pipeline import domains as rules
from storage import domains as domain_store
from storage.db import Database
from storage.models import Domain, utcnow

log = logging.getLogger("plunkd.domains")
POLL_SECONDS = 60.0
BATCH = 20
"""Domains claimed per transaction; each is looked up in turn (a few DNS queries, `dns.timeout_seconds` at most)."""


class DomainRechecker(DueLoop):
    def __init__(self, db: Database, config: Config,
                 ses_verified: Callable[[Any, str], Awaitable[bool]] | None = None,
                 on_change: Callable[[str, str], None] = lambda project_id, name: None,
                 clock: Callable[[], datetime] = utcnow, poll_seconds: float = POLL_SECONDS) -> None:
        """`ses_verified`: the SES identity check (with the SES transport); `on_change(project_id, name)`: a
        domain's verdict or hold may have changed (the dispatcher of this process forgets its cached key)."""
        self.db = db
        self.config = config
        self.ses_verified = ses_verified
        self.on_change = on_change
        self.clock = clock
        super().__init__(poll_seconds, log, "domain re-check")

    async def step(self) -> bool:
        await self.run_once()
        return False

    async def run_once(self) -> int:
        """Re-check every domain now due; returns how many were looked up."""
        hours = self.config.dns.recheck_hours
        if hours <= 0:
            return 0
        checked = 0
        while True:
            now = self.clock()
            due = await self.db.write(functools.partial(
                domain_store.claim_rechecks, now=now, checked_before=now - timedelta(hours=hours), limit=BATCH,
                postgres=self.db.is_postgres))
            for domain in due:
                await self.recheck(domain)
            checked += len(due)
            if len(due) < BATCH:
                return checked

    async def recheck(self, domain: Domain) -> None:
        check = await rules.verify(domain, self.config, self.ses_verified)
        saved = await self.db.write(lambda s: rules.save_check(s, domain.id, check, recheck=True))
        self.on_change(saved.project_id, saved.name)
        log.info("domain %s re-checked: %s", saved.name, rules.domain_status(saved))
