"""What delivery feedback does to the records, in the caller's transaction. One rule per kind:

* delivery: SENT → DELIVERED, `email.delivery` (once per email).
* bounce, Permanent (SES) or a 5xx at RCPT or DATA from the smarthost (`smtp_bounce`): → BOUNCED with the
  diagnostic, `email.bounce`, the address suppressed for the project, the contact unsubscribed
  (`contact.unsubscribed`, through `pipeline.contacts.record_subscription`). Once per email.
* bounce, Transient (or Undetermined): `email.bounce` only (once per email); the status stays.
  A DSN to the email's VERP address (`inbound.reports`) is applied by the same rule (`reported_bounce`).
* complaint: → COMPLAINED, `email.complaint`, suppressed and unsubscribed. Once per email. Also an ARF
  report (`complained`).
  Permanent bounces and complaints count against the project's reputation (`pipeline.reputation`).
* open / click: `email.open` / `email.click` every time, with `first` and `count` (this email's nth).
* reject: → FAILED with SES's reason. send, delay and other kinds change nothing (they are logged).

"Once per email" makes a notification SES publishes twice (identity notifications and a configuration
set's event destination on the same topic) count once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.metrics import EMAILS_BOUNCED, count_at_commit
from feedback.ses import Notice
from pipeline import reputation
from pipeline.contacts import record_subscription
from pipeline.events import record_event
from storage import contacts as contact_store
from storage import emails as email_store
from storage import feedback as feedback_store
from storage.emails import Claimed
from storage.feedback import FeedbackEmail
from storage.models import EmailStatus


def apply_notice(session: Session, notice: Notice) -> tuple[bool, str]:
    """Apply an SES notice to the emails it is about; (whether an email was found, what was done)."""
    emails = feedback_store.emails_by_transport_id(session, notice.ses_message_id)
    if not emails:
        return False, f"no email was sent as SES message {notice.ses_message_id}"
    done = []
    for email in emails:
        if notice.recipients is not None and email.recipient not in notice.recipients:
            continue
        data = {**notice.data, **(notice.recipients or {}).get(email.recipient, {})}
        done.append(f"email {email.id}: {_RULES[notice.kind](session, email, data, notice)}")
    return True, "; ".join(done) or "the notification names none of the message's recipients"


def _delivery(session: Session, email: FeedbackEmail, data: dict[str, Any], notice: Notice) -> str:
    if feedback_store.count_events(session, email.id, "email.delivery"):
        return "delivery already recorded"
    feedback_store.set_status(session, email.id, EmailStatus.DELIVERED, only_from=(EmailStatus.SENT,))
    _event(session, email, "email.delivery", data)
    return "delivered"


def _bounce(session: Session, email: FeedbackEmail, data: dict[str, Any], notice: Notice) -> str:
    return reported_bounce(session, email, data, notice.permanent, "ses")


def reported_bounce(session: Session, email: FeedbackEmail, data: dict[str, Any], permanent: bool,
                    via: str) -> str:
    """A bounce reported after the email was sent (an SES notice, a DSN to its VERP address, `via`): the
    records of a permanent one (BOUNCED, `bounced`), or `email.bounce` alone for a transient one."""
    kind = f"{data.get('bounceType', 'Undetermined')}/{data.get('bounceSubType', 'General')}"
    if not permanent:
        if feedback_store.count_events(session, email.id, "email.bounce"):
            return f"{kind} bounce: a bounce is already recorded"
        _event(session, email, "email.bounce", data)
        count_at_commit(session, EMAILS_BOUNCED.labels(via, "transient"))
        return f"{kind} bounce recorded (not suppressed)"
    if email.status == EmailStatus.BOUNCED:
        return f"{kind} bounce: already bounced"
    count_at_commit(session, EMAILS_BOUNCED.labels(via, "permanent"))
    diagnostic = data.get("diagnosticCode") or data.get("status") or kind
    feedback_store.set_status(session, email.id, EmailStatus.BOUNCED, error=f"bounced ({kind}): {diagnostic}")
    return f"{kind} bounce: BOUNCED, {bounced(session, email, data, f'bounce ({kind}): {diagnostic}')}"


def _complaint(session: Session, email: FeedbackEmail, data: dict[str, Any], notice: Notice) -> str:
    return complained(session, email, data)


def complained(session: Session, email: FeedbackEmail, data: dict[str, Any]) -> str:
    """A complaint (an SES notice, an ARF report): COMPLAINED, `email.complaint`, suppressed and unsubscribed."""
    if email.status == EmailStatus.COMPLAINED:
        return "complaint already recorded"
    feedback_store.set_status(session, email.id, EmailStatus.COMPLAINED)
    _event(session, email, "email.complaint", data)
    reputation.record_feedback(session, email.project_id, complained=1)
    reason = f"complaint ({data.get('complaintFeedbackType', 'unspecified')})"
    return f"COMPLAINED, {_stop_mail(session, email, 'complaint', reason)}"


def _engagement(session: Session, email: FeedbackEmail, data: dict[str, Any], notice: Notice) -> str:
    name = f"email.{notice.kind}"
    count = feedback_store.count_events(session, email.id, name) + 1
    _event(session, email, name, {**data, "first": count == 1, "count": count})
    return f"{notice.kind} #{count}"


def _reject(session: Session, email: FeedbackEmail, data: dict[str, Any], notice: Notice) -> str:
    feedback_store.set_status(session, email.id, EmailStatus.FAILED, error=f"SES rejected the message: "
                                                                 f"{data.get('reason', 'no reason given')}")
    return "FAILED (rejected by SES)"


def _nothing(session: Session, email: FeedbackEmail, data: dict[str, Any], notice: Notice) -> str:
    return f"{notice.ses_type} noted"


_RULES = {"delivery": _delivery, "bounce": _bounce, "complaint": _complaint, "open": _engagement,
          "click": _engagement, "reject": _reject, "send": _nothing, "delay": _nothing, "other": _nothing}


def bounced(session: Session, email: FeedbackEmail, data: dict[str, Any], reason: str) -> str:
    """A permanent bounce's records, whichever transport reported it (the caller sets the status):
    `email.bounce`, counted against the project's reputation (`pipeline.reputation`), the address
    suppressed, the contact unsubscribed."""
    _event(session, email, "email.bounce", data)
    reputation.record_feedback(session, email.project_id, bounced=1)
    return _stop_mail(session, email, "bounce", reason)


def smtp_bounce(session: Session, item: Claimed, reply: str) -> None:
    """The smarthost refused the recipient or the message with a 5xx (at RCPT or DATA): a permanent bounce.
    Handed to the dispatcher by the wiring; the dispatcher has marked the email BOUNCED."""
    email = FeedbackEmail(item.email_id, item.project_id, item.contact_id, item.recipient, EmailStatus.BOUNCED)
    data = {"via": "smtp", "bounceType": "Permanent", "bounceSubType": "General", "diagnosticCode": reply[:2048]}
    bounced(session, email, data, f"bounce (smtp): {reply}")


def _event(session: Session, email: FeedbackEmail, name: str, data: dict[str, Any]) -> None:
    record_event(session, email.project_id, email.contact_id, name, data, email_id=email.id)


def _stop_mail(session: Session, email: FeedbackEmail, cause: str, reason: str) -> str:
    """Suppress the address and unsubscribe its contact (recording contact.unsubscribed, attributed to the email)."""
    suppressed = email_store.add_suppression(session, email.project_id, email.recipient, reason,
                                             email_id=email.id)
    done = [f"{email.recipient} suppressed" if suppressed else f"{email.recipient} was already suppressed"]
    contact = None
    if email.contact_id is not None:
        contact = contact_store.get_contact(session, email.project_id, email.contact_id, for_update=True)
    if contact is not None:
        changed = record_subscription(session, email.project_id, contact, False, {"reason": cause}, email_id=email.id)
        done.append(f"contact {contact.id} unsubscribed" if changed else f"contact {contact.id} was not subscribed")
    return ", ".join(done)
