"""What a report to a VERP address does, in the transaction that answers its DATA with 250: a DSN is the
email's bounce, an ARF report its complaint, by `feedback.effects`' rules (the same as a 5xx at RCPT or an
SES notice). Anything else to a VERP address (an auto-reply, "out of office", a human answering a bounce
address) is dropped: logged, counted (`plunkd_inbound_messages{kind="dropped"}`), nothing recorded."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from core.metrics import INBOUND_MESSAGES, count_at_commit
from feedback.effects import complained, reported_bounce
from inbound.reports import DeliveryReport, FeedbackReport
from pipeline.return_path import VerpSigner
from storage import feedback as feedback_store
from storage.feedback import FeedbackEmail
from storage.models import EmailStatus

log = logging.getLogger("plunkd.inbound")
MESSAGE_ID_MATCHES = 2
"""A Message-ID naming more emails of the project than one (a relay client reusing one) names none."""


class NotSentYet(Exception):
    """A DSN overtook the record of its email's send (the dispatcher commits SENT after the smarthost's 250):
    answered 451, so the reporting MTA brings it again later."""


def apply_report(session: Session, email_ids: list[str], report: DeliveryReport | FeedbackReport | None,
                 verp: VerpSigner) -> list[str]:
    """Apply the report to each email its VERP recipients name; what was done, one line per email."""
    done = []
    for email_id in dict.fromkeys(email_ids):
        email = feedback_store.email_by_id(session, email_id)
        if email is None:
            done.append(f"email {email_id}: gone (pruned since it was sent)")
        elif isinstance(report, DeliveryReport):
            done.append(f"email {email.id}: {_bounce(session, email, report)}")
        elif isinstance(report, FeedbackReport):
            complained_about = _complained_about(session, email, report, verp)
            done.append(f"email {complained_about.id}: {_complaint(session, complained_about, report)}")
        else:
            done.append(f"email {email.id}: a reply that is not a DSN or an ARF report, dropped")
    kind = "dsn" if isinstance(report, DeliveryReport) else "arf" if isinstance(report, FeedbackReport) else "dropped"
    count_at_commit(session, INBOUND_MESSAGES.labels(kind))
    return done


def _bounce(session: Session, email: FeedbackEmail, report: DeliveryReport) -> str:
    recipient = report.first_bounce()
    if recipient is None:
        return "a DSN reporting no failure or delay (delivered, relayed, expanded): nothing to record"
    if email.status == EmailStatus.QUEUED:
        raise NotSentYet(email.id)
    if email.status not in (EmailStatus.SENT, EmailStatus.DELIVERED, EmailStatus.BOUNCED):
        return f"a DSN for an email that is {email.status}: not recorded"
    permanent = recipient.permanent
    data: dict[str, Any] = {
        "via": "dsn", "bounceType": "Permanent" if permanent else "Transient", "bounceSubType": "General",
        "hard": permanent, "action": recipient.action, "status": recipient.status,
        "diagnosticCode": recipient.diagnostic or recipient.status, "finalRecipient": recipient.final_recipient,
        "remoteMta": recipient.remote_mta, "reportingMta": report.reporting_mta}
    return reported_bounce(session, email, data, permanent, "dsn")


def _complained_about(session: Session, email: FeedbackEmail, report: FeedbackReport,
                      verp: VerpSigner) -> FeedbackEmail:
    """The email the complaint is about: the one the original's Return-Path names (a VERP address), else the one
    of the same project its Message-ID names, else the one whose VERP address the report was sent to."""
    named = verp.email_id(report.original_return_path) if report.original_return_path else None
    if named is None and report.original_message_id:
        ids = feedback_store.email_ids_by_message_id(session, email.project_id, report.original_message_id,
                                                     MESSAGE_ID_MATCHES)
        named = ids[0] if len(ids) == 1 else None
    if named is not None and named != email.id:
        found = feedback_store.email_by_id(session, named)
        if found is not None and found.project_id == email.project_id:
            return found
    return email


def _complaint(session: Session, email: FeedbackEmail, report: FeedbackReport) -> str:
    data = {"via": "arf", "complaintFeedbackType": report.feedback_type, "userAgent": report.user_agent,
            "originalRcptTo": report.original_rcpt_to, "sourceIp": report.source_ip}
    return complained(session, email, data)
