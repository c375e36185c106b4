"""GET /metrics: what an operator's Prometheus sees. In-process for the API, SMTP and dispatcher counters
(the registry is per process, so tests compare before and after), and with a real `plunkd serve` whose
dispatcher runs in a child process: the parent's /metrics shows the child's sends too, also after the
child was killed and replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from tests.test_delivery import dispatch_all, settings
from tests.test_processes import api_up, delivered, dispatcher_child, send, served, wait_until  # noqa: F401
from tests.test_relay import in_thread, smtps


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent: a counter not yet incremented has no sample)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


async def scrape(client, **headers) -> str:
    reply = await client.get("/metrics", headers=headers)
    assert reply.status == 200, await reply.text()
    assert reply.headers["Content-Type"].startswith("text/plain; version=")  # the exposition format
    return await reply.text()


async def test_sends_show_as_accepted_queued_and_sent_and_requests_as_latency(api, sender, tmp_path):
    before = await scrape(api.client)
    status, reply = await api.call("POST", "/v1/send", json={"to": ["a@example.org", "b@example.org"],
                                                             "subject": "Hi", "body": "Hello"})
    assert status == 200, reply
    status, _ = await api.call("POST", "/v1/send", json={"to": "c@example.org", "subject": "Hi", "body": "x",
                                                         "from": "me@unverified.example"})
    assert status == 422  # rolled back: counts nothing
    queued = await scrape(api.client)
    accepted = 'plunkd_emails_accepted_total'
    assert sample(queued, accepted, source="api") - sample(before, accepted, source="api") == 2
    assert sample(queued, "plunkd_outbox_depth", priority="transactional") == 2
    assert sample(queued, "plunkd_outbox_depth", priority="campaign") == 0
    assert sample(queued, "plunkd_outbox_oldest_due_seconds") >= 0
    latency = "plunkd_http_request_duration_seconds_count"
    assert sample(queued, latency, route="/v1/send", method="POST", status="200") - \
        sample(before, latency, route="/v1/send", method="POST", status="200") == 1
    assert sample(queued, latency, route="/v1/send", method="POST", status="422") - \
        sample(before, latency, route="/v1/send", method="POST", status="422") == 1

    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "out"), TokenBucket(0), settings()))
    sent = await scrape(api.client)
    assert sample(sent, "plunkd_emails_sent_total", transport="file") - \
        sample(before, "plunkd_emails_sent_total", transport="file") == 2
    assert sample(sent, "plunkd_outbox_depth", priority="transactional") == 0
    assert sample(sent, "plunkd_outbox_oldest_due_seconds") == 0
    assert sample(sent, "plunkd_dispatch_rate_per_second") > 0


async def test_a_suppressed_recipient_counts_as_failed_with_its_status(api, sender, tmp_path):
    from storage.models import Suppression

    await api.db.write(lambda s: s.add(Suppression(project_id=api.project_id, email="gone@example.org",
                                                   reason="test")))
    before = await scrape(api.client)
    status, _ = await api.call("POST", "/v1/send", json={"to": "gone@example.org", "subject": "Hi", "body": "x"})
    assert status == 200
    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "out"), TokenBucket(0), settings()))
    after = await scrape(api.client)
    failed = "plunkd_emails_failed_total"
    assert sample(after, failed, transport="file", status="SUPPRESSED") - \
        sample(before, failed, transport="file", status="SUPPRESSED") == 1


async def test_smtp_sessions_and_auth_failures(relay):
    client = relay.api.client
    before = await scrape(client)

    def session_with_a_bad_password():
        with smtps(relay) as smtp:
            smtp.ehlo()
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("plunk", "sk_" + "0" * 64)
            return smtp

    await in_thread(session_with_a_bad_password)
    await asyncio.sleep(0.1)  # the server sees the QUIT's close
    after = await scrape(client)
    assert sample(after, "plunkd_smtp_sessions_total") - sample(before, "plunkd_smtp_sessions_total") == 1
    refused = sample(after, "plunkd_smtp_auth_failures_total") - sample(before, "plunkd_smtp_auth_failures_total")
    assert refused == 2  # smtplib tries AUTH PLAIN, then AUTH LOGIN
    assert sample(after, "plunkd_smtp_sessions_open") == sample(before, "plunkd_smtp_sessions_open")


@pytest.fixture
def metrics_token(config):
    config.api.metrics_token = "scrape-me-please"
    return config


async def test_a_metrics_token_is_required_when_configured(metrics_token, api):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-me-please"}):
        reply = await api.client.get("/metrics", headers=headers)
        body = await reply.json()
        assert reply.status == 401 and body["error"]["code"] == "UNAUTHORIZED", headers
    await scrape(api.client, Authorization="Bearer scrape-me-please")


async def test_only_get_and_head(api):
    reply = await api.client.post("/metrics", data=b"x")
    assert reply.status == 405 and reply.headers["Allow"] == "GET, HEAD"
    head = await api.client.head("/metrics")
    assert head.status == 200 and await head.read() == b""


@pytest.mark.long
def test_the_parent_serves_the_dispatcher_childs_counts_also_after_the_child_was_replaced(served):  # noqa: F811
    proc, base, key, outbox = served
    wait_until(lambda: api_up(base), 30, "the API")
    child = wait_until(lambda: dispatcher_child(proc), 30, "the dispatcher process")
    log = outbox.parent.parent / "serve.log"
    wait_until(lambda: "started: transport file" in log.read_text(), 30, "the dispatcher to start", log)
    for index in range(2):
        send(base, key, f"m{index}@example.org")
    wait_until(lambda: delivered(outbox) == 2, 10, "two deliveries", log)
    wait_until(lambda: sample(scrape_url(base), "plunkd_emails_sent_total", transport="file") == 2, 5,
               "the child's sends in the parent's /metrics", log)
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: (pid := dispatcher_child(proc)) and pid != child and pid, 20, "a new dispatcher process", log)
    send(base, key, "after@example.org")
    wait_until(lambda: delivered(outbox) == 3, 15, "the third delivery", log)
    text = wait_until(lambda: (t := scrape_url(base)) and sample(t, "plunkd_emails_sent_total", transport="file") == 3
                      and t, 5, "counts that did not go back when the child died", log)
    assert sample(text, "plunkd_emails_accepted_total", source="api") == 3


def scrape_url(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
        return reply.read().decode()
