"""Random bytes for the ids, boundaries and request ids every message and request makes, drawn from the
operating system's generator a page at a time.

`os.urandom` releases the GIL around its system call, and taking the GIL back waits for whichever thread holds
it. Beside a thread running pure Python (a busy loop, in a measurement) one call took 0.23 ms instead of half a
microsecond; the server's SQLite writer and aiosqlite's readers are such threads, and a /v1/send made five calls.
The bytes are the same generator's; a forked child starts with an empty pool, so it never repeats its parent's."""

from __future__ import annotations

import os
import threading

_PAGE = 4096
_lock = threading.Lock()
_pool = b""
_taken = 0


def random_bytes(count: int) -> bytes:
    """`count` (at most a page) bytes from the operating system's cryptographic generator."""
    global _pool, _taken
    with _lock:
        if _taken + count > len(_pool):
            _pool, _taken = os.urandom(_PAGE), 0
        chunk = _pool[_taken:_taken + count]
        _taken += count
    return chunk


def random_hex(count: int) -> str:
    """`count` random bytes as lower-case hex (twice as many characters)."""
    return random_bytes(count).hex()


def uuid_text(value: int) -> str:
    """The 128-bit `value` in a UUID's usual text form, as `str(uuid.UUID(int=value))` writes it, at a third of
    its cost (bulk writes make many ids)."""
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def uuid4_text() -> str:
    """A random (version 4) UUID in its usual text form, as `str(uuid.uuid4())` writes it."""
    return uuid_text((int.from_bytes(random_bytes(16), "big") & ~(0xF000 << 64) & ~(0xC000 << 48))
                     | (0x4000 << 64) | (0x8000 << 48))


def _forget_pool() -> None:
    global _pool, _taken
    _pool, _taken = b"", 0


os.register_at_fork(after_in_child=_forget_pool)
