"""The workflow scheduler: a loop of small named steps, as the dispatcher and the campaign fan-out are.

    earliest_due (a read: is anything due, or when?) → claim + execute (one write transaction per batch:
    the claim, every step's effect and the runs' advance commit together, see `pipeline.workflows.engine`)
    → on_queued (wake the dispatcher when a step queued mail) → post webhooks (after the commit, through
    `webhooks.client`, as endpoint webhooks are) → finish_webhook

When idle it sleeps until the earliest run is due, or `poll_seconds` at most (runs started by another
process wake it through `wake`; the poll is for those that cannot, such as another node's), and it works
through a backlog batch after batch without waiting. It runs beside the dispatcher (one per node); on
PostgreSQL several nodes share the work through `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from core.config import WebhooksConfig
from core.loop import DueLoop
from pipeline.links import LinkSigner
from pipeline.webhook_targets import url_host
from pipeline.workflows import engine as engine
from pipeline.workflows.engine import Executed, Webhook
from storage import workflows as store
from storage.db import Database
from storage.models import utcnow
from webhooks.client import WebhookClient, body_of

log = logging.getLogger("plunkd.automation")
PARALLEL_POSTGRES = 2
USER_AGENT = "plunkd-workflows"
BATCH = 500
"""Runs claimed per transaction: a batch of sends holds the write lock for tens of milliseconds, and a
smaller one pays the claim and commit more often (100 ran half as many steps a second)."""


class WorkflowScheduler(DueLoop):
    def __init__(self, db: Database, links: LinkSigner | None, on_queued: Callable[[], None],
                 poll_seconds: float = 0.2, batch: int = BATCH, webhooks: WebhooksConfig | None = None,
                 max_bytes: int | None = None) -> None:
        self.db = db
        self.links = links
        self.max_bytes = max_bytes
        """`smtp.max_message_bytes`: a send step fails a run whose email would render larger."""
        self.on_queued = on_queued
        super().__init__(min(poll_seconds, 0.5), log, "workflow scheduler")
        self.batch = batch
        self.parallel = PARALLEL_POSTGRES if db.is_postgres else 1
        """Batches claimed and executed at once, each in its own transaction: on PostgreSQL the database's
        work for one overlaps the Python of another (`FOR UPDATE SKIP LOCKED` keeps them apart)."""
        self.steps = 0
        self.client = WebhookClient(webhooks or WebhooksConfig(), USER_AGENT)
        """Webhook steps POST as endpoint webhooks do, under the same `[webhooks]` rules."""
        self._posting: set[asyncio.Task[None]] = set()

    async def step(self) -> bool:
        return await self.run_once()

    async def run_once(self) -> bool:
        """Execute one batch of due runs; True when the batch was full (more may be due)."""
        earliest = await self.db.read(store.earliest_due)
        if earliest is None or earliest > utcnow():
            self.next_due = earliest
            return False
        batches: list[Executed] = await asyncio.gather(*(
            self.db.write(lambda s: engine.run_due(s, utcnow(), self.batch, self.links, self.db.is_postgres,
                                                   self.max_bytes), alone=True)
            for _ in range(self.parallel)))
        if any(done.emails for done in batches):
            self.on_queued()
        for done in batches:
            self.steps += done.steps
            for hook in done.webhooks:
                task = asyncio.create_task(self._post(hook))
                self._posting.add(task)
                task.add_done_callback(self._posting.discard)
        self.next_due = utcnow()  # look again at once: these steps may have made runs due at unknown times
        return any(done.runs >= self.batch for done in batches)

    async def run_until_idle(self, rounds: int = 100) -> None:
        """Tests: execute what is due now, and the webhooks it posts, until nothing is due."""
        for _ in range(rounds):
            busy = await self.run_once()
            await self.drain()
            if not busy:
                earliest = await self.db.read(store.earliest_due)
                if earliest is None or earliest > utcnow():
                    return

    async def drain(self) -> None:
        while self._posting:
            await asyncio.gather(*list(self._posting), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._posting):
            task.cancel()
        await asyncio.gather(*list(self._posting), return_exceptions=True)
        await self.client.close()

    async def _post(self, hook: Webhook) -> None:
        """POST the webhook (at least once: a run whose outcome is not recorded is posted again after its
        lease), then record the outcome and move the run on."""
        status, error = await self.client.post(hook.url, body_of(hook.payload), {})
        log.info("workflow run %s: webhook to %s → %s", hook.run_id, url_host(hook.url), status or error)
        try:
            moved = await self.db.write(lambda s: engine.finish_webhook(s, hook, status, error, utcnow()))
        except Exception:
            log.exception("workflow run %s: could not record its webhook; it is posted again after its lease",
                          hook.run_id)
            return
        if moved:
            self.wake()
