"""SES feedback through SNS: 5,000 signed Delivery notifications (one for each of 5,000 sent emails) posted by 20
concurrent clients to a real `plunkd serve`, against a bare aiohttp handler that verifies the same signatures and
does one insert per message (bench/bare_sns_server.py). One run, applied messages per second and the ratio printed.

    python -m bench.feedback [--count 5000] [--concurrency 20] [--database-url postgresql+asyncpg://…] [--quick]

SNS itself is on the internet: the messages are signed here as SNS signs them (testkit/sns.py, a signing certificate
of our own CA), and the certificate is served over HTTPS from this process (a trustme certificate), which plunkd
is configured to trust (`[feedback]` through its environment variables). The emails are written straight into the
tables before the server starts, as the SES transport leaves them (SENT, with an SES message id). On SQLite the
baseline runs twice: with an fsync per commit (plunkd's durability) and, printed beside it, without.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import trustme
from aiohttp import web
from sqlalchemy import func, select

from bench.campaign import seed_contacts
from bench.common import (
    bare_databases,
    bench_database,
    free_port,
    insert_into,
    parse_with_quick,
    plunkd_env,
    report,
    server_process,
    temp_dir,
)
from pipeline.projects import create_project
from storage.db import Database
from storage.models import Contact, Content, Email, Event, new_id, utcnow
from testkit.sns import CERT_PATH, TOPIC, FakeSnsHost, SnsSigner, make_signing_certificate, ses_event

WARM_UP = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--database-url", default="")
    return parse_with_quick(parser, count=200)


async def seed(url: str, count: int) -> None:
    """A project, `count` contacts and one SENT email to each, with transport ids bench-ses-<i>."""
    db = Database(url)
    await db.migrate()
    issued = await db.write(lambda s: create_project(s, "bench", "news@example.com", "Bench"))
    project_id = issued.project.id
    await db.dispose()
    await seed_contacts(url, project_id, count)
    db = Database(url)
    contacts = await db.read(lambda s: list(s.execute(
        select(Contact.id, Contact.email).where(Contact.project_id == project_id).order_by(Contact.email)).all()))
    content_id, now = new_id(), utcnow()
    await db.write(lambda s: s.connection().execute(Content.__table__.insert(), [{
        "id": content_id, "project_id": project_id, "raw": b"Subject: hi\r\n\r\nhi", "deferred": False,
        "created_at": now}]))
    for first in range(0, len(contacts), 5000):
        chunk = [{"id": new_id(), "project_id": project_id, "contact_id": contact_id, "content_id": content_id,
                  "recipient": email, "sender": "news@example.com", "subject": "hi", "source": "api", "status": "SENT",
                  "transport_id": f"bench-ses-{email.split('@')[0].removeprefix('reader')}", "created_at": now,
                  "sent_at": now} for contact_id, email in contacts[first:first + 5000]]
        await db.write(insert_into(Email.__table__, chunk))
    await db.dispose()


def signed_messages(signer: SnsSigner, count: int) -> tuple[list[bytes], list[bytes]]:
    """(warm-up messages about no email, one Delivery for each seeded email), as SNS posts them."""
    warm = [json.dumps(signer.notification(ses_event("Delivery", f"unknown-{i}", "x@example.org"))).encode()
            for i in range(WARM_UP)]
    real = [json.dumps(signer.notification(ses_event("Delivery", f"bench-ses-{i}", f"reader{i}@example.org")))
            .encode() for i in range(count)]
    return warm, real


async def post_all(url: str, warm: list[bytes], bodies: list[bytes],
                   concurrency: int) -> tuple[float, collections.Counter]:
    """Post the warm-up messages one by one, then `bodies` with `concurrency` clients; (messages/s, outcomes)."""
    headers = {"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "Notification"}
    outcomes: collections.Counter = collections.Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for body in warm:
            async with session.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, (resp.status, await resp.text())
        pending = iter(bodies)

        async def client() -> None:
            for body in pending:
                async with session.post(url, data=body, headers=headers) as resp:
                    reply = await resp.json(content_type=None)
                    outcomes[(resp.status, reply.get("data", {}).get("outcome", "?"))] += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(bodies) / elapsed, outcomes


@contextlib.asynccontextmanager
async def sns_host(pem: bytes, ca: trustme.CA):
    """The signing certificate over HTTPS on 127.0.0.1; yields its base URL."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(FakeSnsHost(pem).app(), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=tls).start()
    try:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def measure(data: str, url: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    key, pem = make_signing_certificate()
    ca = trustme.CA()
    ca_file = Path(data) / "sns-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pem_file = Path(data) / "signing.pem"
    pem_file.write_bytes(pem)
    await seed(url, args.count)
    async with sns_host(pem, ca) as base:
        warm, bodies = signed_messages(SnsSigner(key, base + CERT_PATH), args.count)
        port = free_port()
        env = plunkd_env(data, port, PLUNKD_DATABASE_URL=url, PLUNKD_FEEDBACK_SNS_TOPIC_ARNS=TOPIC,
                         PLUNKD_FEEDBACK_SNS_HOST_PATTERN=r"^127\.0\.0\.1:[0-9]+$",
                         PLUNKD_FEEDBACK_SNS_CA_FILE=str(ca_file))
        with server_process(["-m", "plunkd.cli", "serve"], port, env):
            ours, outcomes = await post_all(f"http://127.0.0.1:{port}/webhooks/incoming/sns", warm, bodies,
                                            args.concurrency)
    assert outcomes == {(200, "applied"): args.count}, outcomes
    db = Database(url)
    delivered = await db.read(lambda s: s.execute(select(func.count()).select_from(Event).where(
        Event.name == "email.delivery")).scalar_one())
    await db.dispose()
    assert delivered == args.count, f"{delivered} email.delivery events for {args.count} notifications"
    bare = []
    for database, options in bare_databases(url, data):
        port = free_port()
        with server_process(["-m", "bench.bare_sns_server", str(pem_file), database, str(port), *options], port):
            rate, bare_outcomes = await post_all(f"http://127.0.0.1:{port}/sns", warm, bodies, args.concurrency)
        assert set(bare_outcomes) == {(200, "?")}, bare_outcomes
        bare.append(rate)
    return ours, bare


def main() -> None:
    args = parse_args()
    with temp_dir() as data, bench_database(args.database_url, data) as url:
        ours, (bare, *unsynced) = asyncio.run(measure(data, url, args))
    backend = "PostgreSQL" if args.database_url else "SQLite"
    report(f"[{backend}] SNS Delivery notifications applied ({args.count} messages, {args.concurrency} concurrent)",
           ours, bare, "msg/s", 0.6, *unsynced)


if __name__ == "__main__":
    main()
