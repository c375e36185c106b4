"""A campaign's fan-out survives `kill -9`: a real `plunkd serve` (SQLite file; the fan-out runs in the
acceptance process) is killed, with its dispatcher child, mid fan-out; the server started again
finishes the job and every subscribed contact is queued exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import urllib.request

import pytest

from bench.campaign import seed_contacts
from tests.servers import children, served_plunkd
from tests.test_cli_and_config import project_with_domain
from tests.test_processes import wait_until

CONTACTS = 10_000


def call(base: str, key: str, path: str, payload: dict) -> dict:
    request = urllib.request.Request(f"{base}{path}", method="POST", data=json.dumps(payload).encode(), headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())["data"]


def campaign_row(database: str, campaign_id: str) -> tuple[int, int, str]:
    with sqlite3.connect(database, timeout=30) as conn:
        return conn.execute("SELECT recipient_count, fanout_done, status FROM campaigns WHERE id = ?",
                            (campaign_id,)).fetchone()


@pytest.mark.long
def test_kill_9_mid_fan_out_queues_every_contact_exactly_once(tmp_path):
    env = {"PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DELIVERY_FANOUT_CHUNK": "100",
           "PLUNKD_DELIVERY_RATE_PER_SECOND": "1"}
    project = project_with_domain(tmp_path, "p", "news@example.com", env)
    key, project_id = project.secret_key, project.id
    database = tmp_path / "data" / "plunkd.sqlite3"
    asyncio.run(seed_contacts(f"sqlite+aiosqlite:///{database}", project_id, CONTACTS))

    with served_plunkd(tmp_path, env) as server:
        base, proc = server.base, server.proc
        campaign = call(base, key, "/campaigns", {"subject": "News", "body": "<p>Hi {{name}}</p>",
                                                  "audience": "ALL"})
        call(base, key, f"/campaigns/{campaign['id']}/send", {})
        wait_until(lambda: campaign_row(str(database), campaign["id"])[0] > 0, 30, "the fan-out to start")
        for pid in [*children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        queued_at_kill, done_at_kill, _ = campaign_row(str(database), campaign["id"])
    assert not done_at_kill and 0 < queued_at_kill < CONTACTS, "the kill did not land mid fan-out"
    with served_plunkd(tmp_path, env, port=server.port):
        wait_until(lambda: campaign_row(str(database), campaign["id"])[1], 60, "the fan-out to finish")

    with sqlite3.connect(database) as conn:
        emails, contacts = conn.execute("SELECT count(*), count(DISTINCT contact_id) FROM emails "
                                        "WHERE campaign_id = ?", (campaign["id"],)).fetchone()
        outbox = conn.execute("SELECT count(*) FROM outbox WHERE campaign_id = ?", (campaign["id"],)).fetchone()[0]
        sent = conn.execute("SELECT count(*) FROM emails WHERE campaign_id = ? AND sent_at IS NOT NULL",
                            (campaign["id"],)).fetchone()[0]
    assert emails == contacts == CONTACTS
    assert outbox + sent == CONTACTS
    assert campaign_row(str(database), campaign["id"])[0] == CONTACTS
