"""The encryption key's written form (in the key file and the config): base64 of 32 random bytes. Here, on the
ground floor, because the config checks a configured key and `storage.secrets` seals with it."""

from __future__ import annotations

import base64
import binascii
import os

KEY_BYTES = 32


def parse_key(text: str) -> bytes:
    """A key as written in the key file or the config: base64 (standard or URL-safe) of 32 bytes."""
    cleaned = text.strip().replace("+", "-").replace("/", "_")
    try:
        key = base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("expected base64 of 32 random bytes (openssl rand -base64 32)") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"expected base64 of 32 random bytes (openssl rand -base64 32), got {len(key)} bytes")
    return key


def format_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)
