"""The pooled random bytes behind ids, MIME boundaries and request ids: never repeated, in a forked child
neither, and the request id a version-4 UUID as clients parse it."""

from __future__ import annotations

import os
import uuid

from core.randomness import random_bytes, random_hex, uuid4_text
from storage.models import new_id


def test_draws_never_repeat_across_many_pages():
    draws = [random_bytes(8) for _ in range(5000)]  # about ten pages of the pool
    assert len(set(draws)) == len(draws)
    assert len(random_hex(16)) == 32 and len({random_hex(16) for _ in range(1000)}) == 1000


def test_a_forked_child_draws_other_bytes_than_its_parent():
    random_bytes(8)  # the parent's pool is part used: a child that inherited it would draw what the parent draws next
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.write(write, random_bytes(8) + new_id().encode())
        os._exit(0)
    os.close(write)
    drawn_by_child = os.read(read, 100)
    os.waitpid(child, 0)
    os.close(read)
    assert len(drawn_by_child) == 8 + 36
    assert random_bytes(8) != drawn_by_child[:8]
    assert new_id()[19:] != drawn_by_child[8 + 19:].decode()


def test_a_request_id_is_a_version_4_uuid():
    for _ in range(1000):
        text = uuid4_text()
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
