"""Inbound mail end to end with swaks: a real `plunkd serve` with inbound SMTP on a loopback port, a domain
verified through the API against the test DNS server (tests/servers.py, which also answers the sender's SPF
and DMARC lookups, so nothing reaches the internet), a route `*@support.example.com`, a webhook endpoint on a
real local receiver (verified with `standardwebhooks`) and a workflow started by `email.received`. swaks
(Debian's package: .ci/run installs it) sends over STARTTLS, verifying the certificate of the test CA, a
message with a binary and a text attachment; everything a user would look at afterwards is checked over
HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import email
import re
import shutil
from email.message import Message
from pathlib import Path

import aiohttp

from tests.servers import free_port, port_open, served_plunkd
from tests.test_cli_and_config import plunkd
from tests.webhook_receiver import Receiver, start_receiver

DOMAIN = "example.com"
SENDER_DOMAIN = "sender.example.org"
ROUTED = f"help@support.{DOMAIN}"
UNROUTED = f"nobody@elsewhere.{DOMAIN}"
BINARY = bytes(range(256)) * 40 + b"\r\n.\r\n\x00\xff"
"""Every byte value, and a lone dot line and a NUL that a careless line-based path would mangle."""
TEXT = "name;amount\r\nAnn;3\r\nBob;\u00e9\r\n".encode()
SWAKS_RCPT_FAILED = 24
"""swaks' exit code for an error in RCPT (its man page, EXIT CODES)."""


class Api:
    """The served API as a client calls it, with the project's secret key."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str) -> None:
        self.session, self.base, self.auth = session, base, {"Authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        async with self.session.request(method, self.base + path, json=body, headers=self.auth) as response:
            return response.status, await response.json()

    async def download(self, path: str) -> tuple[int, str, bytes]:
        async with self.session.get(self.base + path, headers=self.auth) as response:
            return response.status, response.content_type, await response.read()

    async def until(self, what: str, fetch, seconds: float = 20.0):
        """`fetch()` again until it answers something true; fail naming `what` after `seconds`."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not (found := await fetch()):
            assert asyncio.get_running_loop().time() < deadline, f"no {what} after {seconds} s"
            await asyncio.sleep(0.2)
        return found


async def swaks(port: int, to: str, ca_file: Path, *extra: str) -> tuple[int, str]:
    """swaks over STARTTLS (the certificate verified against the test CA) to 127.0.0.1:`port`; its exit code
    and transcript."""
    process = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--port", str(port), "--tls", "--tls-verify", "--tls-ca-path",
        str(ca_file), "--ehlo", f"mx.{SENDER_DOMAIN}", "--from", f"ann@{SENDER_DOMAIN}", "--to", to,
        "--timeout", "30", *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    return process.returncode, output.decode(errors="replace")


def transcript_lines(transcript: str) -> list[str]:
    return [line.removesuffix("\r") for line in transcript.split("\n")]


def sent_message(transcript: str) -> bytes:
    """The message as swaks wrote it after DATA (its ` ~> ` lines inside TLS, up to the lone dot), with the
    wire's CRLF line ends."""
    lines = [line[4:] for line in transcript_lines(transcript) if line.startswith(" ~> ")]
    start, end = lines.index("DATA") + 1, len(lines) - 1 - lines[::-1].index(".")
    return b"".join(line.encode() + b"\r\n" for line in lines[start:end])


def reply_to(transcript: str, command: str) -> str:
    """The server's reply (`<-  `/`<~  `, or `<-* `/`<~* ` when swaks did not expect it) to the first client
    line (` -> `, or ` ~> ` inside TLS) that is `command` or starts with it followed by a space or colon."""
    lines = transcript_lines(transcript)
    sent = next(i for i, line in enumerate(lines)
                if line[:4] in (" -> ", " ~> ") and re.match(rf"{re.escape(command)}([ :]|$)", line[4:]))
    return next(line[4:] for line in lines[sent + 1:] if line[:2] in ("<-", "<~"))


@contextlib.asynccontextmanager
async def local_receiver():
    got = Receiver()
    runner = await start_receiver(got)
    try:
        yield got
    finally:
        await runner.cleanup()


async def test_swaks_mail_with_two_attachments_to_a_route_becomes_event_webhook_run_and_downloads(
        tmp_path, database_url, dns_server, test_ca):
    assert shutil.which("swaks"), "swaks is not installed: apt-get install -y swaks (.ci/run does)"
    cert = test_ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "smtp.pem"))
    test_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "invoice.bin").write_bytes(BINARY)
    (tmp_path / "notes.csv").write_bytes(TEXT)
    dns_server.publish([{"name": SENDER_DOMAIN, "value": "v=spf1 ip4:127.0.0.1 -all"},
                        {"name": f"_dmarc.{SENDER_DOMAIN}", "value": "v=DMARC1; p=none"}])

    env = {"PLUNKD_DATABASE_URL": database_url}
    made = await asyncio.to_thread(plunkd, tmp_path, "project", "create", "--name", "shop", "--from-email",
                                   f"hello@{DOMAIN}", env=env)
    assert made.returncode == 0, made.stderr
    key = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))
    inbound_port = free_port()
    # The relay is off (its default ports 465/587 may be held by a test run beside this one); inbound SMTP
    # offers STARTTLS with the relay's certificate all the same.
    env.update({"PLUNKD_INBOUND_ENABLED": "true", "PLUNKD_INBOUND_PORT": str(inbound_port),
                "PLUNKD_SMTP_ENABLED": "false",
                "PLUNKD_SMTP_CERT_FILE": str(tmp_path / "smtp.pem"), "PLUNKD_SMTP_KEY_FILE": str(tmp_path / "smtp.pem"),
                "PLUNKD_DELIVERY_TRANSPORT": "file", "PLUNKD_DELIVERY_POLL_SECONDS": "0.2",
                "PLUNKD_DNS_NAMESERVERS": "127.0.0.1", "PLUNKD_DNS_PORT": str(dns_server.port),
                "PLUNKD_WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true", "PLUNKD_WEBHOOKS_POLL_SECONDS": "0.2"})

    async with contextlib.AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(local_receiver())
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
        server = await asyncio.to_thread(stack.enter_context, served_plunkd(tmp_path, env))
        stack.push_async_callback(asyncio.to_thread, server.stop)
        await asyncio.to_thread(server.wait, lambda: port_open(inbound_port), 30, "the inbound port")
        api = Api(session, server.base, key)

        status, added = await api.call("POST", "/domains", {"domain": DOMAIN})
        assert status == 201, added
        dns_server.publish(added["data"]["records"])
        status, verified = await api.call("POST", f"/domains/{added['data']['id']}/verify")
        assert status == 200 and verified["data"]["verified"], verified
        status, route = await api.call("POST", "/inbound/routes", {"pattern": f"*@support.{DOMAIN}"})
        assert status == 201, route
        status, hook = await api.call("POST", "/webhooks", {"url": receiver.url(), "events": ["email.received"]})
        assert status == 201, hook
        receiver.secrets.append(hook["data"]["secret"])
        status, workflow = await api.call("POST", "/workflows", {
            "name": "Support", "trigger": {"event": "email.received"},
            "steps": [{"id": "wait", "type": "delay", "minutes": 60, "next": "bye"}, {"id": "bye", "type": "exit"}]})
        assert status == 201, workflow

        code, transcript = await swaks(
            inbound_port, ROUTED, tmp_path / "ca.pem", "--header", "Subject: Order 42",
            "--body", "Hello, the invoice and my notes are attached.",
            "--attach-type", "application/octet-stream", "--attach", f"@{tmp_path / 'invoice.bin'}",
            "--attach-type", "text/csv", "--attach", f"@{tmp_path / 'notes.csv'}")
        assert code == 0, transcript
        assert reply_to(transcript, "STARTTLS").startswith("220 "), transcript
        assert reply_to(transcript, "RCPT TO").startswith("250 "), transcript
        assert reply_to(transcript, ".").startswith("250 "), "the server answered 250 at the end of DATA"
        raw = sent_message(transcript)

        async def received() -> list[dict]:
            status, body = await api.call("GET", "/events?name=email.received&limit=10")
            assert status == 200, body
            return body["data"]["items"]

        [event] = await api.until("the email.received event", received)
        data = event["data"]
        assert data["from"] == f"ann@{SENDER_DOMAIN}" and data["to"] == [ROUTED] and data["subject"] == "Order 42"
        assert data["spf"]["result"] == "pass", data["spf"]
        assert [(a["filename"], a["contentType"], a["size"]) for a in data["attachments"]] == [
            ("invoice.bin", "application/octet-stream", len(BINARY)), ("notes.csv", "text/csv", len(TEXT))]

        status, content_type, body = await api.download(f"/inbound/{data['id']}/raw")
        assert (status, content_type) == (200, "message/rfc822")
        assert body == raw, "the raw message is kept byte for byte as swaks sent it"
        parsed: Message = email.message_from_bytes(body)
        assert [part.get_payload(decode=True) for part in parsed.walk() if part.get_filename()] == [BINARY, TEXT]
        for attachment, content in zip(data["attachments"], (BINARY, TEXT), strict=True):
            status, content_type, body = await api.download(f"/inbound/{data['id']}/attachments/{attachment['id']}")
            assert (status, content_type) == (200, attachment["contentType"])
            assert body == content, f"{attachment['filename']} downloads byte-identical"

        async def runs() -> list[dict]:
            status, body = await api.call("GET", f"/workflows/{workflow['data']['id']}/runs")
            assert status == 200, body
            return body["data"]["items"]

        [run] = await api.until("the workflow run", runs)
        assert run["contactId"] == event["contactId"]

        [request] = await api.until("the webhook", lambda: receiver.wait_for(1, 1.0))
        assert request.verified[hook["data"]["secret"]] is True, "standardwebhooks verifies the signature"
        assert request.payload["type"] == "email.received"
        assert request.payload["data"]["data"]["attachments"] == data["attachments"]

        code, transcript = await swaks(inbound_port, UNROUTED, tmp_path / "ca.pem", "--body", "Anyone there?")
        assert code == SWAKS_RCPT_FAILED, transcript
        assert reply_to(transcript, "RCPT TO").startswith("550 5.1.1 "), transcript
        assert " ~> DATA" not in transcript, "nothing is sent to an unrouted address"
        assert [item["id"] for item in await received()] == [event["id"]]
