"""The SNS intake: one message posted by SNS, in named steps,

    verify (feedback.sns) → claim its MessageId → apply (feedback.effects) → answer

where the claim and the effects commit in one transaction, so a message SNS delivers again, or twice at
once, is applied once. A SubscriptionConfirmation is confirmed (GET its SubscribeURL) before its claim is
written, so a confirmation that failed is tried again when SNS retries it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from core.config import FeedbackConfig
from feedback.effects import apply_notice
from feedback.ses import Notice, parse_notification
from feedback.sns import (
    NOTIFICATION,
    SUBSCRIPTION_CONFIRMATION,
    SnsRefused,
    SnsUnavailable,
    SnsVerifier,
)
from storage import feedback as feedback_store
from storage.db import Database
from storage.models import utcnow

log = logging.getLogger("plunkd.feedback")
PRUNE_EVERY = 600.0
"""Seconds between prunes of old applied-message rows (one bounded batch, in the next message's transaction)."""
PRUNE_BATCH = 1000
KEEP_APPLIED = timedelta(days=1)
"""Applied-message rows are kept this long beyond `sns_max_age_seconds` (past that age a message is refused
anyway, so its row is no longer needed to refuse a redelivery)."""


@dataclass
class Receipt:
    message_id: str
    type: str
    outcome: str
    """applied, unknown (no email was sent as that SES message), ignored (not an SES notification),
    duplicate (applied before), confirmed (a subscription) or unsubscribed."""
    detail: str


class FeedbackIntake:
    def __init__(self, settings: FeedbackConfig, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.verifier = SnsVerifier(settings)
        self._next_prune = 0.0

    async def receive(self, message: Mapping[str, str], remote: str | None = None) -> Receipt:
        """Verify and apply one SNS message (its JSON keys, as sent); `SnsRefused` / `SnsUnavailable` otherwise."""
        message_id, kind, topic = message["MessageId"], message["Type"], message["TopicArn"]
        try:
            await self.verifier.verify(message)
            if kind == NOTIFICATION:
                receipt = await self._notification(message)
            elif kind == SUBSCRIPTION_CONFIRMATION:
                receipt = await self._confirmation(message)
            else:
                receipt = await self._unsubscribed(message)
        except (SnsRefused, SnsUnavailable) as exc:
            log.warning("sns %r (%s, topic %r, from %s) refused with %d: %r", message_id, kind, topic, remote,
                        exc.status, exc.message)
            raise
        log.info("sns %s (%s, topic %s): %s: %s", message_id, kind, topic, receipt.outcome, receipt.detail)
        return receipt

    async def _notification(self, message: Mapping[str, str]) -> Receipt:
        notice = parse_notification(message["Message"])
        prune_before = self._prune_cutoff()

        def work(session: Session) -> tuple[str, str]:
            return apply_notification(session, message["MessageId"], message["TopicArn"], notice, prune_before)

        outcome, detail = await self.db.write(work, light=True)
        if notice is not None and outcome != "duplicate":
            detail = f"SES {notice.ses_type} for {notice.ses_message_id}: {detail}"
        return Receipt(message["MessageId"], message["Type"], outcome, detail)

    async def _confirmation(self, message: Mapping[str, str]) -> Receipt:
        message_id = message["MessageId"]
        if await self.db.read(feedback_store.is_applied, message_id):
            return Receipt(message_id, message["Type"], "duplicate", "this confirmation was already made")
        await self.verifier.confirm_subscription(message)
        await self.db.write(lambda s: feedback_store.claim_message(s, message_id, message["TopicArn"],
                                                                    message["Type"]), light=True)
        return Receipt(message_id, message["Type"], "confirmed",
                       f"subscribed to {message['TopicArn']}: SNS delivers its notifications here from now on")

    async def _unsubscribed(self, message: Mapping[str, str]) -> Receipt:
        message_id = message["MessageId"]
        claimed = await self.db.write(lambda s: feedback_store.claim_message(s, message_id, message["TopicArn"],
                                                                              message["Type"]), light=True)
        if not claimed:
            return Receipt(message_id, message["Type"], "duplicate", "already noted")
        log.warning("sns: the subscription to topic %s was deleted; no more feedback arrives from it until it is "
                    "subscribed again", message["TopicArn"])
        return Receipt(message_id, message["Type"], "unsubscribed",
                       f"no more notifications from {message['TopicArn']} until it is subscribed again")

    def _prune_cutoff(self) -> datetime | None:
        """Every PRUNE_EVERY seconds, the time before which applied-message rows may go."""
        now = time.monotonic()
        if now < self._next_prune:
            return None
        self._next_prune = now + PRUNE_EVERY
        return utcnow() - timedelta(seconds=self.settings.sns_max_age_seconds) - KEEP_APPLIED


def apply_notification(session: Session, message_id: str, topic_arn: str, notice: Notice | None,
                       prune_before: datetime | None = None) -> tuple[str, str]:
    """Claim the SNS message and apply its SES notice, in the caller's transaction: (outcome, detail)."""
    if prune_before is not None:
        feedback_store.prune_applied(session, prune_before, PRUNE_BATCH)
    if not feedback_store.claim_message(session, message_id, topic_arn, NOTIFICATION):
        return "duplicate", "already applied"
    if notice is None:
        return "ignored", "not an SES notification"
    found, detail = apply_notice(session, notice)
    return ("applied" if found else "unknown"), detail
