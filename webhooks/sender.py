"""The webhook sender: a loop of small named steps, as the dispatcher and the workflow scheduler are.

    earliest_due (is anything due, or when?) → claim (one write: the lease) → for each delivery, at most
    `concurrency` at once: sign → post → record (one write: the attempt, the delivery's next state and
    the endpoint's failure streak, which may disable it)

and every PRUNE_SECONDS, prune (deliveries settled more than `keep_days` ago).

A request follows the Standard Webhooks spec: the JSON body, `webhook-id` (the delivery's id, the same on
every attempt, so receivers can dedupe), `webhook-timestamp` (this attempt's, in seconds) and
`webhook-signature`: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the endpoint's secret (and a
second one under the secret before a rotation, while it lasts). A 2xx is success; anything else, a timeout
or a refused connection is retried with exponential backoff and jitter until `give_up_after_seconds`
after the event. The POST goes through `webhooks.client` (the workflow scheduler's client too):
redirects are not followed, a reply's body is read up to `max_response_bytes`, and unless
`allow_private_targets` no connection goes to a non-public address, checked on the address connected to
(so a public name pointing inside fails too).

It runs beside the dispatcher (one per node); on PostgreSQL several nodes share the work through
`FOR UPDATE SKIP LOCKED`. A sender that dies between the POST and the record leaves the delivery leased:
it is sent again, with the same `webhook-id`, when the lease runs out (at least once).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from datetime import UTC, datetime, timedelta

from standardwebhooks import Webhook

from core.config import WebhooksConfig
from core.loop import DueLoop
from pipeline.webhook_targets import url_host
from storage import webhooks as store
from storage.db import Database
from storage.models import utcnow
from storage.webhooks import Attempt, ClaimedDelivery, Outcome, Recorded
from webhooks.client import WebhookClient, body_of

log = logging.getLogger("plunkd.webhooks")
PRUNE_SECONDS = 600.0
PRUNE_BATCH = 500
USER_AGENT = "plunkd-webhooks/0.1"


def retry_delay(attempt: int, base: float, ceiling: float) -> float:
    """Exponential backoff with jitter in the upper half: min(base·2^attempt, ceiling) · [0.5, 1)."""
    return min(base * (2 ** min(attempt, 40)), ceiling) * (0.5 + random.random() / 2)


def next_attempt(delivery: ClaimedDelivery, attempt: Attempt, settings: WebhooksConfig) -> datetime | None:
    """When to try again after a failed attempt, or None: the next try would fall past the delivery's
    `give_up_after_seconds`, so it FAILS now."""
    retry_at = attempt.at + timedelta(seconds=retry_delay(delivery.attempts, settings.retry_base_seconds,
                                                          settings.retry_max_seconds))
    if (retry_at - delivery.created_at).total_seconds() > settings.give_up_after_seconds:
        return None
    return retry_at


def signed_headers(delivery_id: str, body: str, secrets: list[str], at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt; one `v1,` signature per secret."""
    moment = at.replace(microsecond=0)
    signatures = " ".join(Webhook(secret).sign(delivery_id, moment, body) for secret in secrets)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": signatures}


class WebhookSender(DueLoop):
    def __init__(self, db: Database, settings: WebhooksConfig) -> None:
        super().__init__(settings.poll_seconds, log, "webhook sender")
        self.db = db
        self.settings = settings
        self.delivered = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self.client = WebhookClient(settings, USER_AGENT)
        self._pruned_at: float | None = None
        self._busy = False
        """The last claim got all it asked for: more may be due, so the next one skips the earliest-due read."""
        self._held = 0
        """Deliveries claimed and not yet answered (waiting for a slot, or being posted)."""
        self._slots = asyncio.Semaphore(settings.concurrency)
        """A slot is a POST in flight: free again once the reply is in, while the outcome is recorded."""
        self._slot_freed = asyncio.Event()
        self._outcomes: list[tuple[Outcome, asyncio.Future[Recorded | None]]] = []
        self._recorder: asyncio.Task[None] | None = None
        """Writes the outcomes waiting in `_outcomes`, all in one transaction, then those that came meanwhile."""

    async def step(self) -> bool:
        claimed = await self.run_once()
        await self._prune_now_and_then()
        return claimed > 0

    async def run_once(self) -> int:
        """Claim due deliveries and start posting them, `concurrency` POSTs at a time; returns how many.
        A claim is made once fewer than `concurrency` claimed deliveries are left unanswered, for up to
        `batch_size` more (a claim costs a transaction, whatever its size), but never more than can be
        answered within their lease: `concurrency` × (lease_seconds // timeout_seconds) held at once. The
        earliest due time is read only after a claim that found less than it asked for."""
        slots = self.settings.concurrency
        if self._held >= slots:
            self._slot_freed.clear()
            await self._slot_freed.wait()
            return 1
        if not self._busy:
            earliest = await self.db.read(store.earliest_due)
            if earliest is None or earliest > utcnow():
                self.next_due = earliest
                return 0
        self.next_due = None
        lease = self.settings.lease_seconds
        most = slots * max(1, int(lease // self.settings.timeout_seconds))
        free = min(self.settings.batch_size, most - self._held)
        claimed = await self.db.write(lambda s: store.claim_due(s, utcnow(), free, lease, self.db.is_postgres),
                                      light=True)
        self._busy = len(claimed) == free
        self._held += len(claimed)
        for delivery in claimed:
            task = asyncio.create_task(self._deliver_and_record(delivery))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(claimed)

    async def run_until_idle(self, rounds: int = 1000) -> None:
        """Tests: deliver what is due now, and wait for each outcome, until nothing is due."""
        for _ in range(rounds):
            claimed = await self.run_once()
            await self.drain()
            if not claimed:
                return

    async def drain(self) -> None:
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        if self._recorder is not None:
            self._recorder.cancel()
            await asyncio.gather(self._recorder, return_exceptions=True)
        await self.client.close()

    async def _deliver_and_record(self, delivery: ClaimedDelivery) -> None:
        try:
            try:
                async with self._slots:
                    attempt = await self.post(delivery)
            finally:
                self._held -= 1
                self._slot_freed.set()
            await self._record(delivery, attempt)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook delivery %s: failed to post or record; it is sent again after its lease",
                          delivery.id)

    async def post(self, delivery: ClaimedDelivery) -> Attempt:
        """Sign and POST one attempt; the outcome, whatever happened (never raises for the receiver's sake)."""
        at = datetime.now(UTC)
        started = time.perf_counter()
        body = body_of(delivery.payload)
        status, error = await self.client.post(delivery.url, body,
                                               signed_headers(delivery.id, body, delivery.secrets, at))
        return Attempt(at, status, round((time.perf_counter() - started) * 1000), error)

    async def _record(self, delivery: ClaimedDelivery, attempt: Attempt) -> None:
        retry_at = None if attempt.ok else next_attempt(delivery, attempt, self.settings)
        recorded: Recorded | None = await self._written(Outcome(delivery, attempt, retry_at))
        host = url_host(delivery.url)
        number = delivery.attempts + 1
        if recorded is None:
            log.info("webhook delivery %s: attempt %d to %s answered %s, but another sender holds it now (or its "
                     "endpoint %s was disabled or deleted); not recorded", delivery.id, number, host,
                     attempt.status or attempt.error, delivery.endpoint_id)
            return
        if recorded.status == store.DELIVERED:
            self.delivered += 1
            log.info("webhook delivery %s (%s): delivered to endpoint %s (%s) on attempt %d, HTTP %s in %d ms",
                     delivery.id, delivery.event_name, delivery.endpoint_id, host, number, attempt.status,
                     attempt.duration_ms)
        elif recorded.status == store.PENDING:
            assert retry_at is not None
            log.warning("webhook delivery %s (%s): attempt %d to endpoint %s (%s) failed (%s); retry at %s",
                        delivery.id, delivery.event_name, number, delivery.endpoint_id, host, attempt.error,
                        retry_at.isoformat())
        else:
            log.warning("webhook delivery %s (%s): failed on attempt %d to endpoint %s (%s): %s", delivery.id,
                        delivery.event_name, number, delivery.endpoint_id, host, attempt.error)
        if recorded.disabled:
            log.warning("webhook endpoint %s disabled: %s", delivery.endpoint_id, recorded.disabled)

    def _written(self, outcome: Outcome) -> asyncio.Future[Recorded | None]:
        """The outcome, recorded with every other one that finished meanwhile (one transaction for them all)."""
        future: asyncio.Future[Recorded | None] = asyncio.get_running_loop().create_future()
        self._outcomes.append((outcome, future))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._write_outcomes())
        return future

    async def _write_outcomes(self) -> None:
        settings = self.settings
        while self._outcomes:
            batch, self._outcomes = self._outcomes, []
            outcomes = [outcome for outcome, _ in batch]
            try:
                results = await self.db.write(functools.partial(
                    store.record_attempts, outcomes=outcomes, disable_after_failures=settings.disable_after_failures,
                    disable_after_seconds=settings.disable_after_seconds), light=True)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _prune_now_and_then(self) -> None:
        if self._pruned_at is None or time.monotonic() - self._pruned_at >= PRUNE_SECONDS:
            self._pruned_at = time.monotonic()
            await self.prune()

    async def prune(self) -> None:
        """Delete the deliveries settled more than `keep_days` ago, a batch per transaction."""
        if self.settings.keep_days <= 0:
            return
        before = utcnow() - timedelta(days=self.settings.keep_days)
        removed = PRUNE_BATCH
        while removed == PRUNE_BATCH:
            removed = await self.db.write(lambda s: store.prune_settled(s, before, PRUNE_BATCH))
            if removed:
                log.info("pruned %d webhook deliveries settled before %s", removed, before.isoformat())
