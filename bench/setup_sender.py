"""Give a benchmark project a verified sending domain without DNS (benchmarks run offline)."""

from __future__ import annotations

import asyncio
import sys

from bench.common import use_bench_key
from pipeline.domains import KeyPair, add_domain, save_check
from pipeline.projects import require_project
from storage.db import Database

SELECTOR = "plunkd"
"""The DKIM selector of the benchmark's sending domain."""


async def verify_offline(url: str, project: str, domain: str, key: KeyPair | None = None) -> None:
    """Add `domain` to `project` as verified, with the DKIM key pair `key` (a new one when not given)."""
    use_bench_key()
    db = Database(url)
    await db.migrate()
    found = await db.read(require_project, project)
    added = await db.write(lambda s: add_domain(s, found.id, domain, SELECTOR, key))
    await db.write(lambda s: save_check(s, added.id, {"verified": True, "method": "benchmark"}))
    await db.dispose()


if __name__ == "__main__":
    asyncio.run(verify_offline(sys.argv[1], sys.argv[2], sys.argv[3]))
