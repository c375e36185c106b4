"""HTTP → outbox → dispatcher → transport, for the file, smtp (aiosmtpd sink) and ses (moto server)
transports; DKIM verifies; retries, permanent failures, leases, suppression and the rate."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import time
from datetime import timedelta
from email import policy

import dkim
import pytest
from sqlalchemy import update

from core.config import DeliveryConfig, SesConfig, SmarthostConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport, SmtpTransport
from storage import emails as email_store
from storage import events as event_store
from storage.models import OutboxItem, utcnow
from tests.conftest import add_verified_domain, counted_commits
from tests.servers import SinkHandler, start_sink


def settings(**overrides) -> DeliveryConfig:
    cfg = DeliveryConfig(poll_seconds=0.05, retry_base_seconds=0.01, lease_seconds=30)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


async def dispatch_all(dispatcher: Dispatcher, rounds: int = 20) -> None:
    for _ in range(rounds):
        handled = await dispatcher.run_once()
        await dispatcher.drain()
        if not handled:
            return


def dns_for(domain_json):
    records = {r["name"]: r["value"] for r in domain_json["records"]}

    def lookup(name, timeout=5):
        return records.get(name.decode().rstrip("."), "").encode() or None

    return lookup


async def send(api, **payload):
    payload = {"to": "ann@example.org", "subject": "Hello", "body": "<p>Hi</p>", **payload}
    status, body = await api.call("POST", "/v1/send", json=payload)
    assert status == 200, body
    return body["data"]["emails"]


async def email_rows(api):
    return {row.recipient: row for row in await api.db.read(email_store.list_emails, api.project_id)}


async def test_mail_queued_while_a_claim_finds_nothing_is_sent_at_once(api, sender, tmp_path):
    """The wake-up of mail committed while the dispatcher's claim was finding nothing (it arrives before
    the empty claim returns) is kept: the mail goes out at once, not at the next poll (30 s here)."""
    folder = tmp_path / "outbox"
    dispatcher = Dispatcher(api.db, FileTransport(folder), TokenBucket(0), settings(poll_seconds=30))
    claim = dispatcher.run_once
    queued_during_claim = asyncio.Event()

    async def claim_then_queue() -> int:
        handled = await claim()
        if not handled and not queued_during_claim.is_set():
            await send(api)
            dispatcher.wake()
            queued_during_claim.set()
        return handled

    dispatcher.run_once = claim_then_queue  # type: ignore[method-assign]
    running = asyncio.create_task(dispatcher.run())
    try:
        await asyncio.wait_for(queued_during_claim.wait(), 10)
        deadline = time.monotonic() + 5
        while not list(folder.glob("*.eml")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(list(folder.glob("*.eml"))) == 1, "the mail waits for the next poll: its wake-up was lost"
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_wake_ups_of_a_burst_share_one_claim(api, sender, tmp_path):
    """One session sending back to back wakes the dispatcher once per message. Those wake-ups share a
    claim (`delivery.dispatcher.WAKE_GAP_SECONDS`) instead of each paying a claim transaction, most of them
    empty: 30 wake-ups 2 ms apart cost at most 4 claims, and all 30 emails are sent."""
    for _ in range(30):
        await send(api)
    folder = tmp_path / "outbox"
    dispatcher = Dispatcher(api.db, FileTransport(folder), TokenBucket(0), settings(poll_seconds=30))
    claim = dispatcher.run_once
    claims = []

    async def counted_claim() -> int:
        claims.append(await claim())
        return claims[-1]

    dispatcher.run_once = counted_claim  # type: ignore[method-assign]
    running = asyncio.create_task(dispatcher.run())
    try:
        for _ in range(30):
            dispatcher.wake()
            await asyncio.sleep(0.002)
        deadline = time.monotonic() + 10
        while len(list(folder.glob("*.eml"))) < 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert len(list(folder.glob("*.eml"))) == 30
    assert sum(claims) == 30
    assert len(claims) <= 4, f"{len(claims)} claims for 30 wake-ups: {claims}"


async def test_file_transport_end_to_end(api, sender, tmp_path):
    pdf = bytes(range(256)) * 100
    sent = await send(api, to=["ann@example.org", "bob@example.org"], attachments=[
        {"filename": "r.pdf", "content": base64.b64encode(pdf).decode(), "contentType": "application/pdf"}])
    folder = tmp_path / "outbox"
    await dispatch_all(Dispatcher(api.db, FileTransport(folder), TokenBucket(0), settings()))
    files = sorted(folder.glob("*.eml"))
    assert len(files) == 2
    rows = await email_rows(api)
    for path in files:
        raw = path.read_bytes()
        assert raw.startswith(b"Return-Path: <hello@example.com>\r\nDKIM-Signature: ")
        assert dkim.verify(raw, dnsfunc=dns_for(sender)), "signature verifies against the published key"
        msg = email.message_from_bytes(raw, policy=policy.default)
        assert msg["Message-ID"] and msg["Date"]
        attachment = next(msg.iter_attachments())
        assert attachment.get_content() == pdf, "attachment arrives byte-identical"
        row = rows[msg["To"]]
        assert row.status == "SENT" and row.transport_id == path.stem and row.message_id == msg["Message-ID"]
    assert await api.db.read(email_store.outbox_rows) == []
    page = await api.db.read(event_store.list_events, api.project_id, 10, None, "email.sent")
    assert {e.email_id for e in page.items} == {e["email"] for e in sent}


async def test_smtp_transport_into_sink(api, sender, sink):
    await send(api, to=["ann@example.org"], headers={"X-Order": "7"})
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=5))
    await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings()))
    assert len(sink.messages) == 1
    envelope = sink.messages[0]
    assert envelope.mail_from == "hello@example.com" and envelope.rcpt_tos == ["ann@example.org"]
    assert dkim.verify(envelope.original_content, dnsfunc=dns_for(sender))
    row = (await email_rows(api))["ann@example.org"]
    assert row.status == "SENT" and row.transport_id == "SINK1"


async def test_transient_smtp_failure_is_retried_then_sent(api, sender, sink):
    await send(api)
    sink.reply = "451 4.3.0 try again later"
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=5))
    dispatcher = Dispatcher(api.db, transport, TokenBucket(0), settings(retry_base_seconds=0.2))
    await dispatcher.run_once()
    await dispatcher.drain()
    outbox = await api.db.read(email_store.outbox_rows)
    assert len(outbox) == 1 and outbox[0].attempts == 1 and outbox[0].last_error.startswith("451")
    assert (await email_rows(api))["ann@example.org"].status == "QUEUED"
    sink.reply = "250 2.0.0 OK queued as SINK{n}"
    await asyncio.sleep(0.25)
    await dispatch_all(dispatcher)
    assert (await email_rows(api))["ann@example.org"].status == "SENT"
    assert len(sink.messages) == 1


class RefusingOnceSink(SinkHandler):
    """A smarthost that answers the first DATA with a transient refusal and takes the next one; it keeps
    what it was given both times."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.attempts.append(envelope.original_content)
        if len(self.attempts) == 1:
            return "451 4.3.0 try again later"
        return await super().handle_DATA(server, session, envelope)


async def test_a_retried_email_goes_out_with_the_message_id_it_was_accepted_with(api, sender):
    [queued] = await send(api)
    accepted = (await email_rows(api))["ann@example.org"].message_id
    assert accepted == f"<{queued['email']}@example.com>", "given once, when the email is accepted"
    handler = RefusingOnceSink()
    server, port = await start_sink(handler)
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=port, timeout_seconds=5))
    dispatcher = Dispatcher(api.db, transport, TokenBucket(0), settings(retry_base_seconds=0.1))
    try:
        assert await dispatcher.run_once() == 1  # one round: on a slow machine a second may reach the retry
        await dispatcher.drain()
        assert len(handler.attempts) == 1 and (await email_rows(api))["ann@example.org"].status == "QUEUED"
        await asyncio.sleep(0.15)
        await dispatch_all(dispatcher)
    finally:
        await transport.close()
        server.close()
    assert len(handler.attempts) == 2 and len(handler.messages) == 1
    ids = [email.message_from_bytes(raw, policy=policy.compat32)["Message-ID"] for raw in handler.attempts]
    assert ids == [accepted, accepted], "the receiver can tell the second copy from a new email"
    row = (await email_rows(api))["ann@example.org"]
    assert row.status == "SENT" and row.message_id == accepted


async def test_a_sender_domain_near_the_longest_gets_message_ids_that_fit_the_record(api, dns_config, dns_server,
                                                                                   tmp_path):
    """A domain name may be 253 characters; <email id@domain> would then overflow `emails.message_id`
    (255), which PostgreSQL refuses: the generated id keeps the domain's right end instead."""
    long_domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 38]) + ".com"
    await add_verified_domain(api, dns_server, long_domain)
    [queued] = await send(api, **{"from": f"hello@{long_domain}"})
    folder = tmp_path / "out"
    await dispatch_all(Dispatcher(api.db, FileTransport(folder), TokenBucket(0), settings()))
    [path] = folder.glob("*.eml")
    row = (await email_rows(api))["ann@example.org"]
    message_id = email.message_from_bytes(path.read_bytes(), policy=policy.compat32)["Message-ID"]
    assert row.status == "SENT" and message_id == row.message_id and len(message_id) == 255
    assert message_id.startswith(f"<{queued['email']}@") and message_id.endswith(long_domain[-200:] + ">")


async def test_permanent_refusal_at_data_is_a_bounce(api, sender, sink):
    """(tests/test_feedback_smtp.py: the bounce's event, suppression and unsubscribe through the wiring.)"""
    await send(api)
    sink.reply = "550 5.1.1 no such user"
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=5))
    await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings()))
    row = (await email_rows(api))["ann@example.org"]
    assert row.status == "BOUNCED" and row.error == "550 5.1.1 no such user"
    assert await api.db.read(email_store.outbox_rows) == []


async def test_unreachable_smarthost_gives_up_after_max_attempts(api, sender):
    from tests.servers import free_port

    await send(api)
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=free_port(), timeout_seconds=2))
    dispatcher = Dispatcher(api.db, transport, TokenBucket(0), settings(max_attempts=3, retry_base_seconds=0.01))
    for _ in range(6):
        await dispatch_all(dispatcher)
        await asyncio.sleep(0.1)
    row = (await email_rows(api))["ann@example.org"]
    assert row.status == "FAILED" and row.error.startswith("gave up after 3 attempts")


async def test_suppressed_recipient_is_skipped(api, sender, tmp_path):
    await api.db.write(lambda s: email_store.add_suppression(s, api.project_id, "ann@example.org", "bounce"))
    await send(api)
    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "out"), TokenBucket(0), settings()))
    assert list((tmp_path / "out").glob("*.eml")) == []
    assert (await email_rows(api))["ann@example.org"].status == "SUPPRESSED"


async def test_dispatcher_killed_after_claim_is_sent_after_the_lease(api, sender, tmp_path):
    """The lease is a minute, and its end comes by moving the row's lease (its `due_at`) into the past rather than
    by sleeping: with a lease of half a second, a loaded machine let it run out before the survivor's first try."""
    await send(api)
    folder = tmp_path / "out"
    claimed = await api.db.write(lambda s: email_store.claim_due(s, "dead", 10, 60, api.db.is_postgres))
    assert len(claimed) == 1, "the first dispatcher took the email and then died before sending"
    survivor = Dispatcher(api.db, FileTransport(folder), TokenBucket(0), settings(), worker="alive")
    assert await survivor.run_once() == 0, "not while the lease holds"
    outbox = OutboxItem.__table__
    await api.db.write(lambda s: s.execute(update(outbox).where(outbox.c.claimed_by == "dead").values(
        due_at=utcnow() - timedelta(seconds=1))))
    await dispatch_all(survivor)
    assert len(list(folder.glob("*.eml"))) == 1, "sent exactly once, after the lease"
    assert (await email_rows(api))["ann@example.org"].status == "SENT"


async def test_token_bucket_keeps_its_rate():
    bucket = TokenBucket(100)
    stamps = []

    async def sender():
        for _ in range(50):
            await bucket.acquire()
            stamps.append(time.monotonic())

    await asyncio.gather(sender(), sender(), sender())
    stamps.sort()
    elapsed = stamps[-1] - stamps[0]
    assert elapsed >= (150 - 1) / 100 - 0.005, "never faster than the rate, shared by every caller"
    # Lag of the event loop on a loaded machine (tests run beside each other) adds to each wait it exceeds a
    # slot by; a bucket that kept a fraction of the rate would still fail here.
    assert elapsed < 149 / 100 * 1.3, "and not much slower"
    await asyncio.sleep(0.5)
    idle_start = time.monotonic()
    for _ in range(5):
        await bucket.acquire()
    assert time.monotonic() - idle_start >= 4 / 100 - 0.005, "an idle period banks no burst"


async def test_ses_transport_against_moto(api, sender, moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    from delivery.ses import SesTransport, ses_identity_verified

    ses_settings = SesConfig(region="us-east-1", endpoint_url=moto_server.url)
    assert await ses_identity_verified(ses_settings, "example.com") is True
    await send(api, to=["ann@example.org", "bob@example.org"])
    from pipeline.submit import Submission, submit

    relayed = b"From: hello@example.com\r\nTo: carl@example.org\r\nSubject: Relayed\r\n\r\nHi\r\n"
    await api.db.write(lambda s: submit(s, Submission(api.project_id, "smtp", "hello@example.com",
                                                      ["carl@example.org"], raw=relayed,
                                                      envelope_sender="bounce+abc@example.com")))
    transport = SesTransport(ses_settings)
    assert await transport.max_send_rate() == 1.0, "moto's default SES quota"
    requests = []
    (await transport._sesv2()).meta.events.register(
        "provide-client-params.sesv2.SendEmail", lambda params, **_: requests.append(dict(params)))
    await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings()))
    await transport.close()
    rows = await email_rows(api)
    assert {r.status for r in rows.values()} == {"SENT"}
    assert all(r.transport_id for r in rows.values())
    forwarding = {r["Destination"]["ToAddresses"][0]: r.get("FeedbackForwardingEmailAddress") for r in requests}
    assert forwarding == {"ann@example.org": None, "bob@example.org": None,
                          "carl@example.org": "bounce+abc@example.com"}, "SES forwards bounces to the MAIL FROM"
    assert {r["FromEmailAddress"] for r in requests} == {"hello@example.com"}
    import aioboto3

    async with aioboto3.Session().client("ses", region_name="us-east-1", endpoint_url=moto_server.url) as ses:
        quota = await ses.get_send_quota()
    assert quota["SentLast24Hours"] >= 3, "SES received the raw messages"


@pytest.mark.parametrize("bad", [b"", b"not an email at all"])
async def test_dispatch_handles_odd_stored_content(api, sender, tmp_path, bad):
    from pipeline.submit import Submission, submit

    await api.db.write(lambda s: submit(s, Submission(api.project_id, "smtp", "hello@example.com",
                                                      ["ann@example.org"], raw=bad)))
    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "o"), TokenBucket(0), settings()))
    row = (await email_rows(api))["ann@example.org"]
    assert row.status == "FAILED" and row.error.startswith("cannot DKIM-sign the message: ")
    assert await api.db.read(email_store.outbox_rows) == [], "not retried forever"


async def test_dispatch_fails_an_email_whose_domain_key_cannot_sign(api, sender, tmp_path):
    from storage.domains import get_domain

    def break_key(session) -> None:
        domain = get_domain(session, api.project_id, "example.com")
        assert domain is not None
        domain.dkim_private_key = "-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n"

    await api.db.write(break_key)
    await send(api)
    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "o"), TokenBucket(0), settings()))
    row = (await email_rows(api))["ann@example.org"]
    assert row.status == "FAILED" and row.error.startswith("cannot DKIM-sign the message: unreadable DKIM private key")
    assert await api.db.read(email_store.outbox_rows) == [], "not retried forever"
    assert not list(tmp_path.glob("o/*.eml"))


async def test_served_app_dispatches_on_its_own(aiohttp_client, dns_config, dns_server):
    """The app as `plunkd serve` builds it: send over HTTP, the built-in dispatcher writes the .eml."""
    from api.context import DB
    from pipeline.projects import create_project
    from plunkd.app import create_app
    from tests.conftest import Api, add_verified_domain

    dns_config.delivery.enabled = True
    dns_config.delivery.poll_seconds = 60.0  # far above what a stalled CI machine adds to one send
    app = create_app(dns_config)
    client = await aiohttp_client(app)
    issued = await app[DB].write(lambda s: create_project(s, "live", "hello@example.com", "Live"))
    api = Api(client, app[DB], issued.project.id, issued.secret_key, issued.public_key)
    domain = await add_verified_domain(api, dns_server)
    started = time.monotonic()
    await send(api)
    folder = dns_config.outbox_path
    while not list(folder.glob("*.eml")) and time.monotonic() - started < 15:
        await asyncio.sleep(0.02)
    files = list(folder.glob("*.eml"))
    assert len(files) == 1 and time.monotonic() - started < 15, "woken by the send, not by the 60 s poll"
    assert dkim.verify(files[0].read_bytes(), dnsfunc=dns_for(domain))


async def test_outcomes_sent_at_a_set_rate_share_transactions(api, sender, tmp_path):
    """At 200 messages a second each send's outcome came alone, in a transaction of its own: fourteen commits for
    twelve emails and their claims. Sent outcomes now wait up to `OUTCOME_LINGER_SECONDS`, or for half of
    `concurrency`, and commit together (five commits when measured, also beside two busy processes). Every email
    is still marked SENT, with its file and its event."""
    await send(api, to=[f"reader{i}@example.org" for i in range(12)])
    dispatcher = Dispatcher(api.db, FileTransport(tmp_path / "out"), TokenBucket(200), settings(concurrency=8))
    with counted_commits(api.db) as commits:
        await dispatch_all(dispatcher)
    rows = await email_rows(api)
    assert sorted(row.status for row in rows.values()) == ["SENT"] * 12
    assert len(list((tmp_path / "out").glob("*.eml"))) == 12
    page = await api.db.read(event_store.list_events, api.project_id, 50, None, "email.sent")
    assert len(page.items) == 12
    assert len(commits) <= 8, f"{len(commits)} commits for the claims and twelve outcomes"
