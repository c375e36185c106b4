"""How long /v1/send waits while a bulk change runs beside it: a complaint that pauses a campaign whose N emails are
queued (the reputation guard; until they are all parked), cancelling that campaign, deleting N events by name, then
deleting the contact they belonged to with its N others. Each is measured against
the same server idle (the baseline: /v1/send's p99 with nothing beside it), one run, ratios printed. Such changes
go a thousand rows per transaction (`storage.db.Database.write_in_chunks`); in one transaction each held every
other write until it committed (N = 100,000: 4.6 s on PostgreSQL and 1.2 s on SQLite for the cancel).

    python -m bench.bulk_changes [--rows 100000] [--probes 1000] [--database-url postgresql+asyncpg://…] [--quick]

The server is a real `plunkd serve` (API process + dispatcher process at 1 message/s, so the campaign's emails stay
queued). Contacts and events are written through the storage layer's tables in bulk before it starts, with a
project's reputation counters one complaint short of the pause level (3 in 1,000 sends: the level is 0.3 %) and
a SENT email to complain about; the complaint is a signed SES notification through SNS, as bench.feedback posts
them (its signing certificate served over HTTPS from this process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.campaign import campaign_state, latencies, p99, project_id_of, seed_contacts
from bench.common import (
    bench_database,
    create_project,
    free_port,
    insert_into,
    parse_with_quick,
    plunkd_env,
    server_process,
    temp_dir,
)
from bench.feedback import sns_host
from bench.setup_sender import verify_offline
from storage.db import Database
from storage.models import Contact, Content, Email, Event, ReputationDay, new_id, utcnow
from storage.reputation import day_of
from testkit.sns import CERT_PATH, TOPIC, SnsSigner, make_signing_certificate, ses_event

COMPLAINED_ID = "bench-ses-complained"
"""The SES message id of the seeded SENT email the pausing complaint is about."""

EVENT_BATCH = 10_000
Action = Callable[[aiohttp.ClientSession], Awaitable[int]]
"""One bulk change over HTTP; returns the reply's status."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000, help="queued emails, and events, of each change")
    parser.add_argument("--probes", type=int, default=1000, help="/v1/send requests of the idle p99")
    parser.add_argument("--database-url", default="")
    return parse_with_quick(parser, rows=2000, probes=50)


async def seed_events(url: str, project_id: str, count: int) -> str:
    """A contact `heavy@example.org` with `count` events named `page_view` and `count` named `visit`; returns the
    contact's id."""
    db = Database(url)
    now = utcnow()
    contact_id = new_id()
    await db.write(insert_into(Contact.__table__, [{"id": contact_id, "project_id": project_id,
                                                    "email": "heavy@example.org", "subscribed": True, "data": {},
                                                    "created_at": now, "updated_at": now}]))
    for name in ("page_view", "visit"):
        for first in range(0, count, EVENT_BATCH):
            await db.write(insert_into(Event.__table__, [
                {"id": new_id(), "project_id": project_id, "contact_id": contact_id, "name": name, "data": {},
                 "created_at": now} for _ in range(min(EVENT_BATCH, count - first))]))
    await db.dispose()
    return contact_id


async def seed_reputation(url: str, project_id: str, contact_id: str) -> None:
    """3 complaints in 1,000 sends today (the pause level is 0.3 %: one more crosses it), and a SENT email to the
    contact `contact_id` with the SES message id `COMPLAINED_ID`."""
    db = Database(url)
    now, content_id = utcnow(), new_id()
    await db.write(insert_into(ReputationDay.__table__, [{"project_id": project_id, "day": day_of(now), "shard": 0,
                                                          "sent": 1000, "bounced": 0, "complained": 3}]))
    await db.write(insert_into(Content.__table__, [{"id": content_id, "project_id": project_id,
                                                    "raw": b"Subject: hi\r\n\r\nhi", "deferred": False,
                                                    "created_at": now}]))
    await db.write(insert_into(Email.__table__, [{
        "id": new_id(), "project_id": project_id, "contact_id": contact_id, "content_id": content_id,
        "recipient": "heavy@example.org", "sender": "news@bench.example", "subject": "hi", "source": "api",
        "status": "SENT", "transport_id": COMPLAINED_ID, "created_at": now, "sent_at": now}]))
    await db.dispose()


async def parkable(engine: AsyncEngine, campaign_id: str) -> int:
    """The campaign's emails queued, neither claimed nor parked."""
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM outbox WHERE campaign_id = :i AND hold IS NULL AND "
                                        "claimed_by IS NULL"), {"i": campaign_id})).scalar_one()


def complaint_pausing(sns_url: str, signer: SnsSigner, engine: AsyncEngine, campaign_id: str) -> Action:
    """POST the complaint that crosses the pause level; done once none of the campaign's emails is left to park."""
    body = json.dumps(signer.notification(ses_event("Complaint", COMPLAINED_ID, "heavy@example.org"))).encode()
    headers = {"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "Notification"}

    async def action(client: aiohttp.ClientSession) -> int:
        async with client.post(sns_url, data=body, headers=headers) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        deadline = time.perf_counter() + 120
        while await parkable(engine, campaign_id):
            assert time.perf_counter() < deadline, "the paused campaign's emails were not parked"
            await asyncio.sleep(0.05)
        state = await campaign_status(engine, campaign_id)
        assert state == "PAUSED", state
        return resp.status

    return action


async def campaign_status(engine: AsyncEngine, campaign_id: str) -> str:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT status FROM campaigns WHERE id = :i"), {"i": campaign_id})).scalar_one()


async def beside(session: aiohttp.ClientSession, base: str, sk: str, action: Action) -> tuple[float, list[float]]:
    """Run `action` while four clients send back to back, from 0.2 s before it until it is answered: (its seconds,
    the latency of each send)."""
    done = asyncio.Event()
    probes = asyncio.create_task(latencies(session, base, sk, 10**9, until=done))
    await asyncio.sleep(0.2)
    begun = time.perf_counter()
    status = await action(session)
    took = time.perf_counter() - begun
    done.set()
    samples = await probes
    assert status == 200, status
    return took, samples


async def run(base: str, sk: str, url: str, contact_id: str, args: argparse.Namespace,
              sns: tuple[str, SnsSigner]) -> dict[str, tuple[float, list[float]]]:
    headers = {"Authorization": f"Bearer {sk}"}
    engine = create_async_engine(url)
    results: dict[str, tuple[float, list[float]]] = {}
    async with aiohttp.ClientSession() as session:
        await latencies(session, base, sk, 100)  # warm up
        results["idle"] = (0.0, await latencies(session, base, sk, args.probes))
        async with session.post(f"{base}/campaigns", headers=headers, json={
                "subject": "News", "body": "<p>Hello</p>", "from": "news@bench.example", "audience": "ALL"}) as resp:
            campaign_id = (await resp.json())["data"]["id"]
        async with session.post(f"{base}/campaigns/{campaign_id}/send", headers=headers, json={}) as resp:
            assert resp.status == 200, await resp.text()
        deadline = time.perf_counter() + 120
        while not (await campaign_state(engine, campaign_id))[0]:
            assert time.perf_counter() < deadline, "the fan-out did not finish"
            await asyncio.sleep(0.05)

        def call(method: str, path: str) -> Action:
            async def action(client: aiohttp.ClientSession) -> int:
                async with client.request(method, f"{base}{path}", headers=headers, json={}) as resp:
                    await resp.read()
                    return resp.status
            return action

        sns_url, signer = sns
        for name, action in (("pause a campaign (complaint)", complaint_pausing(sns_url, signer, engine, campaign_id)),
                             ("cancel a campaign", call("POST", f"/campaigns/{campaign_id}/cancel")),
                             ("delete events by name", call("DELETE", "/v1/events/page_view")),
                             ("delete a contact with them", call("DELETE", f"/v1/contacts/{contact_id}"))):
            results[name] = await beside(session, base, sk, action)
    await engine.dispose()
    return results


async def run_with_sns(base: str, sk: str, url: str, contact_id: str, args: argparse.Namespace, pem: bytes,
                       ca: trustme.CA, key: Any) -> dict[str, tuple[float, list[float]]]:
    async with sns_host(pem, ca) as sns_base:
        return await run(base, sk, url, contact_id, args, (f"{base}/webhooks/incoming/sns",
                                                          SnsSigner(key, sns_base + CERT_PATH)))


def main() -> None:
    args = parse_args()
    with temp_dir() as data, bench_database(args.database_url, data) as url:
        port = free_port()
        env = plunkd_env(data, port, PLUNKD_DATABASE_URL=url, PLUNKD_DELIVERY_ENABLED="true",
                         PLUNKD_DELIVERY_RATE_PER_SECOND="1", PLUNKD_DELIVERY_TRANSPORT="file")
        sk = create_project(data, env)
        asyncio.run(verify_offline(url, "bench", "bench.example"))
        project_id = asyncio.run(project_id_of(url))
        asyncio.run(seed_contacts(url, project_id, args.rows))
        contact_id = asyncio.run(seed_events(url, project_id, args.rows))
        asyncio.run(seed_reputation(url, project_id, contact_id))
        key, pem = make_signing_certificate()
        ca = trustme.CA()
        ca_file = Path(data) / "sns-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        env.update(PLUNKD_FEEDBACK_SNS_TOPIC_ARNS=TOPIC, PLUNKD_FEEDBACK_SNS_HOST_PATTERN=r"^127\.0\.0\.1:[0-9]+$",
                   PLUNKD_FEEDBACK_SNS_CA_FILE=str(ca_file))
        with server_process(["-m", "plunkd.cli", "serve"], port, env):
            results = asyncio.run(run_with_sns(f"http://127.0.0.1:{port}", sk, url, contact_id, args, pem, ca, key))
    backend = "PostgreSQL" if args.database_url else "SQLite"
    idle = p99(results.pop("idle")[1])
    print(f"[{backend}] /v1/send (4 clients back to back) while a change of {args.rows:,} rows runs beside it; "
          f"idle p99 {idle * 1000:.1f} ms")
    for name, (took, samples) in results.items():
        print(f"  {name:28s} took {took:6.2f} s; /v1/send p99 {p99(samples) * 1000:6.1f} ms, slowest "
              f"{max(samples) * 1000:6.1f} ms (slowest / idle p99: {max(samples) / idle:.1f}x; {len(samples)} sends)")


if __name__ == "__main__":
    main()
