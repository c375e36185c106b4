"""The campaign fan-out: a loop of small named steps, as the dispatcher is.

    start_due (SCHEDULED → SENDING, spec fixed) → fan_out_next (a chunk per transaction, until done)
    → finish_drained (SENDING → SENT once the campaign's last email has left the outbox)

It runs in the acceptance (API) process of each node (see `plunkd.app.fanout_ctx`). On PostgreSQL several
nodes may run it at once: each chunk locks its campaign row, and the unique (campaign, contact) index
makes a second email impossible.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from core.loop import DueLoop
from pipeline.links import LinkSigner
from pipeline.marketing import campaigns as rules
from storage import campaigns as store
from storage.db import Database
from storage.models import utcnow

log = logging.getLogger("plunkd.campaigns")


WAKE_GAP_SECONDS = 0.25
"""Every queued message wakes the fan-out (it shares the node's wake-up with the dispatcher), and each step
reads the due campaigns and the drained ones (settled in a write when there are any): at most this often for
wake-ups."""


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


class CampaignFanOut(DueLoop):
    def __init__(self, db: Database, links: LinkSigner, on_queued: Callable[[], None], poll_seconds: float = 1.0,
                 chunk: int = 2000) -> None:
        self.db = db
        self.links = links
        self.on_queued = on_queued
        self.chunk = chunk
        self.shares_writer = not db.is_postgres
        """SQLite's one writer runs a chunk while requests' writes wait (on PostgreSQL a chunk commits on a
        connection of its own)."""
        super().__init__(poll_seconds, log, "campaign fan-out", WAKE_GAP_SECONDS)

    async def step(self) -> bool:
        await self.run_once()
        return False

    async def run_once(self) -> int:
        """Fan out every campaign now due, to the end; then settle the drained ones. Returns how many
        emails were queued."""
        queued = 0
        for campaign in await self.db.read(store.campaigns_to_start, utcnow()):
            started = await self.db.write(functools.partial(rules.start_fanout, campaign_id=campaign.id,
                                                                   links=self.links))
            if started is None:
                continue
            finished = False
            size = self.chunk
            others_seen = float("-inf")
            while not finished:
                alone = size == self.chunk
                others_before = self.db.writer.others_committed
                # alone: on PostgreSQL a chunk (a few hundred ms of index upkeep) commits on its own connection,
                # so API requests' writes do not wait in its batch
                count, finished = await self.db.write(
                    functools.partial(rules.fan_out_next, campaign_id=campaign.id, chunk=size), alone=alone)
                queued += count
                if count:
                    self.on_queued()
                now = time.monotonic()
                if self.db.writer.others_committed - others_before - (0 if alone else 1):
                    others_seen = now
                shared = self.shares_writer and now - others_seen <= SHARED_QUIET_SECONDS
                size = max(1, self.chunk // SHARED_CHUNK_DIVISOR) if shared else self.chunk
        if await self.db.read(store.drained_campaigns):  # a read: every queued message wakes this loop
            await self.db.write(lambda s: store.finish_drained(s, utcnow()))
        return queued
