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
reads the due campaigns and settles drained ones in a write: at most this often for wake-ups."""


class CampaignFanOut(DueLoop):
    def __init__(self, db: Database, links: LinkSigner, on_queued: Callable[[], None], poll_seconds: float = 1.0,
                 chunk: int = 2000) -> None:
        self.db = db
        self.links = links
        self.on_queued = on_queued
        self.chunk = chunk
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
            while not finished:
                # alone: on PostgreSQL a chunk (a few hundred ms of index upkeep) commits on its own connection,
                # so API requests' writes do not wait in its batch
                count, finished = await self.db.write(
                    functools.partial(rules.fan_out_next, campaign_id=campaign.id, chunk=self.chunk), alone=True)
                queued += count
                if count:
                    self.on_queued()
        await self.db.write(lambda s: store.finish_drained(s, utcnow()))
        return queued
