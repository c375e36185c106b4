"""Shared by the inbound tests: a project whose domain example.com has the verified return path
bounces.example.com (MX and SPF in the test DNS server), plunkd's inbound SMTP on a loopback port with a
certificate of the test CA, and sending an email through the dispatcher to a smarthost."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from core.config import InboundConfig, SmarthostConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import SmtpTransport
from feedback.effects import smtp_bounce
from inbound.server import Inbound
from pipeline.links import make_signer
from pipeline.return_path import VerpSigner
from storage.models import Email, Suppression
from tests.test_delivery import dispatch_all, settings

RETURN_PATH = "bounces.example.com"
INBOUND_HOST = "mx.plunkd.test"


@dataclass
class InboundEnv:
    api: Any
    config: Any
    verp: VerpSigner
    inbound: Inbound
    client_tls: ssl.SSLContext
    domain: dict

    @property
    def port(self) -> int:
        return self.inbound.port


async def add_return_path_domain(api, dns_server, config) -> dict:
    config.server.inbound_host = INBOUND_HOST
    status, body = await api.call("POST", "/domains", json={"domain": "example.com", "returnPath": RETURN_PATH})
    assert status == 201, body
    dns_server.publish(body["data"]["records"])
    status, body = await api.call("POST", f"/domains/{body['data']['id']}/verify")
    assert status == 200 and body["data"]["verified"] and body["data"]["returnPathVerified"], body
    return body["data"]


async def start_inbound(api, config, dns_server, test_ca, tmp_path, **settings_overrides) -> InboundEnv:
    """The return-path domain, then inbound SMTP on an ephemeral loopback port, signing with the app's own
    link secret (as the served app does)."""
    domain = await add_return_path_domain(api, dns_server, config)
    cert = test_ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "inbound.pem"))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(str(tmp_path / "inbound.pem"))
    client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    test_ca.configure_trust(client_tls)
    verp = VerpSigner(make_signer(config.server.link_secret, config.data_path, config.server.public_url), 30)
    inbound_config = InboundConfig(host="127.0.0.1", port=0, **settings_overrides)
    inbound = Inbound(api.db, verp, inbound_config, server_tls)
    await inbound.start()
    return InboundEnv(api, config, verp, inbound, client_tls, domain)


async def send_and_dispatch(env: InboundEnv, smarthost: SmarthostConfig, to: str = "ann@example.org") -> str:
    """/v1/send one email, then run the dispatcher (VERP on) through `smarthost`; the email's id."""
    status, body = await env.api.call("POST", "/v1/send", json={"to": to, "subject": "Order 7",
                                                                "body": "<p>Shipped</p>", "subscribed": True})
    assert status == 200, body
    transport = SmtpTransport(smarthost)
    await dispatch_all(Dispatcher(env.api.db, transport, TokenBucket(0), settings(), record_bounce=smtp_bounce,
                                  verp=env.verp))
    await transport.close()
    return body["data"]["emails"][0]["email"]


def smtp_client(env: InboundEnv) -> smtplib.SMTP:
    """A client of the inbound port after EHLO, STARTTLS (checked offered) and EHLO again."""
    client = smtplib.SMTP("127.0.0.1", env.port, timeout=30)
    client.ehlo("mta.example.net")
    assert client.has_extn("starttls") and not client.has_extn("auth")
    client.starttls(context=env.client_tls)
    client.ehlo("mta.example.net")
    return client


def deliver(env: InboundEnv, rcpt: str, raw: bytes, mail_from: str = "") -> tuple[int, bytes]:
    """One message over a new session; the reply to its DATA (or to the RCPT, when that refused)."""
    with smtp_client(env) as client:
        client.mail(mail_from)
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
        return client.data(raw)


async def email_row(api, email_id: str) -> Email:
    return await api.db.read(lambda s: s.get(Email, email_id))


async def suppressed(api) -> dict[str, str]:
    return dict(await api.db.read(lambda s: s.execute(select(Suppression.email, Suppression.reason).where(
        Suppression.project_id == api.project_id)).all()))


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)
