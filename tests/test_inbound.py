"""Return paths and inbound SMTP: a domain's MAIL FROM subdomain (records, verification), the VERP envelope
sender the dispatcher delivers with, and the inbound port taking DSNs and ARF reports to VERP addresses (and
nothing else), over real SMTP sessions with STARTTLS on loopback."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import time

import pytest
from sqlalchemy import select, text

from core.config import SmarthostConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import SmtpTransport
from pipeline.links import LinkSigner
from pipeline.return_path import VerpSigner, today
from pipeline.submit import Submission, submit
from storage.models import FOREIGN_MESSAGE_ID, Email, EmailStatus
from tests.inbound_kit import (
    INBOUND_HOST,
    RETURN_PATH,
    deliver,
    email_row,
    send_and_dispatch,
    smtp_client,
    start_inbound,
    suppressed,
)
from tests.sns_fixtures import events
from tests.test_delivery import dispatch_all, settings

NO_SUCH_MAILBOX = (550, b"5.1.1 No such mailbox here")
MALFORMED = (553, b"5.1.3 Error: malformed address")


@pytest.fixture
async def inbound(api, dns_config, dns_server, test_ca, tmp_path, sink):
    env = await start_inbound(api, dns_config, dns_server, test_ca, tmp_path, max_message_bytes=256 * 1024)
    env.sink = sink
    yield env
    await env.inbound.stop()


def smarthost(sink) -> SmarthostConfig:
    return SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=10)


def dsn(verp: str, recipient: str, action: str = "failed", status: str = "5.1.1",
        diagnostic: str = "smtp; 550 5.1.1 <ann@example.org>: Recipient address rejected: User unknown") -> bytes:
    """A DSN in the shape Postfix writes (RFC 3464)."""
    return (f"From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\r\nTo: {verp}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"B1/mx.example.org\"\r\n"
            "\r\nThis is a MIME-encapsulated message.\r\n\r\n--B1/mx.example.org\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\nI'm sorry to have to inform you...\r\n\r\n"
            "--B1/mx.example.org\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.example.org\r\nArrival-Date: Thu, 3 Dec 2026 21:00:00 +0000\r\n\r\n"
            f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
            f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; mail.example.org\r\n"
            f"Diagnostic-Code: {diagnostic}\r\n\r\n"
            "--B1/mx.example.org\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            "From: hello@example.com\r\nSubject: Order 7\r\n\r\n--B1/mx.example.org--\r\n").encode()


def arf(to: str, original_headers: str) -> bytes:
    """A complaint report in RFC 5965's example shape (section B.1)."""
    return (f"From: <abusedesk@example.net>\r\nDate: Thu, 3 Dec 2026 21:00:00 +0000\r\nSubject: FW: Order 7\r\n"
            f"To: <{to}>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=feedback-report;\r\n"
            "\tboundary=\"part1_13d.2e68ed54_boundary\"\r\n"
            "\r\n--part1_13d.2e68ed54_boundary\r\nContent-Type: text/plain; charset=\"US-ASCII\"\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\nThis is an email abuse report for an email message received "
            "from IP 192.0.2.1 on Thu, 3 Dec 2026 20:00:00 +0000.\r\n\r\n"
            "--part1_13d.2e68ed54_boundary\r\nContent-Type: message/feedback-report\r\n\r\n"
            "Feedback-Type: abuse\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
            "Original-Mail-From: <somespammer@example.net>\r\nOriginal-Rcpt-To: <ann@example.org>\r\n"
            "Arrival-Date: Thu, 3 Dec 2026 20:00:00 +0000\r\nReporting-MTA: dns; mail.example.net\r\n"
            "Source-IP: 192.0.2.1\r\n\r\n"
            "--part1_13d.2e68ed54_boundary\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
            f"{original_headers}Subject: Order 7\r\n\r\nShipped\r\n"
            "--part1_13d.2e68ed54_boundary--\r\n").encode()


async def test_a_return_path_publishes_its_mx_and_spf_and_verify_checks_them(api, dns_config, dns_server):
    dns_config.server.inbound_host = INBOUND_HOST
    status, body = await api.call("POST", "/domains", json={"domain": "example.com",
                                                            "returnPath": "Bounces.Example.com"})
    assert status == 201, body
    domain = body["data"]
    assert domain["returnPath"] == RETURN_PATH and domain["returnPathVerified"] is False
    by_purpose = {record["purpose"]: record for record in domain["records"]}
    assert by_purpose["return_path_mx"] == {"purpose": "return_path_mx", "type": "MX", "name": RETURN_PATH,
                                            "value": f"10 {INBOUND_HOST}."}
    assert by_purpose["return_path_spf"] == {"purpose": "return_path_spf", "type": "TXT", "name": RETURN_PATH,
                                             "value": "v=spf1 a mx ~all"}
    dns_server.publish([r for r in domain["records"] if not r["purpose"].startswith("return_path")])
    status, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert status == 200 and body["data"]["verified"] is True and body["data"]["returnPathVerified"] is False
    assert body["data"]["lastCheck"]["returnPath"] is False
    dns_server.mx[RETURN_PATH] = ["10 elsewhere.example."]
    dns_server.records[RETURN_PATH] = ["v=spf1 a mx ~all"]
    status, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert body["data"]["returnPathVerified"] is False, "an MX naming another host is not plunkd's"
    dns_server.mx[RETURN_PATH] = [f"10 {INBOUND_HOST.upper()}."]
    status, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert status == 200 and body["data"]["returnPathVerified"] is True, body


async def test_a_return_path_outside_the_domain_is_refused(api):
    for bad in ("bounces.other.com", "example.com", "-x.example.com", "bounces.example.com\n"):
        status, body = await api.call("POST", "/domains", json={"domain": "example.com", "returnPath": bad})
        assert status == 422, (bad, body)
        error = body["error"]
        assert error["code"] == "VALIDATION_ERROR" and error["errors"][0]["field"] == "returnPath", body
    status, body = await api.call("GET", "/domains")
    assert body["data"]["items"] == [], "nothing was stored"


async def test_mail_goes_out_with_a_verp_envelope_sender_once_the_return_path_is_verified(inbound):
    email_id = await send_and_dispatch(inbound, smarthost(inbound.sink))
    [delivered] = inbound.sink.messages
    local_part, _, domain = delivered.mail_from.partition("@")
    assert domain == RETURN_PATH and local_part.startswith("b+") and len(local_part) <= 64
    assert inbound.verp.email_id(delivered.mail_from) == email_id
    assert (await email_row(inbound.api, email_id)).envelope_sender == delivered.mail_from, \
        "the email's Return-Path (its dashboard page) is the address it went out with"
    assert delivered.rcpt_tos == ["ann@example.org"]
    assert b" d=example.com;" in delivered.original_content.split(b"\r\n\r\n")[0], "DKIM signs for the From domain"


async def test_without_a_verified_return_path_the_from_address_stays_the_envelope_sender(api, sender, sink):
    status, body = await api.call("POST", "/v1/send", json={"to": "ann@example.org", "subject": "Hi", "body": "Hi"})
    assert status == 200, body
    transport = SmtpTransport(smarthost(sink))
    verp = VerpSigner(LinkSigner(b"k" * 32, "http://127.0.0.1"), 30)
    await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings(), verp=verp))
    await transport.close()
    assert [m.mail_from for m in sink.messages] == ["hello@example.com"]


async def test_relayed_mail_keeps_its_mail_from_unless_the_project_chose_verp(inbound):
    raw = b"From: hello@example.com\r\nTo: ann@example.org\r\nSubject: Order 7\r\n\r\nShipped\r\n"
    api = inbound.api

    def queue(session):
        return submit(session, Submission(api.project_id, "smtp", "hello@example.com", ["ann@example.org"], raw=raw,
                                          envelope_sender="orders@example.com"))[0].email_id

    kept = await api.db.write(queue)
    transport = SmtpTransport(smarthost(inbound.sink))
    await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings(), verp=inbound.verp))
    status, body = await api.call("GET", "/settings/return-path")
    assert status == 200 and body["data"] == {"verpRelay": False}, body
    for bad in ({"verpRelay": "yes"}, {}, {"verpRelay": None}):
        status, body = await api.call("PATCH", "/settings/return-path", json=bad)
        assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", (bad, body)
    anonymous = await api.client.patch("/settings/return-path", json={"verpRelay": True})
    assert anonymous.status == 401
    status, body = await api.call("PATCH", "/settings/return-path", json={"verpRelay": True})
    assert status == 200 and body["data"] == {"verpRelay": True}, body
    chosen = await api.db.write(queue)
    await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings(), verp=inbound.verp))
    await transport.close()
    first, second = inbound.sink.messages
    assert first.mail_from == "orders@example.com"
    assert inbound.verp.email_id(second.mail_from) == chosen != kept


async def test_rcpt_takes_only_a_valid_verp_address_and_refuses_the_relay_tricks(inbound):
    email_id = await send_and_dispatch(inbound, smarthost(inbound.sink))
    verp = inbound.sink.messages[0].mail_from
    token = verp.partition("@")[0].removeprefix("b+")
    payload, _, signature = token.partition(".")
    other_domain = inbound.verp.address(email_id, "bounces.other.com").replace("bounces.other.com", RETURN_PATH)
    expired = inbound.verp.address(email_id, RETURN_PATH, day=today() - 31)
    refused = [
        f"b+{payload}.{'A' * len(signature)}@{RETURN_PATH}",  # forged signature
        f"b+{payload}.{signature[:-2]}@{RETURN_PATH}",  # truncated
        f"b+{payload}@{RETURN_PATH}",  # no signature
        verp.upper(),  # case changed: the token is case-sensitive
        other_domain,  # a token made for another domain
        expired,
        f"b+{token}%evil.example@{RETURN_PATH}",  # percent hack
        f"victim%evil.example@{RETURN_PATH}",
        f"b+{token}@evil.example",  # the token on another domain
        f"postmaster@{RETURN_PATH}",
        "ann@example.org",
    ]
    def session() -> None:
        with smtp_client(inbound) as client:
            client.mail("")
            for address in refused:
                assert client.rcpt(address) == NO_SUCH_MAILBOX, address
            for raw_argument in (f"TO:<@{RETURN_PATH}:victim@evil.example>",
                                 f"TO:<evil.example!b+{token}@{RETURN_PATH}>",
                                 f'TO:<"victim@evil.example"@{RETURN_PATH}>'):
                assert client.docmd("RCPT", raw_argument) == NO_SUCH_MAILBOX, raw_argument
            assert client.rcpt(f"{verp}.") == MALFORMED, "a trailing dot is not an address (RFC 5321)"
            assert client.rcpt(verp) == (250, b"2.1.5 OK")
            assert client.docmd("RCPT", f'TO:<"b+{token}"@{RETURN_PATH}>') == (250, b"2.1.5 OK"), \
                "quoting a local part that needs no quotes names the same mailbox (RFC 5321 4.1.2)"
            assert client.rcpt(verp.replace(RETURN_PATH, RETURN_PATH.upper())) == (250, b"2.1.5 OK"), \
                "the domain part of an address has no case"
            assert client.docmd("AUTH", "PLAIN AHBsdW5rAHNrXw==") == (502, b"5.5.1 AUTH is not offered here")

    await asyncio.to_thread(session)
    assert (await email_row(inbound.api, email_id)).status == EmailStatus.SENT


async def test_a_permanent_dsn_to_the_verp_address_is_a_hard_bounce(inbound):
    email_id = await send_and_dispatch(inbound, smarthost(inbound.sink))
    verp = inbound.sink.messages[0].mail_from
    reply = await asyncio.to_thread(deliver, inbound, verp, dsn(verp, "ann@example.org"))
    assert reply == (250, b"2.0.0 OK")
    row = await email_row(inbound.api, email_id)
    assert row.status == EmailStatus.BOUNCED
    [bounce] = await events(inbound.api, "email.bounce")
    data = bounce["data"]
    assert (data["via"], data["bounceType"], data["hard"], data["status"], data["action"]) == (
        "dsn", "Permanent", True, "5.1.1", "failed")
    assert data["diagnosticCode"] == "550 5.1.1 <ann@example.org>: Recipient address rejected: User unknown"
    assert data["reportingMta"] == "mx.example.org" and data["remoteMta"] == "mail.example.org"
    assert list(await suppressed(inbound.api)) == ["ann@example.org"]
    [unsubscribed] = await events(inbound.api, "contact.unsubscribed")
    again = await asyncio.to_thread(deliver, inbound, verp, dsn(verp, "ann@example.org"))
    assert again == (250, b"2.0.0 OK")
    assert len(await events(inbound.api, "email.bounce")) == 1, "the same DSN twice is one bounce"


async def test_a_delayed_dsn_is_a_soft_bounce_and_the_address_stays(inbound):
    email_id = await send_and_dispatch(inbound, smarthost(inbound.sink))
    verp = inbound.sink.messages[0].mail_from
    report = dsn(verp, "ann@example.org", action="delayed", status="4.2.2", diagnostic="smtp; 452 4.2.2 Mailbox full")
    assert await asyncio.to_thread(deliver, inbound, verp, report) == (250, b"2.0.0 OK")
    [bounce] = await events(inbound.api, "email.bounce")
    assert (bounce["data"]["bounceType"], bounce["data"]["hard"], bounce["data"]["status"]) == ("Transient", False,
                                                                                                "4.2.2")
    assert (await email_row(inbound.api, email_id)).status == EmailStatus.SENT
    assert await suppressed(inbound.api) == {}


async def test_an_auto_reply_to_the_verp_address_is_dropped(inbound):
    email_id = await send_and_dispatch(inbound, smarthost(inbound.sink))
    verp = inbound.sink.messages[0].mail_from
    reply = (b"From: ann@example.org\r\nTo: " + verp.encode() + b"\r\nSubject: Out of office\r\n"
             b"Auto-Submitted: auto-replied\r\n\r\nI am away until Monday.\r\n")
    assert await asyncio.to_thread(deliver, inbound, verp, reply) == (250, b"2.0.0 OK")
    assert await events(inbound.api, "email.bounce") == [] and await events(inbound.api, "email.complaint") == []
    assert (await email_row(inbound.api, email_id)).status == EmailStatus.SENT


async def test_an_arf_report_is_a_complaint_matched_by_the_verp_address(inbound):
    email_id = await send_and_dispatch(inbound, smarthost(inbound.sink))
    verp = inbound.sink.messages[0].mail_from
    report = arf(verp, "From: hello@example.com\r\nTo: ann@example.org\r\n")
    assert await asyncio.to_thread(deliver, inbound, verp, report) == (250, b"2.0.0 OK")
    assert (await email_row(inbound.api, email_id)).status == EmailStatus.COMPLAINED
    [complaint] = await events(inbound.api, "email.complaint")
    assert complaint["data"]["via"] == "arf" and complaint["data"]["complaintFeedbackType"] == "abuse"
    assert complaint["data"]["userAgent"] == "SomeGenerator/1.0" and complaint["data"]["sourceIp"] == "192.0.2.1"
    assert list(await suppressed(inbound.api)) == ["ann@example.org"]
    assert len(await events(inbound.api, "contact.unsubscribed")) == 1


async def test_an_arf_report_names_its_email_by_the_original_message_id(inbound):
    first = await send_and_dispatch(inbound, smarthost(inbound.sink), "ann@example.org")
    second = await send_and_dispatch(inbound, smarthost(inbound.sink), "bob@example.org")
    verp_of_first = inbound.sink.messages[0].mail_from
    message_id = (await email_row(inbound.api, second)).message_id
    report = arf(verp_of_first, f"From: hello@example.com\r\nTo: bob@example.org\r\nMessage-ID: {message_id}\r\n")
    assert await asyncio.to_thread(deliver, inbound, verp_of_first, report) == (250, b"2.0.0 OK")
    assert (await email_row(inbound.api, second)).status == EmailStatus.COMPLAINED
    assert (await email_row(inbound.api, first)).status == EmailStatus.SENT
    assert list(await suppressed(inbound.api)) == ["bob@example.org"]


async def test_an_arf_report_names_relayed_mail_by_the_message_id_its_client_gave_it(inbound):
    """A Message-ID plunkd did not make is found through ix_emails_message_id, which holds only those (the ones it
    makes hold their email's id): the report, sent to another email's VERP address, is about the relayed one."""
    api = inbound.api
    first = await send_and_dispatch(inbound, smarthost(inbound.sink), "ann@example.org")
    headers = "From: hello@example.com\r\nTo: bob@example.org\r\nMessage-ID: <order-7@shop.example>\r\n"
    raw = (headers + "\r\nShipped\r\n").encode()
    relayed = await api.db.write(lambda s: submit(s, Submission(api.project_id, "smtp", "hello@example.com",
                                                                ["bob@example.org"], raw=raw))[0].email_id)
    transport = SmtpTransport(smarthost(inbound.sink))
    await dispatch_all(Dispatcher(api.db, transport, TokenBucket(0), settings(), verp=inbound.verp))
    await transport.close()
    assert (await email_row(api, relayed)).message_id == "<order-7@shop.example>"
    verp_of_first = inbound.sink.messages[0].mail_from
    report = arf(verp_of_first, headers)
    assert await asyncio.to_thread(deliver, inbound, verp_of_first, report) == (250, b"2.0.0 OK")
    assert (await email_row(api, relayed)).status == EmailStatus.COMPLAINED
    assert (await email_row(api, first)).status == EmailStatus.SENT

    def served_by_the_index(session) -> list[str]:
        """The lookup's query run on ix_emails_message_id alone: PostgreSQL's plan with sequential scans off, or
        SQLite's `INDEXED BY` (an error when the partial index cannot serve the query)."""
        dialect = session.get_bind().dialect
        query = str(select(Email.id).where(Email.project_id == api.project_id,
                                           Email.message_id == "<order-7@shop.example>", text(FOREIGN_MESSAGE_ID))
                    .compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        if dialect.name == "postgresql":
            session.execute(text("SET LOCAL enable_seqscan = off"))
            return list(session.execute(text("EXPLAIN " + query)).scalars())
        return list(session.execute(text(query.replace("FROM emails", "FROM emails INDEXED BY ix_emails_message_id")))
                    .scalars())

    served = await api.db.read(served_by_the_index)
    assert served == [relayed] if not api.db.is_postgres else "ix_emails_message_id" in " ".join(served), served


async def test_a_report_over_the_size_limit_is_refused_and_nothing_recorded(inbound):
    email_id = await send_and_dispatch(inbound, smarthost(inbound.sink))
    verp = inbound.sink.messages[0].mail_from
    big = dsn(verp, "ann@example.org").replace(b"I'm sorry", (b"x" * 70 + b"\r\n") * 4000)

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtp_client(inbound) as client:
            declared = client.mail("", [f"SIZE={len(big)}"])
            client.rset()
            client.mail("")
            client.rcpt(verp)
            return declared, client.data(big)

    declared, sent = await asyncio.to_thread(session)
    assert declared == sent == (552, b"5.3.4 Message size exceeds fixed maximum")
    assert (await email_row(inbound.api, email_id)).status == EmailStatus.SENT
    assert await events(inbound.api, "email.bounce") == []


async def test_a_dsn_that_overtakes_the_record_of_its_send_is_deferred(inbound):
    status, body = await inbound.api.call("POST", "/v1/send", json={"to": "ann@example.org", "subject": "Hi",
                                                                    "body": "Hi"})
    email_id = body["data"]["emails"][0]["email"]
    verp = inbound.verp.address(email_id, RETURN_PATH)
    reply = await asyncio.to_thread(deliver, inbound, verp, dsn(verp, "ann@example.org"))
    assert reply == (451, b"4.3.0 The email this report is about is still being sent; try again later")
    assert (await email_row(inbound.api, email_id)).status == EmailStatus.QUEUED
    assert await suppressed(inbound.api) == {}


def test_domain_add_prints_the_return_paths_mx_and_spf(tmp_path, database_url):
    from tests.test_cli_and_config import failure_lines, plunkd

    env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_SERVER_INBOUND_HOST": INBOUND_HOST}
    assert plunkd(tmp_path, "project", "create", "--name", "shop", "--from-email", "hi@shop.example",
                  env=env).returncode == 0
    added = plunkd(tmp_path, "domain", "add", "shop.example", "--project", "shop", "--return-path",
                   "bounces.shop.example", env=env)
    assert added.returncode == 0, added.stderr
    assert "return path bounces.shop.example: NOT verified" in added.stdout
    assert f"return_path_mx MX bounces.shop.example\n        10 {INBOUND_HOST}." in added.stdout
    assert "return_path_spf TXT bounces.shop.example\n        v=spf1 a mx ~all" in added.stdout
    refused = plunkd(tmp_path, "domain", "add", "other.example", "--project", "shop", "--return-path",
                     "bounces.shop.example", env=env)
    assert refused.returncode == 1 and failure_lines(refused.stderr) == [
        "plunkd: The return path 'bounces.shop.example' is not a subdomain of other.example"], \
        refused.stderr


def test_plunkd_serve_takes_inbound_mail_on_its_port_with_starttls(tmp_path, database_url):
    """The served app's own wiring: inbound.enabled starts the listener (STARTTLS offered with the relay's
    certificate, no AUTH) and refuses an address that is no VERP address."""
    from tests.servers import free_port, port_open, served_plunkd

    inbound_port = free_port()
    env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_INBOUND_ENABLED": "true",
           "PLUNKD_INBOUND_PORT": str(inbound_port), "PLUNKD_DELIVERY_ENABLED": "false",
           "PLUNKD_SMTP_ENABLED": "false"}  # the relay's default 465/587 may be held by a test run beside this one
    with served_plunkd(tmp_path, env) as server:
        server.wait(lambda: port_open(inbound_port), 30, "the inbound port")
        with smtplib.SMTP("127.0.0.1", inbound_port, timeout=30) as client:
            client.ehlo("mta.example.net")
            assert client.has_extn("starttls") and not client.has_extn("auth")
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo("mta.example.net")
            client.mail("")
            assert client.rcpt(f"b+forged.token@{RETURN_PATH}") == NO_SUCH_MAILBOX


async def test_inbound_sessions_are_capped_and_bounded_in_time(api, dns_config, dns_server, test_ca, tmp_path):
    env = await start_inbound(api, dns_config, dns_server, test_ca, tmp_path, max_sessions_per_ip=1,
                              session_lifetime_seconds=1.5, idle_timeout_seconds=30)

    def sessions() -> tuple[bytes, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", env.port, timeout=30) as first:
            first.ehlo("mta.example.net")
            with socket.create_connection(("127.0.0.1", env.port), timeout=10) as second:
                refused = second.recv(200)
            time.sleep(2.0)
            return refused, first.getreply()

    try:
        refused, closed = await asyncio.to_thread(sessions)
    finally:
        await env.inbound.stop()
    assert refused == b"421 4.7.0 Too many connections, try again later\r\n"
    assert closed == (421, b"4.4.2 localhost Error: session longer than 1.5 s; closing connection")
