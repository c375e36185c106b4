"""The system page on the real app and database (SQLite, or PostgreSQL with PLUNKD_TEST_DATABASE_URL): only
instance owners see it; its outbox figures match the rows in the outbox; the chart's points are the sends
the dispatcher recorded (through the per-minute rollup); a served `plunkd serve` writes heartbeats for its
API process and its dispatcher process, which the page lists, and removes them when it stops. Nothing is
mocked."""

from __future__ import annotations

import asyncio
import calendar
import os
import re
import time
from datetime import timedelta

import pytest

from api.context import CONFIG
from core.config import Config
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from storage import system as system_store
from storage.models import Content, Email, OutboxItem, utcnow
from tests.servers import served_plunkd
from tests.test_delivery import dispatch_all, send, settings


@pytest.fixture
def config(config):
    """The shipped heartbeat and staleness bounds (the shared fixture stretches them to keep tests quiet)."""
    shipped = Config().server
    config.server.heartbeat_seconds = shipped.heartbeat_seconds
    config.server.node_stale_seconds = shipped.node_stale_seconds
    return config


async def test_only_instance_owners_see_the_system_page(dash):
    status, html = await dash.owner.get("/system")
    assert status == 200 and "<h1>System</h1>" in html
    status, body = await dash.owner.get_json("/system")
    assert status == 200 and set(body["data"]) >= {"queues", "rate", "nodes", "sends", "oldestDueSeconds"}
    admin = await dash.browser("admin@example.com", "owner")
    status, html = await admin.get("/system")
    assert status == 404 and "No such page" in html, "a project's owner is not an instance owner"
    status, body = await admin.get_json("/system")
    assert status == 404 and body["error"]["message"] == "No such page"
    response = await (await dash.browser()).client.get("/system", allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "/login?next=/system"


async def queue(db, project_id: str, rows: list[dict]) -> None:
    def work(session) -> None:
        content = Content(project_id=project_id, raw=b"Subject: x\r\n\r\nx")
        session.add(content)
        session.flush()
        for row in rows:
            email = Email(project_id=project_id, content_id=content.id, recipient="a@example.org",
                          sender="hello@example.com", source="api")
            session.add(email)
            session.flush()
            session.add(OutboxItem(email_id=email.id, **row))

    await db.write(work)


async def test_queue_depths_match_the_outbox(dash):
    now = utcnow()
    await queue(dash.api.db, dash.api.project_id, [
        {"priority": 0, "due_at": now - timedelta(minutes=10)},
        {"priority": 0, "due_at": now - timedelta(seconds=1)},
        {"priority": 0, "due_at": now + timedelta(hours=1)},
        {"priority": 0, "due_at": now + timedelta(seconds=90), "claimed_by": "dispatcher-1"},
        {"priority": 0, "due_at": now - timedelta(seconds=5), "claimed_by": "dead-dispatcher"},  # its lease ran out
        {"priority": 1, "due_at": now - timedelta(minutes=2)},
        {"priority": 1, "due_at": now + timedelta(days=1)},
        {"priority": 1, "due_at": now + timedelta(days=1)},
    ])
    status, body = await dash.owner.get_json("/system")
    assert status == 200
    depths = {q["name"]: (q["due"], q["later"], q["leased"]) for q in body["data"]["queues"]}
    assert depths == {"transactional": (3, 1, 1), "campaign": (1, 2, 0)}
    assert 600 <= body["data"]["oldestDueSeconds"] < 660
    campaign = next(q for q in body["data"]["queues"] if q["name"] == "campaign")
    assert 120 <= campaign["oldestDueSeconds"] < 180
    status, html = await dash.owner.get("/system")
    assert re.search(r'<th scope="row">transactional</th><td class="num">3</td><td class="num">1</td>'
                     r'<td class="num">1</td>', html)
    assert '<span class="badge bad">waiting 6' in html, "ten minutes late is shown as bad"


async def test_outbox_counts_stop_at_the_cap(dash, monkeypatch):
    monkeypatch.setattr(system_store, "COUNT_CAP", 3)
    now = utcnow()
    await queue(dash.api.db, dash.api.project_id, [{"priority": 0, "due_at": now - timedelta(seconds=s)}
                                                   for s in range(1, 6)])
    status, html = await dash.owner.get("/system")
    assert '<th scope="row">transactional</th><td class="num">3+</td>' in html


async def test_the_chart_shows_the_sends_the_dispatcher_recorded(dash, sender, tmp_path):
    now = utcnow()
    earlier = now - timedelta(hours=3)
    await dash.api.db.write(lambda s: [system_store.count_settled(s, earlier, sent) for sent in (True, True, False)])
    await dash.api.db.write(lambda s: system_store.count_settled(s, now - timedelta(days=2), True))
    for address in ("ann@example.org", "bob@example.org", "cy@example.org"):
        await send(dash.api, to=address)
    await dispatch_all(Dispatcher(dash.api.db, FileTransport(tmp_path / "out"), TokenBucket(0), settings()))

    status, body = await dash.owner.get_json("/system")
    sends = body["data"]["sends"]
    assert len(sends["sent"]) == sends["minutes"] == 1440
    answered = utcnow()
    start = calendar.timegm(time.strptime(sends["start"], "%Y-%m-%dT%H:%M:%S.000Z")) // 60
    assert system_store.minute_of(now) - 1439 <= start <= system_store.minute_of(answered) - 1439, \
        "the chart ends at the minute the request was answered in (a minute may turn during the test)"
    recorded = {index: count for index, count in enumerate(sends["sent"]) if count}
    assert recorded in [{system_store.minute_of(earlier) - start: 2, index: 3}
                        for index in range(system_store.minute_of(now) - start, 1440)], recorded
    assert sends["failed"][system_store.minute_of(earlier) - start] == 1
    assert (sends["total"], sends["failedTotal"]) == (5, 1), "the send two days ago is outside the chart"
    assert body["data"]["rate"]["setPerSecond"] == dash.api.client.app[CONFIG].delivery.rate_per_second

    status, html = await dash.owner.get("/system")
    chart = re.search(r'<svg class="chart"[^>]*role="img"[^>]*>(.*?)</svg>', html, re.S).group(1)
    assert "<title id=\"sends-title\">Emails sent per minute over the last 24 hours (UTC)</title>" in chart
    assert "5 sent and 1 failed in the last 24 hours; the busiest minute sent 3." in chart
    points = re.search(r'<polyline class="series" points="([^"]+)"', chart).group(1).split()
    assert len(points) == 1440
    heights = {index: float(point.split(",")[1]) for index, point in enumerate(points)}
    baseline = heights[0]
    raised = {index: baseline - y for index, y in heights.items() if y != baseline}
    assert set(raised) == set(recorded)
    peak_index = max(recorded, key=recorded.get)
    assert [round(raised[index] / raised[peak_index] * 3, 1) for index in sorted(raised)] == \
           [float(recorded[index]) for index in sorted(recorded)], "heights in proportion to the counts"
    assert 'style=' not in chart and ">emails per minute</text>" in chart and ">time (UTC)</text>" in chart


async def test_a_served_plunkd_writes_heartbeats_for_each_process(dash, tmp_path, database_url):
    db = dash.api.db
    long_gone = utcnow() - timedelta(days=2)
    quiet = utcnow() - timedelta(minutes=5)
    await db.write(lambda s: [system_store.heartbeat(s, {
        "id": node_id, "hostname": "<script>alert(1)</script>", "pid": 1, "roles": "api", "version": "0.0.1",
        "started_at": at, "last_heartbeat": at}) for node_id, at in (("old", long_gone), ("quiet", quiet))])
    env = {"PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DATABASE_URL": database_url,
           "PLUNKD_SERVER_HEARTBEAT_SECONDS": "0.2"}
    with served_plunkd(tmp_path, env, graceful=True) as server:
        deadline = time.monotonic() + 20
        while True:
            nodes = [n for n in await db.read(system_store.list_nodes)
                     if n.id not in ("old", "quiet") and n.pid != os.getpid()]  # not this test's own app
            roles = sorted(node.roles for node in nodes)
            if "dispatcher" in roles and "api" in roles or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        by_role = {node.roles: node for node in nodes}
        assert {"api", "dispatcher"} <= set(by_role), (roles, server.log()[-2000:])
        assert by_role["api"].pid == server.proc.pid and by_role["dispatcher"].pid != server.proc.pid
        first_beat = by_role["dispatcher"].last_heartbeat
        time.sleep(0.6)
        later = {n.id: n for n in await db.read(system_store.list_nodes)}
        assert later[by_role["dispatcher"].id].last_heartbeat > first_beat
        assert "old" not in later, "a node unseen for a day is pruned"

        status, body = await dash.owner.get_json("/system")
        shown = {node["id"]: node for node in body["data"]["nodes"]}
        assert shown["quiet"]["stale"] is True and shown[by_role["api"].id]["stale"] is False
        assert shown[by_role["api"].id]["roles"] == ["api"] and shown[by_role["api"].id]["pid"] == server.proc.pid
        status, html = await dash.owner.get("/system")
        assert '<span class="badge bad">stale</span>' in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script>alert(1)" not in html
    remaining = {node.id for node in await db.read(system_store.list_nodes)}
    assert by_role["api"].id not in remaining and by_role["dispatcher"].id not in remaining, \
        "a clean stop removes its rows"


async def test_concurrent_writers_add_up_in_one_minute(dash):
    """Each transaction adds to a shard of its own drawing; the page sums them (200 writes at once, which
    the group-commit writer spreads over several transactions, on PostgreSQL over several connections)."""
    now = utcnow()
    await asyncio.gather(*[dash.api.db.write(lambda s, sent=index % 4 != 0: system_store.count_settled(s, now, sent))
                           for index in range(200)])
    status, body = await dash.owner.get_json("/system")
    assert (body["data"]["sends"]["total"], body["data"]["sends"]["failedTotal"]) == (150, 50)
    assert body["data"]["rate"]["thisMinuteSent"] in (0, 150) and 150 in body["data"]["sends"]["sent"][-2:]
