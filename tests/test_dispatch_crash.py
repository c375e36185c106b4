"""A dispatcher killed with `kill -9` while it sends: a real `plunkd serve` (SQLite file, file transport) is
killed, with its dispatcher child, while sent emails wait for their outcome to be committed. The server
started again sends those emails again: at most `delivery.concurrency` duplicates, each carrying the same
Message-ID as its first copy (the one its email was given when accepted), so a receiver can drop it."""

from __future__ import annotations

import asyncio
import email
import os
import signal
import sqlite3
import time
from collections import Counter
from email import policy
from pathlib import Path

import pytest

from bench.dispatch import queue
from storage.db import Database
from tests.servers import children, served_plunkd
from tests.test_cli_and_config import project_with_domain
from tests.test_processes import delivered, wait_until

EMAILS = 40
CONCURRENCY = 8


def message_ids(outbox: Path) -> list[str]:
    return [str(email.message_from_bytes(path.read_bytes(), policy=policy.compat32)["Message-ID"]).strip()
            for path in outbox.glob("*.eml")]


def recorded(database: Path) -> dict[str, tuple[str, str | None]]:
    """email id → (status, message_id), as the database has them."""
    with sqlite3.connect(database, timeout=30) as conn:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, message_id FROM emails")}


def settled(outbox: Path, seconds: float) -> int:
    """The number of delivered messages once it has not changed for `seconds`."""
    count, since = delivered(outbox), time.monotonic()
    while time.monotonic() - since < seconds:
        time.sleep(0.1)
        if delivered(outbox) != count:
            count, since = delivered(outbox), time.monotonic()
    return count


@pytest.mark.long
def test_kill_9_while_sending_repeats_at_most_concurrency_emails_with_their_message_ids(tmp_path):
    env = {"PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DELIVERY_RATE_PER_SECOND": "20",
           "PLUNKD_DELIVERY_BATCH_SIZE": str(EMAILS), "PLUNKD_DELIVERY_CONCURRENCY": str(CONCURRENCY),
           "PLUNKD_DELIVERY_LEASE_SECONDS": "3"}
    project_id = project_with_domain(tmp_path, "p", "shop@bench.example", env).id
    database = tmp_path / "data" / "plunkd.sqlite3"
    outbox = tmp_path / "data" / "outbox"

    async def accept() -> None:
        db = Database(f"sqlite+aiosqlite:///{database}")
        await queue(db, project_id, EMAILS)  # the send path /v1/send takes, in this process
        await db.dispose()

    asyncio.run(accept())
    accepted = recorded(database)
    assert len(accepted) == EMAILS and all(message_id for _, message_id in accepted.values()), \
        "each email has its Message-ID from the moment it is accepted"

    with served_plunkd(tmp_path, env, wait_for=None) as server:
        proc = server.proc
        wait_until(lambda: delivered(outbox) > 0, 60, "the first delivery", tmp_path / "serve.log")
        # Another process's write transaction (as a backup or a long write would hold) keeps the dispatcher's
        # outcomes from committing while it goes on sending what it claimed: the moment a kill costs most.
        blocker = sqlite3.connect(database, timeout=30, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            sent_at_kill = settled(outbox, 2.0)
            for pid in [*children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    sent_recorded = sum(status == "SENT" for status, _ in recorded(database).values())
    assert sent_at_kill > sent_recorded, "the kill did not land while sends waited for their outcome"

    with served_plunkd(tmp_path, env, wait_for=None):
        wait_until(lambda: all(status == "SENT" for status, _ in recorded(database).values()), 60,
                   "every email to be sent", tmp_path / "serve.log")
    final = recorded(database)
    copies = Counter(message_ids(outbox))
    assert set(copies) == {message_id for _, message_id in final.values()}, \
        "every copy carries its email's Message-ID, the one recorded"
    assert {message_id for _, message_id in final.values()} == {message_id for _, message_id in accepted.values()}
    duplicates = sum(copies.values()) - EMAILS
    assert 1 <= duplicates <= CONCURRENCY, f"{duplicates} emails were sent twice"
    assert duplicates == sent_at_kill - sent_recorded
