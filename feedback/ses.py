"""Amazon SES notifications (the `Message` of an SNS notification) as `Notice`s: what happened, to which
SES message and recipients, and the data the event records.

Both shapes SES publishes are read: identity notifications (`notificationType`: Bounce, Complaint,
Delivery) and configuration-set event publishing (`eventType`: Send, Reject, Bounce, Complaint, Delivery,
DeliveryDelay, Open, Click, Rendering Failure, Subscription). Anything else, or text that is not an SES
notification, is None. Every text kept is cut to a bounded length: the content comes from remote mail
servers and mail clients (diagnostic codes, user agents, links).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.grammar import header_address

KINDS = {"Send": "send", "Delivery": "delivery", "Bounce": "bounce", "Complaint": "complaint", "Reject": "reject",
         "DeliveryDelay": "delay", "Open": "open", "Click": "click"}
"""SES's notification or event type → our kind; other types are kind "other" (acknowledged, no effect)."""
SHORT = 200
LONG = 2048


@dataclass(frozen=True)
class Notice:
    kind: str
    """send, delivery, bounce, complaint, reject, delay, open, click or other."""
    ses_type: str
    ses_message_id: str
    recipients: dict[str, dict[str, Any]] | None
    """The recipients it is about (lower-cased address → what the notification says of that one), or None:
    every recipient of the message (opens, clicks, sends, rejects)."""
    data: dict[str, Any] = field(default_factory=dict)
    """What the event records (besides the per-recipient data)."""
    permanent: bool = False
    """A bounce SES calls Permanent: the address is suppressed and its contact unsubscribed."""


def parse_notification(message: str) -> Notice | None:
    try:
        body = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    ses_type = _text(body.get("eventType") or body.get("notificationType"), SHORT)
    mail = body.get("mail")
    message_id = _text(mail.get("messageId"), SHORT) if isinstance(mail, dict) else ""
    if not ses_type or not message_id:
        return None
    kind = KINDS.get(ses_type, "other")
    detail = _object(body, _DETAIL_KEYS.get(kind, ""))
    data: dict[str, Any] = {"via": "ses", "messageId": message_id, "sesType": ses_type}
    recipients: dict[str, dict[str, Any]] | None = None
    permanent = False
    if kind == "delivery":
        data.update(_pick(detail, ("timestamp", SHORT), ("processingTimeMillis", 0), ("smtpResponse", LONG),
                          ("reportingMTA", SHORT), ("remoteMtaIp", SHORT)))
        recipients = _addresses(detail.get("recipients"), lambda _entry: {})
    elif kind == "bounce":
        data.update(_pick(detail, ("bounceType", SHORT), ("bounceSubType", SHORT), ("feedbackId", SHORT),
                          ("reportingMTA", SHORT), ("remoteMtaIp", SHORT), ("timestamp", SHORT)))
        permanent = data.get("bounceType") == "Permanent"
        recipients = _addresses(detail.get("bouncedRecipients"), lambda entry: _pick(
            entry, ("action", SHORT), ("status", SHORT), ("diagnosticCode", LONG)))
    elif kind == "complaint":
        data.update(_pick(detail, ("complaintFeedbackType", SHORT), ("complaintSubType", SHORT),
                          ("feedbackId", SHORT), ("userAgent", SHORT), ("arrivalDate", SHORT), ("timestamp", SHORT)))
        recipients = _addresses(detail.get("complainedRecipients"), lambda _entry: {})
    elif kind == "delay":
        data.update(_pick(detail, ("delayType", SHORT), ("expirationTime", SHORT), ("reportingMTA", SHORT),
                          ("timestamp", SHORT)))
        recipients = _addresses(detail.get("delayedRecipients"), lambda entry: _pick(
            entry, ("status", SHORT), ("diagnosticCode", LONG)))
    elif kind in ("open", "click"):
        data.update(_pick(detail, ("ipAddress", SHORT), ("userAgent", SHORT), ("timestamp", SHORT),
                          ("link", LONG)))
        tags = detail.get("linkTags")
        if kind == "click" and isinstance(tags, dict):
            data["linkTags"] = {_text(k, SHORT): [_text(v, SHORT) for v in values[:20]]
                                for k, values in list(tags.items())[:20] if isinstance(values, list)}
    elif kind == "reject":
        data.update(_pick(detail, ("reason", SHORT)))
    return Notice(kind, ses_type, message_id, recipients, data, permanent)


_DETAIL_KEYS = {"delivery": "delivery", "bounce": "bounce", "complaint": "complaint", "delay": "deliveryDelay",
                "open": "open", "click": "click", "reject": "reject"}


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _object(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key) if key else None
    return value if isinstance(value, dict) else {}


def _pick(source: dict[str, Any], *keys: tuple[str, int]) -> dict[str, Any]:
    """The named fields that are present: text cut to its limit (a limit of 0 takes a number)."""
    picked: dict[str, Any] = {}
    for key, limit in keys:
        value = source.get(key)
        if limit and isinstance(value, str) and value:
            picked[key] = value[:limit]
        elif not limit and isinstance(value, int | float) and not isinstance(value, bool):
            picked[key] = value
    return picked


def _addresses(entries: Any, details) -> dict[str, dict[str, Any]] | None:
    """Address → details of a recipient list (strings, or objects with `emailAddress`); None when the
    notification names nobody (then it is about every recipient)."""
    if not isinstance(entries, list) or not entries:
        return None
    found: dict[str, dict[str, Any]] = {}
    for entry in entries[:100]:
        raw = entry if isinstance(entry, str) else entry.get("emailAddress") if isinstance(entry, dict) else None
        if not isinstance(raw, str):
            continue
        address = header_address(raw[:LONG]).lower()
        if address:
            found[address] = details(entry) if isinstance(entry, dict) else {}
    return found or None
