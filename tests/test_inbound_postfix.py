"""A bounce after acceptance, end to end with a real MTA: plunkd sends through a private Postfix from Debian
(started here in a temp folder with `bench.postfix`'s helpers, never the system's) that accepts the recipient,
then fails to deliver it (example.org's next hop, an aiosmtpd on loopback, refuses the message with a 550),
and sends its own DSN to the VERP envelope sender; Postfix relays that DSN (relayhost) to plunkd's inbound
port, and plunkd records the bounce against the right email. Postfix must be installed (.ci/run installs
it): if it is missing this test fails."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from bench.postfix import SMTP_CLIENT_SERVICES, SMTP_USER, private_postfix, self_signed_pair
from core.config import SmarthostConfig
from storage.models import EmailStatus
from tests.inbound_kit import email_row, send_and_dispatch, start_inbound, suppressed
from tests.servers import SinkHandler, free_port, start_sink
from tests.sns_fixtures import events

UNDELIVERABLE = "550 5.1.1 <ann@example.org>: mailbox unavailable (next hop)"


def bouncing_postfix(inbound_port: int, next_hop_port: int) -> str:
    """main.cf: mail for example.org is accepted, then refused by its next hop (`next_hop_port`); everything
    else, the DSN to the VERP address included, goes over SMTP to plunkd's inbound port. Retries come after a
    second (a DSN that overtakes the record of its send gets 451 and comes back)."""
    return f"""\
transport_maps = inline:{{ example.org=smtp:[127.0.0.1]:{next_hop_port} }}
relayhost = [127.0.0.1]:{inbound_port}
default_transport = smtp
relay_transport = smtp
smtp_tls_security_level = may
smtp_dns_support_level = disabled
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


async def test_a_postfix_dsn_after_acceptance_becomes_the_emails_bounce(api, dns_config, dns_server, test_ca,
                                                                          tmp_path):
    next_hop = SinkHandler(reply=UNDELIVERABLE)
    next_hop_server, next_hop_port = await start_sink(next_hop)
    assert shutil.which("postfix") and shutil.which("saslpasswd2"), \
        "Postfix is not installed: apt-get install -y postfix sasl2-bin libsasl2-modules (.ci/run does)"
    env = await start_inbound(api, dns_config, dns_server, test_ca, tmp_path)
    base = Path(tempfile.mkdtemp(prefix="plunkd-inbound-postfix-"))
    folder = base / "postfix"
    cert, key = self_signed_pair(base)
    port, password = free_port(), f"sk_{secrets.token_hex(24)}"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, True)
        await asyncio.to_thread(stack.enter_context, private_postfix(
            folder, port, cert, key, password, bouncing_postfix(env.port, next_hop_port), SMTP_CLIENT_SERVICES))
        try:
            smarthost = SmarthostConfig(host="127.0.0.1", port=port, starttls=True, username=SMTP_USER,
                                        password=password, ca_file=str(cert), timeout_seconds=30)
            email_id = await send_and_dispatch(env, smarthost)
            row = await email_row(api, email_id)
            assert row.status in (EmailStatus.SENT, EmailStatus.BOUNCED), (row.status, row.error)
            deadline = time.monotonic() + 20
            while (await email_row(api, email_id)).status != EmailStatus.BOUNCED:
                log = folder / "maillog"
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:] if log.exists() else ""
                await asyncio.sleep(0.2)
        finally:
            await env.inbound.stop()
            next_hop_server.close()
            await asyncio.to_thread(stack.close)
    [bounce] = await events(api, "email.bounce")
    data = bounce["data"]
    assert (data["via"], data["bounceType"], data["hard"], data["action"], data["status"]) == (
        "dsn", "Permanent", True, "failed", "5.1.1")
    assert data["finalRecipient"] == "ann@example.org"
    assert data["diagnosticCode"] == UNDELIVERABLE, "Postfix's DSN quotes the next hop's reply"
    assert data["reportingMta"] == "plunkd-bench.localhost" and data["remoteMta"] == "127.0.0.1"
    assert (await email_row(api, email_id)).error.startswith("bounced (Permanent/General): ")
    assert list(await suppressed(api)) == ["ann@example.org"]
