"""Amazon SNS messages posted to us over HTTPS: is this one genuine, fresh and for a topic we accept?

* Topic: its `TopicArn` must be one of `feedback.sns_topic_arns` (none configured: every message is refused).
* Age: its `Timestamp` (the publish time, which a redelivery keeps) at most `sns_max_age_seconds` old and at
  most `CLOCK_SKEW` ahead. SNS gives up retrying within an hour, so nothing genuine is older.
* Signature: SignatureVersion 1 is SHA1withRSA, 2 SHA256withRSA (PKCS#1 v1.5), over the canonical string SNS
  defines for the message's Type, checked with the public key of the certificate at `SigningCertURL`.
* That URL, and a confirmation's `SubscribeURL`, must be https on a host matching `sns_host_pattern`
  (SNS's own `sns.<region>.amazonaws.com` by default): the TLS connection to that host is what vouches for
  the certificate. A certificate is fetched once (a bounded body within a bounded time) and its parsed key
  is cached, so checking a message is one RSA verify.

A refusal is `SnsRefused` (403: SNS does not retry a 4xx, and a forgery should not be retried). When SNS's
host cannot be reached (the certificate or a confirmation), the answer is `SnsUnavailable` (503): SNS retries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from core.config import FeedbackConfig
from core.connections import verifying_tls_context
from core.http_body import read_at_most
from pipeline.cache import TtlCache
from pipeline.errors import Forbidden, PipelineError

log = logging.getLogger("plunkd.feedback")
NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"
SIGNED_KEYS = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    UNSUBSCRIBE_CONFIRMATION: ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
"""The fields each Type's signature covers, in the order SNS writes them (a missing Subject is left out)."""
HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}
CLOCK_SKEW = timedelta(minutes=5)
MAX_CERT_BYTES = 64 * 1024
MAX_CONFIRM_BYTES = 64 * 1024
CERT_TTL = 3600.0
"""Seconds a fetched certificate's key is trusted before it is fetched again (SNS's URL names the
certificate, so a new certificate comes with a new URL)."""
FAILURE_TTL = 30.0
"""Seconds a certificate URL that could not be used is not tried again (forged messages naming made-up
certificates cost SNS's host one request each per this time, not one per message)."""
FETCHES_AT_ONCE = 4
"""Certificates fetched at the same time at most (messages naming many made-up certificate URLs at once wait)."""
_PEM_PATH = re.compile(r"/[A-Za-z0-9._-]{1,200}\.pem")


class SnsRefused(Forbidden):
    """The message is not a genuine, fresh SNS message for an accepted topic."""


class SnsUnavailable(PipelineError):
    """SNS's host could not be reached (a signing certificate, a subscription confirmation): SNS retries."""

    code = "SERVICE_UNAVAILABLE"
    status = 503


@dataclass(frozen=True)
class SigningKey:
    key: rsa.RSAPublicKey
    not_after: datetime


def canonical_string(message: Mapping[str, str]) -> bytes:
    """The bytes SNS signs: `Key\\nvalue\\n` for each signed field of the message's Type, in order."""
    lines = []
    for key in SIGNED_KEYS[message["Type"]]:
        value = message.get(key)
        if value is None and key == "Subject":
            continue
        lines.append(f"{key}\n{value}\n")
    return "".join(lines).encode("utf-8")


class SnsVerifier:
    """Checks messages against the `[feedback]` config; fetches and caches signing certificates."""

    def __init__(self, settings: FeedbackConfig) -> None:
        self.settings = settings
        self.topics = frozenset(settings.sns_topic_arns)
        self.host = re.compile(settings.sns_host_pattern)
        self.tls = verifying_tls_context(settings.sns_ca_file or None)
        self._keys: TtlCache[str, SigningKey] = TtlCache(CERT_TTL, max_entries=100)
        self._failures: TtlCache[str, tuple[type[PipelineError], str]] = TtlCache(FAILURE_TTL, max_entries=1000)
        self._fetching: dict[str, asyncio.Future[SigningKey]] = {}
        self._fetch_slots = asyncio.Semaphore(FETCHES_AT_ONCE)

    async def verify(self, message: Mapping[str, str]) -> None:
        """Raise `SnsRefused` or `SnsUnavailable` unless `message` (SNS's JSON keys, values as sent) is genuine."""
        topic = message["TopicArn"]
        if not self.topics:
            raise SnsRefused("No SNS topic is accepted: set feedback.sns_topic_arns",
                             "List the topic ARN in feedback.sns_topic_arns and restart plunkd.")
        if topic not in self.topics:
            raise SnsRefused(f"SNS topic {topic} is not one of feedback.sns_topic_arns")
        self.check_fresh(message["Timestamp"], datetime.now(UTC))
        try:
            signature = base64.b64decode(message["Signature"], validate=True)
        except (binascii.Error, ValueError):
            raise SnsRefused("The SNS signature is not base64") from None
        signing = await self.signing_key(message["SigningCertURL"])
        try:
            signing.key.verify(signature, canonical_string(message), padding.PKCS1v15(),
                               HASHES[message["SignatureVersion"]]())
        except InvalidSignature:
            raise SnsRefused("The SNS signature does not verify") from None

    def check_fresh(self, timestamp: str, now: datetime) -> None:
        try:
            sent = datetime.fromisoformat(timestamp)
        except ValueError:
            raise SnsRefused(f"The SNS Timestamp {timestamp!r} is not an ISO 8601 time") from None
        if sent.tzinfo is None:
            raise SnsRefused(f"The SNS Timestamp {timestamp!r} has no time zone")
        if sent > now + CLOCK_SKEW:
            raise SnsRefused(f"The SNS Timestamp {timestamp} is in the future")
        if now - sent > timedelta(seconds=self.settings.sns_max_age_seconds):
            raise SnsRefused(f"The SNS message is older than {self.settings.sns_max_age_seconds} s "
                             f"(Timestamp {timestamp})")

    def check_url(self, url: str, what: str) -> None:
        """`url` must be https on an SNS host (`sns_host_pattern`), with no user info."""
        try:
            parts = urlsplit(url)
        except ValueError:
            raise SnsRefused(f"The SNS {what} is not a URL") from None
        if parts.scheme != "https" or "@" in parts.netloc or not self.host.fullmatch(parts.netloc):
            raise SnsRefused(f"The SNS {what} is not https on an SNS host (feedback.sns_host_pattern)")

    async def signing_key(self, url: str) -> SigningKey:
        """The certificate's key, cached; one fetch at a time per URL, however many messages wait for it."""
        signing = self._keys.get(url)
        if signing is None:
            self.check_url(url, "SigningCertURL")
            parts = urlsplit(url)
            if not _PEM_PATH.fullmatch(parts.path) or parts.query or parts.fragment:
                raise SnsRefused("The SNS SigningCertURL does not name a .pem certificate")
            failure = self._failures.get(url)
            if failure is not None:
                kind, reason = failure
                raise kind(reason)
            fetching = self._fetching.get(url)
            if fetching is None:
                fetching = asyncio.ensure_future(self._fetch_key(url))
                self._fetching[url] = fetching
                fetching.add_done_callback(lambda done: self._fetched(url, done))
            signing = await asyncio.shield(fetching)
        if datetime.now(UTC) > signing.not_after:
            raise SnsRefused("The SNS signing certificate has expired")
        return signing

    def _fetched(self, url: str, done: asyncio.Future[SigningKey]) -> None:
        """Forget the finished fetch (its outcome is in the caches), and take its exception so that a fetch
        whose waiters were all cancelled is not reported as an exception never retrieved."""
        self._fetching.pop(url, None)
        if not done.cancelled():
            done.exception()

    async def _fetch_key(self, url: str) -> SigningKey:
        try:
            async with self._fetch_slots:
                started = time.monotonic()
                pem = await self._get(url, MAX_CERT_BYTES, "signing certificate")
            signing = _parse_certificate(pem)
        except (SnsRefused, SnsUnavailable) as exc:
            self._failures.put(url, (type(exc), exc.message))
            log.warning("sns signing certificate %s not used: %s", url, exc.message)
            raise
        self._keys.put(url, signing)
        log.info("sns signing certificate %s fetched in %.0f ms, valid until %s", url,
                 (time.monotonic() - started) * 1000, signing.not_after.isoformat())
        return signing

    async def confirm_subscription(self, message: Mapping[str, str]) -> None:
        """GET the SubscribeURL of a verified SubscriptionConfirmation (SNS's ConfirmSubscription action,
        for the message's own topic); `SnsUnavailable` unless SNS answers 200."""
        url = message["SubscribeURL"]
        self.check_url(url, "SubscribeURL")
        query = parse_qs(urlsplit(url).query)
        if query.get("Action") != ["ConfirmSubscription"] or query.get("TopicArn") != [message["TopicArn"]]:
            raise SnsRefused("The SNS SubscribeURL does not confirm a subscription to the message's topic")
        await self._get(url, MAX_CONFIRM_BYTES, "subscription confirmation")

    async def _get(self, url: str, limit: int, what: str) -> bytes:
        """The body of a 200 answer to GET `url` (no redirects, at most `limit` bytes, within the timeout)."""
        timeout = aiohttp.ClientTimeout(total=self.settings.sns_fetch_timeout_seconds)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.get(url, ssl=self.tls, allow_redirects=False) as resp:
                if resp.status == 200:
                    body = await read_at_most(resp, limit + 1)
                    if len(body) > limit:
                        raise SnsRefused(f"The SNS {what} is larger than {limit} bytes")
                    return body
                if resp.status >= 500:
                    raise SnsUnavailable(f"SNS answered {resp.status} for the {what}; SNS will retry")
                raise SnsRefused(f"SNS answered {resp.status} for the {what}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise SnsUnavailable(f"Could not fetch the SNS {what}: {exc.__class__.__name__}; SNS will retry") from None


def _parse_certificate(pem: bytes) -> SigningKey:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise SnsRefused("The SNS signing certificate is not a PEM certificate") from None
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise SnsRefused("The SNS signing certificate's key is not RSA")
    now = datetime.now(UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise SnsRefused("The SNS signing certificate is not valid now")
    return SigningKey(key, certificate.not_valid_after_utc)
