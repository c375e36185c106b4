"""The dispatcher: claim due outbox rows, finish and sign each message, wait on the shared rate,
hand it to the transport, and record what happened. Steps, in order, for one email:

    skip_if_suppressed → skip_if_campaign_stopped → compose_deferred → track → add_outgoing_headers
    → hold_if_dkim_missing → dkim_sign → bucket.acquire → skip_if_campaign_stopped → transport.send → record

At most `concurrency` emails are being prepared at once, and at most `concurrency` are handed to the
transport and not yet recorded, so a dispatcher killed at any moment has sent at most `concurrency` emails
it did not record (they are sent again after their lease). Each goes out with the Message-ID it was given
when accepted, every time, so a receiver can tell the second copy. The emails of a campaign cancelled after
they were claimed are cancelled here, those of a paused campaign parked (`skip_if_campaign_stopped`); the
emails of a domain whose DKIM record vanished are parked too (`hold_if_dkim_missing`), not sent unsigned.

Campaign and workflow mail is stored as a deferred spec; `compose_deferred` (handed in by the wiring) composes
it for its recipient, or says not to send it; a `PipelineError` it raises (a message over the size limit)
fails the email with that reason, for good. A transport's bounce (the
smarthost's 5xx at RCPT or DATA) marks the email BOUNCED, and `record_bounce` (handed in the same way) records
it in that transaction as delivery feedback records a permanent bounce. With `verp` (handed in the same way),
an email whose domain has a verified return path goes out with a VERP envelope sender on it (`envelope_sender`),
so a bounce that comes later names it. `track` (handed in the same way) adds
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
from email.utils import formatdate

from sqlalchemy.orm import Session

from core import metrics
from core.config import DeliveryConfig
from core.loop import DueLoop
from delivery import dkim
from delivery.bucket import TokenBucket
from delivery.result import SendOutcome, SendResult, Transport
from pipeline.errors import PipelineError
from pipeline.events import record_event
from pipeline.return_path import VerpSigner
from pipeline.submit import parse_raw_headers
from storage import campaigns as campaign_store
from storage import emails as email_store
from storage import holds
from storage import projects as project_store
from storage import reputation as reputation_store
from storage.db import Database
from storage.domains import sender_domain
from storage.emails import Claimed
from storage.models import CampaignStatus, Domain, EmailStatus, utcnow

log = logging.getLogger("plunkd.delivery")
ComposeDeferred = Callable[[Claimed], Awaitable[bytes | None]]
"""A claimed deferred email → its recipient's message, or None: do not send it (PipelineError: it cannot be sent)."""
RecordBounce = Callable[[Session, Claimed, str], None]
"""(transaction, the bounced email, the smarthost's reply) → the bounce's records: event, suppression, unsubscribe."""
TrackMessage = Callable[[Claimed, bytes], Awaitable[bytes]]
"""A claimed email and its message → the message with the tracking its row asks for (or as it was)."""
CAMPAIGN_STATUS_SECONDS = 0.2
"""How long a campaign's status, read when its emails are sent, is reused: after a cancel, emails handed to
the transport within this time (and those already there) still go; the rest are cancelled."""
WAKE_GAP_SECONDS = 0.05
"""A claim answers wake-ups at most this often (see `core.loop.DueLoop`): one session sending back to back
wakes the dispatcher once per message, and a claim and an outcome commit per message took as much of the
database as the acceptance they follow; a few messages a claim share both. Mail waits at most this long."""
OUTCOME_LINGER_SECONDS = 0.05
"""A sent email's outcome waits at most this long for others to share its transaction (`_write_outcome`). One
outcome alone is seven round trips (BEGIN, the email's update, the outbox row's delete, two counters, the event,
COMMIT); at 100 messages a second they came one at a time, and recording them took more of the dispatcher's CPU
than everything else it does for a message. An email's row says SENT this much later at most; a dispatcher killed
meanwhile sends those emails again after their lease, as it would have done a moment earlier (at most
`concurrency` are ever sent and not recorded)."""
INLINE_SIGN_BYTES = 256_000
"""Bigger messages are canonicalized in a thread so the event loop keeps serving."""


def add_outgoing_headers(raw: bytes, message_id: str) -> tuple[bytes, str]:
    """Prepend the email's Message-ID (given when it was accepted) and Date when the message lacks them;
    return (message, the Message-ID it goes out with). A message that carries its own Message-ID keeps
    it: it is the one its email was accepted with."""
    headers = parse_raw_headers(raw)
    added = b""
    carried = email_store.message_id_header(headers)
    if carried is None:
        added += b"Message-ID: " + message_id.encode() + b"\r\n"
    if headers.get("Date") is None:
        added += b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
    return added + raw, carried or message_id


def retry_delay(attempt: int, base: float) -> float:
    """Exponential backoff with full jitter in the upper half: base·2^attempt · [0.5, 1)."""
    return base * (2 ** attempt) * (0.5 + random.random() / 2)


class Dispatcher(DueLoop):
    def __init__(self, db: Database, transport: Transport, bucket: TokenBucket, settings: DeliveryConfig,
                 worker: str | None = None, compose_deferred: ComposeDeferred | None = None,
                 record_bounce: RecordBounce | None = None, track: TrackMessage | None = None,
                 verp: VerpSigner | None = None) -> None:
        self.db = db
        self.verp = verp
        self.compose_deferred = compose_deferred
        self.record_bounce = record_bounce
        self.track = track if transport.name != "ses" else None
        self.transport = transport
        self.bucket = bucket
        self.settings = settings
        self.worker = worker or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        super().__init__(settings.poll_seconds, log, f"dispatcher {self.worker}: claim", WAKE_GAP_SECONDS)
        self._slots = asyncio.Semaphore(settings.concurrency)
        # Sends handed to the transport whose outcome is not committed yet: all that a dispatcher killed at
        # any moment can have sent and not recorded (and that are then sent again).
        self._unrecorded = asyncio.Semaphore(settings.concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._keys: dict[tuple[str, str], tuple[float, Domain | None]] = {}
        self._verp_relay: dict[str, tuple[float, bool]] = {}
        self._campaigns: dict[str, tuple[float, asyncio.Future[str | None]]] = {}
        self._send_rate = metrics.SendRate()
        self._outcome_group: asyncio.Event | None = None
        """Set when the sent outcomes waiting now go to the writer together (`_write_outcome`)."""
        self._outcomes_waiting = 0
        self._outcome_timer: asyncio.TimerHandle | None = None
        metrics.DISPATCH_RATE_LIMIT.set(bucket.rate)

    async def _signing_key(self, project_id: str, domain_name: str) -> Domain | None:
        """The domain's DKIM key, cached for a minute: it is read for every email. A held domain is not
        cached: the check that finds its record again releases its mail, which must then go out."""
        now = time.monotonic()
        cached = self._keys.get((project_id, domain_name))
        if cached is not None and cached[0] > now:
            return cached[1]
        domain = await self.db.read(email_store.domain_key, project_id, domain_name)
        if domain is None or domain.held_since is None:
            self._keys[(project_id, domain_name)] = (now + 60.0, domain)
        return domain

    async def step(self) -> bool:
        """Claim and start one batch; busy (claim again at once) when it was full."""
        handled = await self.run_once()
        if not handled:
            self._send_rate.publish()  # the window moves on while nothing is sent
        return handled >= self.settings.batch_size

    async def envelope_sender(self, item: Claimed, domain: Domain) -> str | None:
        """The envelope sender to deliver with: a VERP address on the domain's verified return path, except for
        mail relayed over SMTP whose project did not choose VERP for it (it keeps its client's MAIL FROM); else
        the one the email was queued with (None: the From address)."""
        if self.verp is None or not domain.return_path or not domain.return_path_verified:
            return item.envelope_sender
        if item.source == "smtp":
            now = time.monotonic()
            cached = self._verp_relay.get(item.project_id)
            if cached is None or cached[0] <= now:
                cached = (now + 60.0, await self.db.read(project_store.verp_relay, item.project_id))
                self._verp_relay[item.project_id] = cached
            if not cached[1]:
                return item.envelope_sender
        return self.verp.address(item.email_id, domain.return_path)

    async def run_once(self) -> int:
        """Claim one batch and start sending it (bounded by `concurrency`); return how many."""
        free = self.settings.batch_size
        claimed = await self.db.write(lambda s: email_store.claim_due(
            s, self.worker, free, self.settings.lease_seconds, self.db.is_postgres))
        for item in claimed:
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver_in_slot(item))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(claimed)

    async def drain(self) -> None:
        """Wait for every message handed out so far (tests and shutdown)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def _deliver_in_slot(self, item: Claimed) -> None:
        """Deliver one email and record its outcome. Its slot is given back as soon as the transport has
        answered, so the next message is prepared while this one's outcome is committed; the send itself
        holds an `_unrecorded` permit until then (see `deliver`)."""
        try:
            sent = await self.deliver(item)
        except Exception:
            log.exception("email %s: delivery crashed; it will be retried after its lease", item.email_id)
            sent = None
        finally:
            self._slots.release()
        if sent is None:
            return
        try:
            await self._record(item, *sent)
        except Exception:
            log.exception("email %s: its outcome was not recorded; it will be retried after its lease",
                          item.email_id)
        finally:
            self._unrecorded.release()

    async def _write_outcome(self, work: Callable[[Session], None]) -> None:
        """Commit a sent email's outcome together with the others that come within `OUTCOME_LINGER_SECONDS`, or
        as soon as half of `concurrency` wait (each holds an `_unrecorded` permit: the sends must not run out of
        them): the group goes to the writer in one step, and its batch commits them in one transaction."""
        group = self._outcome_group
        if group is None:
            group = self._outcome_group = asyncio.Event()
            self._outcome_timer = asyncio.get_running_loop().call_later(OUTCOME_LINGER_SECONDS,
                                                                        self._release_outcomes)
        self._outcomes_waiting += 1
        if self._outcomes_waiting >= max(1, self.settings.concurrency // 2):
            self._release_outcomes()
        await group.wait()
        await self.db.write(work, light=True)

    def _release_outcomes(self) -> None:
        """Let the waiting outcomes through: each resumes in the loop's next turn, all of them before the writer
        that the first one's write wakes, so they land in one batch."""
        if self._outcome_timer is not None:
            self._outcome_timer.cancel()
        if self._outcome_group is not None:
            self._outcome_group.set()
        self._outcome_group, self._outcome_timer, self._outcomes_waiting = None, None, 0

    def forget_domain(self, project_id: str, domain_name: str) -> None:
        """The domain's key or hold changed (a re-check): read it again for the next email."""
        self._keys.pop((project_id, domain_name), None)

    async def _campaign_stopped(self, item: Claimed) -> bool:
        """Settle the email here when its campaign was cancelled (or deleted) since it was claimed, or park
        it when the campaign is paused; True when it was. The status is read once per campaign every
        `CAMPAIGN_STATUS_SECONDS`, and the emails that ask meanwhile share that read."""
        status = await self._campaign_status(item)
        if status == CampaignStatus.PAUSED:
            await self._park(item, holds.HOLD_PAUSED)
            log.info("email %s: held, its campaign %s is paused", item.email_id, item.campaign_id)
            return True
        if status in (None, CampaignStatus.CANCELLED):
            await self._cancel(item)
            return True
        return False

    async def _park(self, item: Claimed, hold: str) -> None:
        await self.db.write(lambda s: holds.park(s, item.outbox_id, hold), light=True)

    async def _campaign_status(self, item: Claimed) -> str | None:
        if item.campaign_id is None:
            return CampaignStatus.SENDING
        now = time.monotonic()
        cached = self._campaigns.get(item.campaign_id)
        if cached is None or cached[0] <= now:
            if len(self._campaigns) > 256:
                self._campaigns = {key: value for key, value in self._campaigns.items() if value[0] > now}
            read = asyncio.ensure_future(self.db.read(campaign_store.campaign_status, item.campaign_id))
            cached = (now + CAMPAIGN_STATUS_SECONDS, read)
            self._campaigns[item.campaign_id] = cached
        return await asyncio.shield(cached[1])

    async def _cancel(self, item: Claimed) -> None:
        await self.db.write(lambda s: email_store.mark_failed(
            s, item.outbox_id, item.email_id, EmailStatus.CANCELLED, campaign_store.CANCELLED_ERROR), light=True)
        metrics.EMAILS_FAILED.labels(self.transport.name, EmailStatus.CANCELLED).inc()
        log.info("email %s: not sent, its campaign %s was cancelled", item.email_id, item.campaign_id)

    async def deliver(self, item: Claimed) -> tuple[str, SendResult, str | None] | None:
        """Everything up to the transport's answer, which is returned as (Message-ID, result, envelope sender
        used) for `_record`; None when the email was settled here (suppressed, unsignable, its campaign cancelled).
        A returned answer holds one of the `_unrecorded` permits, which the caller gives back once the
        outcome is committed."""
        log.info("email %s: claimed by %s (attempt %d) to %s", item.email_id, self.worker, item.attempts + 1,
                 item.recipient)
        if item.suppressed:
            await self.db.write(lambda s: email_store.mark_failed(
                s, item.outbox_id, item.email_id, EmailStatus.SUPPRESSED, "recipient is on the suppression list"),
                light=True)
            metrics.EMAILS_FAILED.labels(self.transport.name, EmailStatus.SUPPRESSED).inc()
            log.info("email %s: skipped, %s is suppressed", item.email_id, item.recipient)
            return None
        if await self._campaign_stopped(item):
            return None
        raw = item.raw
        if item.deferred:
            try:
                composed = None if self.compose_deferred is None else await self.compose_deferred(item)
            except PipelineError as exc:
                reason = exc.message
                await self.db.write(lambda s: email_store.mark_failed(s, item.outbox_id, item.email_id,
                                                                      EmailStatus.FAILED, reason), light=True)
                metrics.EMAILS_FAILED.labels(self.transport.name, EmailStatus.FAILED).inc()
                log.warning("email %s: cannot be composed: %s", item.email_id, reason)
                return None
            if composed is None:
                await self.db.write(lambda s: email_store.mark_failed(
                    s, item.outbox_id, item.email_id, EmailStatus.SKIPPED,
                    "the contact unsubscribed or was deleted before this email went out"), light=True)
                metrics.EMAILS_FAILED.labels(self.transport.name, EmailStatus.SKIPPED).inc()
                log.info("email %s: skipped, its contact is no longer subscribed", item.email_id)
                return None
            raw = composed
        if self.track is not None and (item.track_opens or item.track_clicks):
            raw = await self.track(item, raw)
        domain_name = sender_domain(item.sender)
        domain = await self._signing_key(item.project_id, domain_name)
        message, message_id = add_outgoing_headers(
            raw, item.message_id or email_store.generated_message_id(item.email_id, item.sender))
        if domain is None:
            await self._record(item, message_id, SendResult.fail(f"no DKIM key for {domain_name}"))
            return None
        if domain.held_since is not None:
            await self._park(item, holds.HOLD_DKIM)
            log.info("email %s: held, the DKIM record of %s is missing", item.email_id, domain_name)
            return None
        envelope_sender = await self.envelope_sender(item, domain)
        sign_args = (message, domain.name, domain.dkim_selector, domain.dkim_private_key)
        try:
            if len(message) > INLINE_SIGN_BYTES:
                signed = await asyncio.to_thread(dkim.sign, *sign_args)
            else:
                signed = dkim.sign(*sign_args)
        except dkim.SigningError as exc:
            await self._record(item, message_id, SendResult.fail(f"cannot DKIM-sign the message: {exc}"))
            return None
        # The permit first, then the rate's slot: a send waiting for a permit after its slot had come would
        # leave late, and several such sends would leave together when the commits they waited on finish.
        await self._unrecorded.acquire()
        try:
            await self.bucket.acquire(1)
            if await self._campaign_stopped(item):
                self._unrecorded.release()
                return None
            result = await self.transport.send(item.sender, [item.recipient], signed, envelope_sender=envelope_sender)
            return message_id, result, envelope_sender
        except BaseException:
            self._unrecorded.release()
            raise

    async def _record(self, item: Claimed, message_id: str, result: SendResult,
                      envelope_sender: str | None = None) -> None:
        """`envelope_sender`: the MAIL FROM the transport was given, kept on the email when it is not the one
        accepted with it (a VERP address)."""
        settings = self.settings
        used = envelope_sender if envelope_sender != item.envelope_sender else None
        if result.outcome == SendOutcome.SENT:
            def work(session) -> None:
                email_store.mark_sent(session, item.outbox_id, item.email_id, message_id, result.transport_id, used)
                reputation_store.count_sent(session, item.project_id, utcnow())
                record_event(session, item.project_id, item.contact_id, "email.sent",
                             {"messageId": result.transport_id, "transport": self.transport.name},
                             email_id=item.email_id)

            await self._write_outcome(work)
            metrics.EMAILS_SENT.labels(self.transport.name).inc()
            self._send_rate.sent()
            log.info("email %s: sent via %s as %s", item.email_id, self.transport.name, result.transport_id)
        elif result.outcome == SendOutcome.BOUNCE:
            def bounced(session) -> None:
                email_store.mark_failed(session, item.outbox_id, item.email_id, EmailStatus.BOUNCED, result.error)
                reputation_store.count_sent(session, item.project_id, utcnow())
                if self.record_bounce is not None:
                    self.record_bounce(session, item, result.error)

            await self.db.write(bounced, light=True)
            metrics.EMAILS_BOUNCED.labels(self.transport.name, "permanent").inc()
            log.warning("email %s: bounced by %s: %s", item.email_id, self.transport.name, result.error)
        elif result.outcome == SendOutcome.RETRY and item.attempts + 1 < settings.max_attempts:
            due = utcnow() + timedelta(seconds=retry_delay(item.attempts, settings.retry_base_seconds))
            await self.db.write(lambda s: email_store.schedule_retry(s, item.outbox_id, due, result.error), light=True)
            log.warning("email %s: transient failure (%s); retry at %s", item.email_id, result.error, due.isoformat())
        else:
            reason = result.error
            if result.outcome == SendOutcome.RETRY:
                reason = f"gave up after {item.attempts + 1} attempts: {result.error}"
            await self.db.write(lambda s: email_store.mark_failed(
                s, item.outbox_id, item.email_id, EmailStatus.FAILED, reason), light=True)
            metrics.EMAILS_FAILED.labels(self.transport.name, EmailStatus.FAILED).inc()
            log.warning("email %s: failed permanently: %s", item.email_id, reason)
