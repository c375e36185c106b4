"""A campaign's fan-out survives `kill -9`: a real `plunkd serve` (SQLite file; the fan-out runs in the
acceptance process) is killed, with its dispatcher child, mid fan-out; the server started again
finishes the job and every subscribed contact is queued exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

from bench.campaign import seed_contacts
from tests.test_cli_and_config import ROOT, free_port, plunkd
from tests.test_processes import api_up, children, wait_until

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


@contextlib.contextmanager
def serving(tmp_path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    with open(tmp_path / "serve.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "plunkd.cli", "serve"], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(timeout=10)


def test_kill_9_mid_fan_out_queues_every_contact_exactly_once(tmp_path):
    env = {"PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DELIVERY_FANOUT_CHUNK": "100",
           "PLUNKD_DELIVERY_RATE_PER_SECOND": "1"}
    made = plunkd(tmp_path, "project", "create", "--name", "p", "--from-email", "news@example.com", env=env)
    key = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))
    project_id = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("project")).strip("()")
    for step in (("domain", "add", "example.com", "--project", "p"),
                 ("domain", "verify", "example.com", "--project", "p", "--offline")):
        assert plunkd(tmp_path, *step, env=env).returncode == 0
    database = tmp_path / "data" / "plunkd.sqlite3"
    asyncio.run(seed_contacts(f"sqlite+aiosqlite:///{database}", project_id, CONTACTS))

    port = free_port()
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PLUNKD_SERVER_DATA_DIR": str(tmp_path / "data"),
                "PLUNKD_SERVER_HTTP_PORT": str(port)}
    full_env.pop("PLUNKD_CONFIG", None)
    base = f"http://127.0.0.1:{port}"
    with serving(tmp_path, full_env) as proc:
        wait_until(lambda: api_up(base), 30, "the API")
        campaign = call(base, key, "/campaigns", {"subject": "News", "body": "<p>Hi {{name}}</p>",
                                                  "audience": "ALL"})
        call(base, key, f"/campaigns/{campaign['id']}/send", {})
        wait_until(lambda: campaign_row(str(database), campaign["id"])[0] > 0, 30, "the fan-out to start")
        for pid in [*children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        queued_at_kill, done_at_kill, _ = campaign_row(str(database), campaign["id"])
    assert not done_at_kill and 0 < queued_at_kill < CONTACTS, "the kill did not land mid fan-out"
    with serving(tmp_path, full_env):
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
