"""VERP return paths: `b+<token>@<return path>`, the envelope sender an email is delivered with when its
domain has a verified return path, so a bounce (DSN) or a complaint report sent back to it names the email.

The token is `pipeline.links.SignedTokens`' format (the one format of plunkd's signed links) under a key
derived from the link secret and the return-path domain: its payload is the email id's 16 bytes and the day
it was made (4 bytes, days since 1970), 47 characters with the prefix, within the 64 a local part may have.
So an address cannot be forged, nor moved to another domain, and it is refused `max_days` after it was made.
Its letters are case-sensitive: an address whose case was changed is refused like any other forged one.
"""

from __future__ import annotations

import time
import uuid

from pipeline.links import LinkSigner, SignedTokens

PREFIX = "b+"
MAX_TOKEN_LENGTH = 64
PAYLOAD_BYTES = 20


def today() -> int:
    return int(time.time() // 86400)


class VerpSigner:
    def __init__(self, links: LinkSigner, max_days: int) -> None:
        self._links = links
        self.max_days = max_days

    def _tokens(self, domain: str) -> SignedTokens:
        return SignedTokens(self._links.derived_key(f"verp:{domain.lower()}"), MAX_TOKEN_LENGTH)

    def address(self, email_id: str, domain: str, day: int | None = None) -> str:
        payload = uuid.UUID(email_id).bytes + (today() if day is None else day).to_bytes(4, "big")
        return f"{PREFIX}{self._tokens(domain).make(payload)}@{domain.lower()}"

    def email_id(self, address: str) -> str | None:
        """The email a VERP address was made for, or None: not a VERP address, a token forged, cut, made for
        another domain or older than `max_days` (the domain part is compared without case, the rest exactly)."""
        local_part, at, domain = address.rpartition("@")
        if not at or not local_part.startswith(PREFIX) or not domain:
            return None
        payload = self._tokens(domain).read(local_part[len(PREFIX):])
        if payload is None or len(payload) != PAYLOAD_BYTES:
            return None
        made = int.from_bytes(payload[16:], "big")
        if not 0 <= today() - made <= self.max_days:
            return None
        return str(uuid.UUID(bytes=payload[:16]))
