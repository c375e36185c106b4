"""A stand-in for Amazon SNS (which is on the internet, where tests cannot go): a signing certificate of our
own CA, messages signed exactly as SNS signs them, and a local HTTPS server (a trustme certificate for
localhost) that serves the certificate and answers ConfirmSubscription as SNS's host does. Also builds the
SES notifications SNS carries. Used by the feedback tests and by bench/feedback.py.

The canonical string is written here again from AWS's description, not imported from `feedback.sns`, so a
mistake there is not mirrored here.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
CERT_PATH = "/SimpleNotificationService-0123456789abcdef0123456789abcdef.pem"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_signing_certificate(days: int = 30) -> tuple[rsa.RSAPrivateKey, bytes]:
    """An RSA-2048 key and its certificate (PEM) for sns.amazonaws.com, issued by a CA of our own."""
    now = datetime.now(UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (x509.CertificateBuilder().subject_name(_name("Test SNS CA")).issuer_name(_name("Test SNS CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(_name("sns.amazonaws.com")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


def sns_time(moment: datetime | None = None) -> str:
    """SNS's Timestamp format: 2012-04-26T20:45:04.751Z."""
    moment = moment or datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def canonical(message: dict[str, str]) -> bytes:
    if message["Type"] == "Notification":
        keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        keys = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{key}\n{message[key]}\n" for key in keys if key in message).encode()


@dataclass
class SnsSigner:
    key: rsa.RSAPrivateKey
    cert_url: str
    topic: str = TOPIC

    def sign(self, message: dict[str, str], version: str = "1") -> dict[str, str]:
        """Add SignatureVersion, SigningCertURL and Signature (v1 SHA1withRSA, v2 SHA256withRSA) to `message`."""
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(canonical(message), padding.PKCS1v15(), digest)
        return {**message, "SignatureVersion": version, "SigningCertURL": self.cert_url,
                "Signature": base64.b64encode(signature).decode()}

    def notification(self, payload: dict[str, Any] | str, message_id: str | None = None,
                     timestamp: str | None = None, subject: str | None = None, version: str = "1",
                     topic: str | None = None) -> dict[str, str]:
        message = {"Type": "Notification", "MessageId": message_id or str(uuid.uuid4()),
                   "TopicArn": topic or self.topic,
                   "Message": payload if isinstance(payload, str) else json.dumps(payload),
                   "Timestamp": timestamp or sns_time(),
                   "UnsubscribeURL": f"{self.cert_url.rsplit('/', 1)[0]}/?Action=Unsubscribe&SubscriptionArn=x"}
        if subject is not None:
            message["Subject"] = subject
        return self.sign(message, version)

    def confirmation(self, base_url: str, token: str = "token-1234", kind: str = "SubscriptionConfirmation",
                     topic: str | None = None, subscribe_url: str | None = None) -> dict[str, str]:
        topic = topic or self.topic
        url = subscribe_url or f"{base_url}/?Action=ConfirmSubscription&TopicArn={topic}&Token={token}"
        message = {"Type": kind, "MessageId": str(uuid.uuid4()), "Token": token, "TopicArn": topic,
                   "Message": f"You have chosen to subscribe to the topic {topic}.", "SubscribeURL": url,
                   "Timestamp": sns_time()}
        return self.sign(message)


@dataclass
class FakeSnsHost:
    """What the local HTTPS server saw and serves."""

    pem: bytes
    requests: list[str] = field(default_factory=list)
    confirm_status: int = 200

    def app(self) -> web.Application:
        async def certificate(request: web.Request) -> web.Response:
            self.requests.append(request.path_qs)
            return web.Response(body=self.pem, content_type="application/x-pem-file")

        async def api(request: web.Request) -> web.Response:
            self.requests.append(request.path_qs)
            if request.query.get("Action") != "ConfirmSubscription":
                return web.Response(status=400)
            return web.Response(status=self.confirm_status, content_type="text/xml", text=(
                "<ConfirmSubscriptionResponse><ConfirmSubscriptionResult><SubscriptionArn>"
                f"{request.query.get('TopicArn')}:1</SubscriptionArn></ConfirmSubscriptionResult>"
                "</ConfirmSubscriptionResponse>"))

        async def huge(request: web.Request) -> web.Response:
            self.requests.append(request.path_qs)
            return web.Response(body=b"-" * (200 * 1024), content_type="application/x-pem-file")

        async def garbage(request: web.Request) -> web.Response:
            self.requests.append(request.path_qs)
            return web.Response(body=b"not a certificate", content_type="application/x-pem-file")

        app = web.Application()
        app.router.add_get(CERT_PATH, certificate)
        app.router.add_get("/huge.pem", huge)
        app.router.add_get("/garbage.pem", garbage)
        app.router.add_get("/", api)
        return app


# --- SES notifications ---------------------------------------------------------------------------------

def ses_mail(ses_message_id: str, recipient: str) -> dict[str, Any]:
    return {"timestamp": sns_time(), "source": "hello@example.com", "sourceArn": "arn:aws:ses:us-east-1:1:identity/x",
            "sendingAccountId": "123456789012", "messageId": ses_message_id, "destination": [recipient],
            "headersTruncated": False, "commonHeaders": {"subject": "Hello"}}


def ses_event(kind: str, ses_message_id: str, recipient: str, shape: str = "event", **detail: Any) -> dict[str, Any]:
    """An SES notification: `shape` "event" (configuration-set event publishing, `eventType`) or "identity"
    (identity notifications, `notificationType`). `kind` is SES's type; `detail` fills its object."""
    defaults: dict[str, dict[str, Any]] = {
        "Delivery": {"timestamp": sns_time(), "processingTimeMillis": 546, "recipients": [recipient],
                     "smtpResponse": "250 ok dirdel", "reportingMTA": "a8-70.smtp-out.amazonses.com"},
        "Bounce": {"bounceType": "Permanent", "bounceSubType": "General", "timestamp": sns_time(),
                   "feedbackId": "0100-bounce", "reportingMTA": "dsn; a8-70.smtp-out.amazonses.com",
                   "bouncedRecipients": [{"emailAddress": recipient, "action": "failed", "status": "5.1.1",
                                          "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
        "Complaint": {"complainedRecipients": [{"emailAddress": recipient}], "timestamp": sns_time(),
                      "feedbackId": "0100-complaint", "userAgent": "ExampleCorp Feedback Loop (V0.01)",
                      "complaintFeedbackType": "abuse", "arrivalDate": sns_time()},
        "Open": {"ipAddress": "192.0.2.1", "timestamp": sns_time(), "userAgent": "Mozilla/5.0 (Mail)"},
        "Click": {"ipAddress": "192.0.2.1", "timestamp": sns_time(), "userAgent": "Mozilla/5.0 (Mail)",
                  "link": "https://example.com/offer?x=1", "linkTags": {"campaign": ["november"]}},
        "Reject": {"reason": "Bad content"},
        "DeliveryDelay": {"delayType": "TransientCommunicationFailure", "expirationTime": sns_time(),
                          "delayedRecipients": [{"emailAddress": recipient, "status": "4.4.1",
                                                 "diagnosticCode": "smtp; 421 4.4.1 try later"}],
                          "timestamp": sns_time()},
        "Send": {},
    }
    objects = {"DeliveryDelay": "deliveryDelay"}
    body: dict[str, Any] = {"mail": ses_mail(ses_message_id, recipient),
                            objects.get(kind, kind.lower()): {**defaults.get(kind, {}), **detail}}
    body["eventType" if shape == "event" else "notificationType"] = kind
    return body
