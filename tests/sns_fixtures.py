"""Helpers of the feedback tests: the stand-in SNS host on 127.0.0.1 over real TLS with its signer, the
app's `[feedback]` config pointed at it, posting as SNS posts, and an email sent with a transport id;
and the fixtures a feedback test module takes over (`signing_certificate`, `sns`, and `config`, which
overrides conftest's there)."""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from storage import emails as email_store
from testkit.sns import CERT_PATH, TOPIC, FakeSnsHost, SnsSigner, make_signing_certificate
from tests.test_delivery import dispatch_all, settings

SNS_PATH = "/webhooks/incoming/sns"


@dataclass
class SnsEnv:
    signer: SnsSigner
    host: FakeSnsHost
    base_url: str
    ca_file: str


async def start_fake_sns(test_ca, tmp_path, signing_certificate) -> tuple[SnsEnv, web.AppRunner]:
    """The stand-in SNS host on 127.0.0.1 (an OS-chosen port) with a certificate of the test CA."""
    key, pem = signing_certificate
    host = FakeSnsHost(pem)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    runner = web.AppRunner(host.app(), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=server_tls).start()
    ca_file = str(tmp_path / "sns-ca.pem")
    test_ca.cert_pem.write_to_path(ca_file)
    base_url = f"https://127.0.0.1:{port}"
    return SnsEnv(SnsSigner(key, base_url + CERT_PATH), host, base_url, ca_file), runner


def point_at(config, env: SnsEnv):
    """`[feedback]` accepting TOPIC, trusting the test CA and taking certificates from https://127.0.0.1 (any
    port, so that a closed port can be named too)."""
    config.feedback.sns_topic_arns = [TOPIC]
    config.feedback.sns_host_pattern = r"^127\.0\.0\.1:[0-9]+$"
    config.feedback.sns_ca_file = env.ca_file
    return config


async def post_sns(api, message: dict[str, Any] | None = None, raw: bytes | None = None,
                   path: str = SNS_PATH) -> tuple[int, dict]:
    """POST as SNS does: JSON sent as text/plain, with its message-type header, no API key."""
    body = raw if raw is not None else json.dumps(message).encode()
    headers = {"Content-Type": "text/plain; charset=UTF-8", "User-Agent": "Amazon Simple Notification Service Agent"}
    if message is not None:
        headers["x-amz-sns-message-type"] = message.get("Type", "")
    resp = await api.client.post(path, data=body, headers=headers)
    return resp.status, await resp.json()


async def sent_email(api, tmp_path, to: str = "ann@example.org", **payload) -> Any:
    """Send one email through /v1/send and the dispatcher (file transport); its row, with its transport id."""
    status, body = await api.call("POST", "/v1/send", json={"to": to, "subject": "Hello", "body": "<p>Hi</p>",
                                                            **payload})
    assert status == 200, body
    email_id = body["data"]["emails"][0]["email"]
    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "outbox"), TokenBucket(0), settings()))
    return await api.db.read(email_store.get_email, api.project_id, email_id)


@pytest.fixture(scope="session")
def signing_certificate():
    """Generating RSA keys takes a while: one signing certificate per session."""
    return make_signing_certificate()


@pytest.fixture
async def sns(test_ca, tmp_path, signing_certificate):
    env, runner = await start_fake_sns(test_ca, tmp_path, signing_certificate)
    yield env
    await runner.cleanup()


@pytest.fixture
def config(config, sns):
    """conftest's, with `[feedback]` pointed at the stand-in SNS."""
    return point_at(config, sns)


async def events(api, name: str) -> list[dict]:
    status, body = await api.call("GET", f"/events?name={name}&limit=100")
    assert status == 200, body
    return body["data"]["items"]
