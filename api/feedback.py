"""POST /webhooks/incoming/sns (and /api/webhooks/incoming/sns, where Plunk's docs subscribe it): SES delivery
feedback through Amazon SNS. No API key: SNS cannot send one; the message's signature is the authentication
(see `feedback.sns`). SNS posts its JSON as text/plain, so the body is read whatever its Content-Type.

Replies: 200 with what was done (also for a message applied before, an SES message id no email has, and
notifications that are not SES's); 400 a body that is not JSON; 413 a body over `feedback.sns_max_body_bytes`;
422 JSON that is not an SNS message; 403 a message that is not genuine, fresh and for an accepted topic
(SNS does not retry a 4xx); 503 when SNS's host could not be reached for its certificate or to confirm a
subscription (SNS retries).
"""

from __future__ import annotations

from typing import Annotated, Literal

from aiohttp import web
from pydantic import StringConstraints

from api.context import CONFIG, FEEDBACK
from api.envelope import success
from api.routing import Route
from api.schemas import Out
from api.validation import Body, body_from, read_json
from feedback.sns import NOTIFICATION
from pipeline.errors import FieldError, ValidationFailed

MAX_MESSAGE_CHARS = 256 * 1024
"""SNS's own limit on a message (256 KB)."""
Short = Annotated[str, StringConstraints(min_length=1, max_length=300)]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2048)]


class SnsMessageBody(Body):
    """An SNS HTTP(S) message, with SNS's own field names."""

    Type: Literal["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]
    MessageId: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    TopicArn: Short
    Message: Annotated[str, StringConstraints(max_length=MAX_MESSAGE_CHARS)]
    Timestamp: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    SignatureVersion: Literal["1", "2"]
    Signature: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    SigningCertURL: Url
    Subject: Annotated[str, StringConstraints(max_length=300)] | None = None
    Token: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    """SubscriptionConfirmation and UnsubscribeConfirmation only."""
    SubscribeURL: Url | None = None
    """SubscriptionConfirmation and UnsubscribeConfirmation only."""
    UnsubscribeURL: Url | None = None


class SnsReceipt(Out):
    messageId: str
    type: str
    outcome: Literal["applied", "unknown", "ignored", "duplicate", "confirmed", "unsubscribed"]
    detail: str


async def receive_sns(request: web.Request) -> web.Response:
    payload = await read_json(request, request.app[CONFIG].feedback.sns_max_body_bytes)
    message = body_from(request, payload, SnsMessageBody).model_dump(exclude_none=True)
    if message["Type"] != NOTIFICATION:
        missing = [FieldError(key, f"Required in a {message['Type']}", "invalid_type")
                   for key in ("Token", "SubscribeURL") if key not in message]
        if missing:
            raise ValidationFailed(missing)
    receipt = await request.app[FEEDBACK].receive(message, request.remote)
    return success({"messageId": receipt.message_id, "type": receipt.type, "outcome": receipt.outcome,
                    "detail": receipt.detail})


def _sns_route(path: str, summary: str) -> Route:
    return Route("POST", path, receive_sns, summary, auth=None, scope="root", body=SnsMessageBody, tag="Feedback",
                 response=SnsReceipt, errors=frozenset({403, 503}))


ROUTES = [
    _sns_route("/webhooks/incoming/sns", "SES delivery feedback from Amazon SNS (signed by SNS)"),
    _sns_route("/api/webhooks/incoming/sns", "The same, at the path Plunk's self-hosting docs subscribe"),
]
