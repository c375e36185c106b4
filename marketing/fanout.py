"""The campaign fan-out: a loop of small named steps, as the dispatcher is.

    start_due (SCHEDULED → SENDING, spec fixed) → fan_out_next (a chunk per transaction, until done)
    → finish_drained (SENDING → SENT once the campaign's last email has left the outbox)

On PostgreSQL, while no request is writing, a step plans the next `RANGES` chunks as ranges of recipients
(plan_fan_out), queues them at once on connections of their own (fan_out_range), then moves the cursor past
them (advance_fan_out).

It runs in the acceptance (API) process of each node (see `plunkd.app.fanout_ctx`). On PostgreSQL several
nodes may run it at once: each chunk locks its campaign row, and the unique (campaign, contact) index
makes a second email impossible (a range run again after a crash, or by two nodes, skips those it has).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from datetime import datetime

from core.loop import DueLoop
from pipeline.links import LinkSigner
from pipeline.marketing import campaigns as rules
from storage import campaigns as store
from storage.db import Database
from storage.models import Campaign, utcnow

log = logging.getLogger("plunkd.campaigns")


WAKE_GAP_SECONDS = 0.25
"""Every queued message wakes the fan-out (it shares the node's wake-up with the dispatcher), and each step
reads the due campaigns, the paused ones and the drained ones (settled in a write when there are any): at most
this often for wake-ups."""


SHARED_CHUNK_DIVISOR = 8
"""On SQLite, while requests are writing, the fan-out queues chunks this much smaller than `chunk` in the requests'
own transactions (one commit for both) instead of full chunks in transactions of their own: a request then waits
for a small chunk at most, not for a full one and its commit. Measured with bench.campaign (100,000 recipients,
/v1/send probes all along, SQLite's chunk 1,000): full chunks only, p99 62 ms; a fifth, p99 2.25-2.39x idle and
the fan-out about 6 s; an eighth (125 recipients, with SHARED_QUIET_SECONDS), 1.40-1.94x in six runs and 7.4-8.5 s;
a tenth, 1.86-1.90x and 9.9 s (the aim is 10). With no other writes it runs full chunks back to back."""


SHARED_QUIET_SECONDS = 1.0
"""How long after requests last wrote beside it the fan-out keeps to its smaller shared chunks. Deciding on the last
chunk alone, a full chunk taken in a lull of a steady stream held the next requests for 15-28 ms (a probe's log
during bench.campaign); without this, an eighth gave p99 1.80x and 2.72x."""


RANGES = 2
"""PostgreSQL, while no request is writing: chunks queued at once, each on a connection of its own. A chunk is
mostly the server's index and foreign-key upkeep for each row, one core's work. Measured on the 2-core machine
(100,000 recipients, chunks of 2,000): the two `INSERT … SELECT`s alone, one at a time 4.0-4.4 s, two at once
2.7-2.8 s, three 3.3 s; a real server with no requests, 5.0-5.4 s one at a time, 4.0 s two at once. With
bench.campaign's /v1/send probes all along, two at once took 6.3-6.4 s instead of about 7, and the probes' p99
went from 1.3-1.9x idle to 2.6x: while requests write, one chunk at a time."""


class CampaignFanOut(DueLoop):
    def __init__(self, db: Database, links: LinkSigner, on_queued: Callable[[], None], poll_seconds: float = 1.0,
                 chunk: int = 2000) -> None:
        self.db = db
        self.links = links
        self.on_queued = on_queued
        self.chunk = chunk
        self._released_leftovers = False
        """Whether this process has released the emails a resume cut short by a crash left parked."""
        self._parked_pauses: set[tuple[str, datetime]] = set()
        """(campaign id, last change) of the paused campaigns whose emails this process has parked."""
        super().__init__(poll_seconds, log, "campaign fan-out", WAKE_GAP_SECONDS)

    async def step(self) -> bool:
        await self.run_once()
        return False

    async def run_once(self) -> int:
        """Fan out every campaign now due, to the end; then settle the drained ones. Returns how many
        emails were queued. The first run in a process also releases the emails of resumed campaigns that a
        crash left parked (a resume releases them a thousand per transaction after it commits). Each run parks the
        emails of the campaigns paused since the last (`park_paused`)."""
        queued = 0
        if not self._released_leftovers:
            for campaign_id in await self.db.read(store.campaigns_parked_but_not_paused):
                released = await rules.release_parked_emails(self.db, campaign_id)
                log.info("campaign %s: %d emails left parked after its resume released", campaign_id, released)
            self._released_leftovers = True
        await self.park_paused()
        for campaign in await self.db.read(store.campaigns_to_start, utcnow()):
            started = await self.start(campaign.id)
            if started is None:
                continue
            queued += await self.fan_out(started.id)
        if await self.db.read(store.drained_campaigns):  # a read: every queued message wakes this loop
            await self.db.write(lambda s: store.finish_drained(s, utcnow()))
        return queued

    async def park_paused(self) -> None:
        """Park the queued emails of each campaign paused since this process last looked, a thousand per
        transaction (a pause only changes the status, in the transaction of the bounce or complaint that crossed
        the level). The first run in a process walks every paused campaign: a crash may have cut a walk short.
        A campaign resumed and paused again between two runs is not walked again; the dispatcher parks each of
        its emails as it claims it."""
        paused = set(await self.db.read(store.paused_campaigns))
        for campaign_id, changed in paused - self._parked_pauses:
            parked = await rules.park_paused_emails(self.db, campaign_id)
            self._parked_pauses.add((campaign_id, changed))
            if parked:
                log.info("campaign %s: paused, %d queued emails parked", campaign_id, parked)
        self._parked_pauses &= paused

    async def start(self, campaign_id: str) -> Campaign | None:
        """SCHEDULED → SENDING (`start_fanout`; a campaign already SENDING as it is, None if it is neither), then on
        PostgreSQL the contacts' statistics the chunks are planned from (`refresh_audience_statistics`), in a
        transaction of its own: ANALYZE reads a sample of the whole table (about 70 ms at 100,000 contacts), and
        in start_fanout's batch every request whose write came meanwhile waited for it."""
        started = await self.db.write(functools.partial(rules.start_fanout, campaign_id=campaign_id, links=self.links))
        if started is not None and self.db.is_postgres:
            await self.db.write(store.refresh_audience_statistics, alone=True)
        return started

    async def fan_out(self, campaign_id: str) -> int:
        """Queue the campaign's recipients to the end, a chunk per transaction. While requests write (within
        SHARED_QUIET_SECONDS), SQLite's chunks are smaller and share the requests' transactions (one commit for
        both), and PostgreSQL's run one at a time on a connection of their own; while none do, SQLite's are full
        size and PostgreSQL queues `RANGES` at once (`queue_ranges`), except the first chunk, which refreshes the
        statistics the others' foreign-key checks are planned from (`storage.campaigns.refresh_email_statistics`).
        Returns how many were queued."""
        queued, finished, first, quiet = 0, False, True, True
        others_seen = float("-inf")
        while not finished:
            others_before = self.db.writer.others_committed
            if self.db.is_postgres and quiet and not first:
                count, finished = await self.queue_ranges(campaign_id)
                own_commits = 1
            else:
                shared = not (quiet or self.db.is_postgres)
                size = max(1, self.chunk // SHARED_CHUNK_DIVISOR) if shared else self.chunk
                count, finished = await self.db.write(
                    functools.partial(rules.fan_out_next, campaign_id=campaign_id, chunk=size), alone=not shared)
                own_commits = 1 if shared else 0
            first = False
            queued += count
            if count:
                self.on_queued()
            now = time.monotonic()
            if self.db.writer.others_committed - others_before - own_commits:
                others_seen = now
            quiet = now - others_seen > SHARED_QUIET_SECONDS
        return queued

    async def queue_ranges(self, campaign_id: str) -> tuple[int, bool]:
        """PostgreSQL: the next `RANGES` chunks at once, each a range of recipients committed on a connection of
        its own; returns (queued, finished). The cursor moves only once every range is committed: one that
        failed is run again from there, and those committed skip the recipients they queued."""
        plan = await self.db.read(rules.plan_fan_out, campaign_id, self.chunk, RANGES)
        if plan is None:
            return 0, True
        results = await asyncio.gather(*(self.db.write(functools.partial(
            rules.fan_out_range, campaign_id=campaign_id, after=after, upto=upto), alone=True)
            for after, upto in plan.ranges), return_exceptions=True)
        failed = [error for error in results if isinstance(error, BaseException)]
        if failed:
            raise failed[0]
        finished = await self.db.write(functools.partial(rules.advance_fan_out, campaign_id=campaign_id, plan=plan),
                                       light=True)
        return sum(count for count in results if isinstance(count, int)), finished
