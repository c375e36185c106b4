"""Secrets at rest: DKIM private keys and webhook secrets are stored encrypted (AES-256-GCM) under a key
kept outside the database (`plunkd.atrest` loads it from the key file or the config).

A stored value is `enc1:<key id>:<base64url(nonce | ciphertext | tag)>`. The key id (8 hex digits of a
SHA-256 of the key, which tells nothing about the key) says which key sealed it, so a key ring can hold the
current key, which seals, and previous ones, which still open values sealed before a rotation.

The columns are `EncryptedText`: the ORM and Core statements seal on write and open on read, through the
process's key ring (`use_keyring`, installed at start-up). Opening is cached per stored value, so a DKIM
key is decrypted once per process, not per message. A value without the prefix (written before this
existed, or by an older node) reads as it is; start-up seals every such value (`seal_batch`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import String, Text, column, func, select, table, update
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

PREFIX = "enc1:"
NONCE_BYTES = 12
ASSOCIATED_DATA = b"plunkd secret v1"
SECRET_COLUMNS = (("domains", "dkim_private_key"), ("webhook_endpoints", "secret"),
                  ("webhook_endpoints", "previous_secret"))
"""Every column holding a secret, as (table, column)."""


class SecretsError(ValueError):
    """The key cannot open what the database holds, or no key is loaded; one line naming the key's source."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"plunkd key id\0" + key).hexdigest()[:8]


def sealed_key_id(stored: str) -> str | None:
    """The id of the key that sealed `stored`, or None when it is not sealed (plain text)."""
    if not stored.startswith(PREFIX):
        return None
    return stored[len(PREFIX):].split(":", 1)[0]


class KeyRing:
    """The current key (seals) and previous ones (still open). `source` names where they came from, for
    error messages: "key file data/encryption.key", "security.encryption_key"."""

    def __init__(self, keys: Iterable[bytes], source: str) -> None:
        ordered = list(keys)
        if not ordered:
            raise SecretsError(f"{source} holds no key")
        self.source = source
        self.current_key = ordered[0]
        self.current = key_id(ordered[0])
        self._ciphers = {key_id(key): AESGCM(key) for key in ordered}
        self._prefix = f"{PREFIX}{self.current}:"
        self.open = lru_cache(maxsize=4096)(self._open)

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def holds(self, kid: str) -> bool:
        return kid in self._ciphers

    def is_current(self, stored: str) -> bool:
        return stored.startswith(self._prefix)

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.current].encrypt(nonce, plaintext.encode(), ASSOCIATED_DATA)
        return self._prefix + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def _open(self, stored: str) -> str:
        kid = sealed_key_id(stored)
        if kid is None:
            return stored
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SecretsError(f"a secret in the database is sealed with key id {kid}, which {self.source} "
                               f"does not hold (it holds {', '.join(self.key_ids)})")
        body = stored.split(":", 2)[2]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], ASSOCIATED_DATA).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretsError(f"a secret in the database sealed with key id {kid} does not open with "
                               f"{self.source}: the value is damaged") from None


_installed: KeyRing | None = None


def use_keyring(ring: KeyRing) -> None:
    """Seal and open the secret columns with `ring` in this process from now on."""
    global _installed
    _installed = ring


def keyring() -> KeyRing:
    if _installed is None:
        raise SecretsError("no encryption key is loaded: secrets are read and written only by a process that "
                           "loaded one at start-up (plunkd.atrest.open_secrets)")
    return _installed


class EncryptedText(TypeDecorator[str]):
    """A secret column: sealed on write and opened on read with the process's key ring. `sqlite_type`:
    the type the SQLite table declares (SQLite enforces no length, so a column that held less before is
    left as it was rather than rebuilt)."""

    impl = Text
    cache_ok = True

    def __init__(self, sqlite_type: Any = None) -> None:
        super().__init__()
        self.sqlite_type = sqlite_type

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "sqlite" and self.sqlite_type is not None:
            return self.sqlite_type
        return Text()

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else keyring().seal(value)

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        if value is None or not value.startswith(PREFIX):
            return value
        return keyring().open(value)


WEBHOOK_SECRET_SQLITE_TYPE = String(100)
"""What SQLite's webhook_endpoints table declared before secrets were sealed (see `EncryptedText`)."""


def _raw_column(table_name: str, column_name: str) -> tuple[Any, Any, Any]:
    """The table and its id and secret columns, untyped: the stored text, not opened."""
    raw = table(table_name, column("id"), column(column_name))
    return raw, raw.c.id, raw.c[column_name]


def foreign_key_ids(session: Session, ring: KeyRing) -> set[str]:
    """Ids of keys that sealed a stored secret and that `ring` does not hold."""
    found: set[str] = set()
    for table_name, column_name in SECRET_COLUMNS:
        value = _raw_column(table_name, column_name)[2]
        stmt = select(value).where(value.like(f"{PREFIX}%"), ~value.like(f"{PREFIX}{ring.current}:%"))
        for stored in session.execute(stmt).scalars():
            kid = sealed_key_id(stored)
            if kid is not None and not ring.holds(kid):
                found.add(kid)
    return found


def count_unsealed(session: Session, ring: KeyRing) -> int:
    """Stored secrets not sealed with the ring's current key (plain text, or a previous key)."""
    total = 0
    for table_name, column_name in SECRET_COLUMNS:
        raw, _, value = _raw_column(table_name, column_name)
        total += session.execute(select(func.count()).select_from(raw).where(
            value.is_not(None), ~value.like(f"{PREFIX}{ring.current}:%"))).scalar_one()
    return total


def seal_batch(session: Session, ring: KeyRing, limit: int) -> int:
    """Seal up to `limit` stored secrets per column that are not sealed with the ring's current key: plain
    text is sealed, a value sealed with a previous key is opened and sealed again. Each row is written only
    if it still holds what was read (a concurrent change wins). Returns how many were read; 0 = done."""
    seen = 0
    for table_name, column_name in SECRET_COLUMNS:
        raw, row_id, value = _raw_column(table_name, column_name)
        rows = session.execute(select(row_id, value).where(
            value.is_not(None), ~value.like(f"{PREFIX}{ring.current}:%")).order_by(row_id).limit(limit)).all()
        seen += len(rows)
        for found_id, stored in rows:
            session.execute(update(raw).where(row_id == found_id, value == stored)
                            .values({column_name: ring.seal(ring.open(stored))}))
    return seen
