"""The dispatcher: claim due outbox rows, finish and sign each message, wait on the shared rate,
hand it to the transport, and record what happened. Steps, in order, for one email:

    skip_if_suppressed → compose_deferred → track → add_outgoing_headers → dkim_sign → bucket.acquire
    → transport.send → record

Campaign and workflow mail is stored as a deferred spec; `compose_deferred` (handed in by the wiring, as delivery
does not import the pipeline) composes it for its recipient, or says not to send it. A transport's bounce (the
smarthost's 5xx at RCPT or DATA) marks the email BOUNCED, and `record_bounce` (handed in the same way) records
it in that transaction as delivery feedback records a permanent bounce. `track` (handed in the same way) adds
the open pixel and click redirects an email's tracking choice asks for; never with the SES transport, which
tracks opens and clicks itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import formatdate, make_msgid

from dkim import DKIMException
from sqlalchemy.orm import Session

from delivery import dkim
from delivery.bucket import TokenBucket
from delivery.transports import SendResult, Transport
from pipeline.events import record_event
from plunkd import metrics
from plunkd.config import DeliveryConfig
from storage import emails as email_store
from storage.db import Database
from storage.emails import Claimed
from storage.models import Domain, utcnow

log = logging.getLogger("plunkd.delivery")
ComposeDeferred = Callable[[Claimed], Awaitable[bytes | None]]
"""A claimed deferred email → its recipient's message, or None: do not send it."""
RecordBounce = Callable[[Session, Claimed, str], None]
"""(transaction, the bounced email, the smarthost's reply) → the bounce's records: event, suppression, unsubscribe."""
TrackMessage = Callable[[Claimed, bytes], Awaitable[bytes]]
"""A claimed email and its message → the message with the tracking its row asks for (or as it was)."""
INLINE_SIGN_BYTES = 256_000
"""Bigger messages are canonicalized in a thread so the event loop keeps serving."""


def add_outgoing_headers(raw: bytes, sender_domain: str) -> tuple[bytes, str]:
    """Prepend Message-ID and Date when the message lacks them; return (message, Message-ID)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw, headersonly=True)
    added = b""
    message_id = str(headers.get("Message-ID", "")).strip()
    if not message_id:
        message_id = make_msgid(domain=sender_domain)
        added += b"Message-ID: " + message_id.encode() + b"\r\n"
    if headers.get("Date") is None:
        added += b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
    return added + raw, message_id


def retry_delay(attempt: int, base: float) -> float:
    """Exponential backoff with full jitter in the upper half: base·2^attempt · [0.5, 1)."""
    return base * (2 ** attempt) * (0.5 + random.random() / 2)


class Dispatcher:
    def __init__(self, db: Database, transport: Transport, bucket: TokenBucket, settings: DeliveryConfig,
                 worker: str | None = None, compose_deferred: ComposeDeferred | None = None,
                 record_bounce: RecordBounce | None = None, track: TrackMessage | None = None) -> None:
        self.db = db
        self.compose_deferred = compose_deferred
        self.record_bounce = record_bounce
        self.track = track if transport.name != "ses" else None
        self.transport = transport
        self.bucket = bucket
        self.settings = settings
        self.worker = worker or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._keys: dict[tuple[str, str], tuple[float, Domain | None]] = {}
        self._send_rate = metrics.SendRate()
        metrics.DISPATCH_RATE_LIMIT.set(bucket.rate)

    async def _signing_key(self, project_id: str, domain_name: str) -> Domain | None:
        """The domain's DKIM key, cached for a minute: it is read for every email."""
        now = time.monotonic()
        cached = self._keys.get((project_id, domain_name))
        if cached is not None and cached[0] > now:
            return cached[1]
        domain = await self.db.read(email_store.domain_key, project_id, domain_name)
        self._keys[(project_id, domain_name)] = (now + 60.0, domain)
        return domain

    def wake(self) -> None:
        """New mail was queued: look now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                handled = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatcher %s: claim failed; retrying", self.worker)
                handled = 0
            if not handled:
                self._send_rate.publish()  # the window moves on while nothing is sent
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
                except TimeoutError:
                    pass

    async def run_once(self) -> int:
        """Claim one batch and start sending it (bounded by `concurrency`); return how many."""
        free = self.settings.batch_size
        claimed = await self.db.write(lambda s: email_store.claim_due(
            s, self.worker, free, self.settings.lease_seconds, self.db.is_postgres))
        for item in claimed:
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver_released(item))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(claimed)

    async def drain(self) -> None:
        """Wait for every message handed out so far (tests and shutdown)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def _deliver_released(self, item: Claimed) -> None:
        """Deliver one email; its slot is given back as soon as the transport has answered, so the
        next message goes out while this one's outcome is being committed."""
        released = False
        try:
            sent = await self.deliver(item)
            self._slots.release()
            released = True
            if sent is not None:
                await self._record(item, *sent)
        except Exception:
            log.exception("email %s: delivery crashed; it will be retried after its lease", item.email_id)
        finally:
            if not released:
                self._slots.release()

    async def deliver(self, item: Claimed) -> tuple[str, SendResult] | None:
        """Everything up to the transport's answer, which is returned as (Message-ID, result) for
        `_record`; None when the email was settled here (suppressed, unsignable)."""
        log.info("email %s: claimed by %s (attempt %d) to %s", item.email_id, self.worker, item.attempts + 1,
                 item.recipient)
        if item.suppressed:
            await self.db.write(lambda s: email_store.mark_failed(s, item.outbox_id, item.email_id, "SUPPRESSED",
                                                                  "recipient is on the suppression list"),
                                light=True)
            metrics.EMAILS_FAILED.labels(self.transport.name, "SUPPRESSED").inc()
            log.info("email %s: skipped, %s is suppressed", item.email_id, item.recipient)
            return None
        raw = item.raw
        if item.deferred:
            composed = None if self.compose_deferred is None else await self.compose_deferred(item)
            if composed is None:
                await self.db.write(lambda s: email_store.mark_failed(
                    s, item.outbox_id, item.email_id, "SKIPPED", "the contact unsubscribed or was deleted before "
                                                                 "this email went out"), light=True)
                metrics.EMAILS_FAILED.labels(self.transport.name, "SKIPPED").inc()
                log.info("email %s: skipped, its contact is no longer subscribed", item.email_id)
                return None
            raw = composed
        if self.track is not None and (item.track_opens or item.track_clicks):
            raw = await self.track(item, raw)
        domain_name = item.sender.rsplit("@", 1)[-1].lower()
        domain = await self._signing_key(item.project_id, domain_name)
        message, message_id = add_outgoing_headers(raw, domain_name)
        if domain is None:
            await self._record(item, message_id, SendResult.fail(f"no DKIM key for {domain_name}"))
            return None
        sign_args = (message, domain.name, domain.dkim_selector, domain.dkim_private_key)
        try:
            if len(message) > INLINE_SIGN_BYTES:
                signed = await asyncio.to_thread(dkim.sign, *sign_args)
            else:
                signed = dkim.sign(*sign_args)
        except DKIMException as exc:
            await self._record(item, message_id, SendResult.fail(f"cannot DKIM-sign the message: {exc}"))
            return None
        await self.bucket.acquire(1)
        return message_id, await self.transport.send(item.sender, [item.recipient], signed,
                                                     envelope_sender=item.envelope_sender)

    async def _record(self, item: Claimed, message_id: str, result: SendResult) -> None:
        settings = self.settings
        if result.outcome == "sent":
            def work(session) -> None:
                email_store.mark_sent(session, item.outbox_id, item.email_id, message_id, result.transport_id)
                record_event(session, item.project_id, item.contact_id, "email.sent",
                             {"messageId": result.transport_id, "transport": self.transport.name},
                             email_id=item.email_id)

            await self.db.write(work, light=True)
            metrics.EMAILS_SENT.labels(self.transport.name).inc()
            self._send_rate.sent()
            log.info("email %s: sent via %s as %s", item.email_id, self.transport.name, result.transport_id)
        elif result.outcome == "bounce":
            def bounced(session) -> None:
                email_store.mark_failed(session, item.outbox_id, item.email_id, "BOUNCED", result.error)
                if self.record_bounce is not None:
                    self.record_bounce(session, item, result.error)

            await self.db.write(bounced, light=True)
            metrics.EMAILS_BOUNCED.labels(self.transport.name, "permanent").inc()
            log.warning("email %s: bounced by %s: %s", item.email_id, self.transport.name, result.error)
        elif result.outcome == "retry" and item.attempts + 1 < settings.max_attempts:
            due = utcnow() + timedelta(seconds=retry_delay(item.attempts, settings.retry_base_seconds))
            await self.db.write(lambda s: email_store.schedule_retry(s, item.outbox_id, due, result.error), light=True)
            log.warning("email %s: transient failure (%s); retry at %s", item.email_id, result.error, due.isoformat())
        else:
            reason = result.error
            if result.outcome == "retry":
                reason = f"gave up after {item.attempts + 1} attempts: {result.error}"
            await self.db.write(lambda s: email_store.mark_failed(s, item.outbox_id, item.email_id, "FAILED", reason),
                                light=True)
            metrics.EMAILS_FAILED.labels(self.transport.name, "FAILED").inc()
            log.warning("email %s: failed permanently: %s", item.email_id, reason)
