"""Signed per-contact links for marketing mail: unsubscribe, subscribe and preferences pages.

A token names a contact and, for campaign mail, the campaign it came from (so a campaign's stats can
count its unsubscribes). It is `base64url(contact_id:campaign_id)` + `.` + a truncated HMAC-SHA256 of
that payload under the server secret, so a link cannot be forged or pointed at another contact, and it
needs no database row. The secret is `server.secret` or, when that is empty, a random key generated on
first start into the data dir (0600), read by every process of the node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SECRET_FILE = "link-secret.key"
SIGNATURE_BYTES = 16
MAX_TOKEN_LENGTH = 256


@dataclass(frozen=True)
class ContactLinks:
    unsubscribe: str
    subscribe: str
    preferences: str
    mailto: str
    """The List-Unsubscribe mailto: the sender's own address with an 'unsubscribe' subject."""


@dataclass(frozen=True)
class LinkTarget:
    contact_id: str
    campaign_id: str | None


def load_or_create_secret(data_dir: Path) -> bytes:
    """The node's link secret from `data_dir`, made (atomically, once, whichever process starts first)
    when absent."""
    path = data_dir / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    staged = data_dir / f".{SECRET_FILE}.{os.getpid()}"
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(staged, path)  # fails if another process made it first: then theirs is the secret
    except FileExistsError:
        pass
    finally:
        staged.unlink()
    return _read_secret(path)


def make_signer(configured_secret: str, data_dir: Path, public_url: str) -> LinkSigner:
    """The signer for `server.link_secret`, or for the data dir's generated secret when that is empty."""
    if configured_secret and len(configured_secret) < 32:
        raise ValueError("server.link_secret must be at least 32 characters")
    secret = configured_secret.encode() if configured_secret else load_or_create_secret(data_dir)
    return LinkSigner(secret, public_url)


def _read_secret(path: Path) -> bytes:
    text = path.read_text().strip()
    if len(text) < 32:
        raise ValueError(f"{path} holds no usable secret (expected at least 32 characters)")
    return text.encode()


class SignedTokens:
    """`base64url(payload).base64url(HMAC-SHA256(key, payload)[:16])`, the one token format of plunkd's
    signed links (contact links here, open and click links in `pipeline.tracking.links`). Only the spelling
    `make` writes is accepted (base64 ignores stray characters and a last character's spare bits)."""

    def __init__(self, key: bytes, max_length: int) -> None:
        self._key = key
        self.max_length = max_length

    def _signature(self, payload: bytes) -> bytes:
        return hmac.digest(self._key, payload, hashlib.sha256)[:SIGNATURE_BYTES]

    def make(self, payload: bytes) -> str:
        return f"{_b64(payload)}.{_b64(self._signature(payload))}"

    def read(self, token: str) -> bytes | None:
        """The payload a token was made for, or None when it is malformed or forged."""
        if len(token) > self.max_length or token.count(".") != 1:
            return None
        encoded, signature = token.split(".")
        try:
            payload, given = _unb64(encoded), _unb64(signature)
        except (binascii.Error, ValueError):
            return None
        return payload if hmac.compare_digest(given, self._signature(payload)) else None


class LinkSigner:
    def __init__(self, secret: bytes, public_url: str) -> None:
        self._secret = secret
        self._tokens = SignedTokens(secret, MAX_TOKEN_LENGTH)
        self.public_url = public_url.rstrip("/")

    def derived_key(self, purpose: str) -> bytes:
        """A key for another kind of signed link (`pipeline.tracking.links`), from the same secret, so changing the
        secret invalidates those links too; no token of one kind verifies as another."""
        return hmac.new(self._secret, b"plunkd derived key:" + purpose.encode(), hashlib.sha256).digest()

    def token(self, contact_id: str, campaign_id: str | None = None) -> str:
        return self._tokens.make(f"{contact_id}:{campaign_id or ''}".encode())

    def verify(self, token: str) -> LinkTarget | None:
        """The contact (and campaign) a token was made for, or None when it is malformed or forged."""
        payload = self._tokens.read(token)
        if payload is None:
            return None
        contact_id, _, campaign_id = payload.decode("ascii", "replace").partition(":")
        return LinkTarget(contact_id, campaign_id or None) if contact_id else None

    def links(self, contact_id: str, sender: str, campaign_id: str | None = None) -> ContactLinks:
        token = self.token(contact_id, campaign_id)
        base = self.public_url
        return ContactLinks(f"{base}/unsubscribe/{token}", f"{base}/subscribe/{token}",
                            f"{base}/preferences/{token}", f"mailto:{sender}?subject={quote('unsubscribe')}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """The bytes of unpadded base64url `text`; only the one text `_b64` makes for them is accepted."""
    if not text or not text.isascii():
        raise ValueError("empty or non-ASCII")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:
        raise ValueError("not canonical base64url")
    return raw
