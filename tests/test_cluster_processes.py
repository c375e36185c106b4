"""Three real `plunkd serve` nodes (each an acceptance process and its dispatcher child) on one PostgreSQL
database, delivering through the smtp transport into a sink on 127.0.0.1 at a set 50/s: 2,000 emails
accepted through the API and SMTP of all three, one node SIGKILLed mid-delivery. Every accepted email
arrives; together the nodes hold the set rate; duplicates are counted and stay within the lease rule (a
node killed between handing emails to the transport and recording them: at most its `delivery.concurrency`
in flight). PostgreSQL only (deselected in the SQLite pass)."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import ssl
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from core.keys import format_key, new_key
from tests.servers import ServedPlunkd, api_up, children, free_port, served_plunkd
from tests.test_cli_and_config import project_with_domain
from tests.test_cluster import most_in_any_window
from tests.test_processes import wait_until

pytestmark = pytest.mark.postgres_only
RATE = 50
EMAILS_BY_API = 1400
EMAILS_BY_SMTP = 600
CONCURRENCY = 8


class Sink:
    """The upstream SMTP server: when each message arrived, to whom."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope) -> str:
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.arrivals.append((time.monotonic(), rcpt.lower()))
        return "250 2.0.0 OK"

    def recipients(self) -> set[str]:
        with self.lock:
            return {rcpt for _, rcpt in self.arrivals}


@pytest.fixture
def sink():
    handler = Sink()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller.port
    controller.stop()


def start_node(stack: ExitStack, tmp_path: Path, index: int, env: dict[str, str]) -> tuple[ServedPlunkd, int]:
    """A node with its own data dir and log, not waited for; returns it and its implicit-TLS SMTP port."""
    tls = free_port()
    node_env = {**env, "PLUNKD_SERVER_DATA_DIR": str(tmp_path / f"node{index}"), "PLUNKD_SMTP_TLS_PORT": str(tls),
                "PLUNKD_SMTP_STARTTLS_PORT": str(free_port())}
    return stack.enter_context(served_plunkd(tmp_path, node_env, log_name=f"node{index}.log", wait_for=None)), tls


def send_api(base: str, key: str, to: str) -> None:
    request = urllib.request.Request(f"{base}/v1/send", method="POST", data=json.dumps(
        {"to": to, "subject": "Cluster", "body": f"Hello {to}"}).encode(), headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200


def send_smtp(port: int, key: str, recipients: list[str]) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the nodes' self-signed certificates (TLS itself is tested elsewhere)
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30) as client:
        client.login("plunk", key)
        for to in recipients:
            message = f"From: hello@example.com\r\nTo: {to}\r\nSubject: Cluster\r\n\r\nHello {to}\r\n"
            client.sendmail("hello@example.com", [to], message)


@pytest.mark.timeout(300)
def test_three_nodes_hold_one_rate_and_lose_nothing_when_one_is_killed(tmp_path, database_url, sink):
    handler, sink_port = sink
    # one encryption key for every node (each has its own data dir): the DKIM key the CLI seals, they open
    env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_DELIVERY_TRANSPORT": "file",
           "PLUNKD_SECURITY_ENCRYPTION_KEY": format_key(new_key())}
    key = project_with_domain(tmp_path, "p", "hello@example.com", env).secret_key
    env.update({"PLUNKD_DELIVERY_TRANSPORT": "smtp", "PLUNKD_DELIVERY_SMTP_HOST": "127.0.0.1",
                "PLUNKD_DELIVERY_SMTP_PORT": str(sink_port), "PLUNKD_DELIVERY_RATE_PER_SECOND": str(RATE),
                "PLUNKD_DELIVERY_LEASE_SECONDS": "10", "PLUNKD_DELIVERY_CONCURRENCY": str(CONCURRENCY),
                "PLUNKD_API_RATE_LIMIT_PER_MINUTE": "100000", "PLUNKD_SMTP_HOST": "127.0.0.1"})
    with ExitStack() as stack:
        nodes = [start_node(stack, tmp_path, index, env) for index in range(3)]
        for node, _ in nodes:
            node.wait(lambda node=node: api_up(node.base), 60, "a node's API")
        api_recipients = [f"api{i}@example.org" for i in range(EMAILS_BY_API)]
        smtp_recipients = [f"smtp{i}@example.org" for i in range(EMAILS_BY_SMTP)]
        with ThreadPoolExecutor(12) as pool:
            sends = [pool.submit(send_api, nodes[i % 3][0].base, key, to) for i, to in enumerate(api_recipients)]
            sends += [pool.submit(send_smtp, nodes[i][1], key, smtp_recipients[i::3]) for i in range(3)]
            for done in sends:
                done.result()
        accepted = set(api_recipients) | set(smtp_recipients)
        steady = time.monotonic() + 1.0  # acceptance is over: from here on the nodes only deliver

        victim = nodes[2][0]
        wait_until(lambda: sum(moment > steady for moment, _ in handler.arrivals) >= 400, 60,
                   "400 deliveries after acceptance", victim.log_path)
        for pid in [*children(victim.proc.pid), victim.proc.pid]:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.proc.wait(timeout=10)
        wait_until(lambda: handler.recipients() >= accepted, 120, "every accepted email at the sink",
                   nodes[0][0].log_path)

    times = sorted(moment for moment, _ in handler.arrivals)
    counts: dict[str, int] = {}
    for _, rcpt in handler.arrivals:
        counts[rcpt] = counts.get(rcpt, 0) + 1
    duplicates = sum(count - 1 for count in counts.values())
    # the rate while all three had work and nothing else to do: from the end of acceptance to the kill
    before = [moment for moment in times if steady < moment < killed_at]
    held = (len(before) - 1) / (before[-1] - before[0])
    steady_times = [moment for moment in times if moment > steady]
    figures = (f"{len(times)} deliveries, held {held:.2f}/s (set {RATE}/s) over {len(before)} before the kill, "
               f"busiest second {most_in_any_window(steady_times)}, duplicates after the kill {duplicates}")
    print(f"\ncluster: {figures}")
    assert set(counts) == accepted, figures
    assert duplicates <= CONCURRENCY, figures
    assert abs(held - RATE) / RATE < 0.02, figures
    # The sink runs in this process, whose twelve client threads starve it while they load the nodes: its
    # arrival times bunch then. From the end of acceptance on they are the nodes' own pace. The schedule
    # allows RATE + 1 slots in any second (GCRA's one-slot allowance, checked exactly at the slots in
    # tests/test_cluster.py); an arrival comes one SMTP conversation after its slot, and that time varies
    # from send to send by up to a slot's length (20 ms) on a busy machine, so one more arrival than slots
    # may fall in a second at the sink.
    # (Seen once on this 2-core machine: 53 in a second while 50.01/s held over the whole run: arrivals bunch
    # by two conversations' worth, not the schedule; and once in a local CI run, 56 while 50.00/s held.) The
    # bound still tells a node sending on its own rate (three nodes: 150 in a second) from the shared one.
    assert most_in_any_window(steady_times) <= RATE * 1.15, figures
