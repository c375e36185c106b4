"""bench.dashboard: the seed it writes, the query each bare handler runs, the run over this branch's pages
(real `plunkd serve` and bare server processes on loopback, SQLite or PostgreSQL) and its cached seed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import event, func, select

from bench import dashboard as bench
from core.config import load_config
from pipeline.projects import create_project
from storage.db import Database
from storage.models import CampaignStatus, Contact, Email, EmailStatus, Event, OutboxItem, Project
from storage.segments import count_matching
from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parent.parent
FRAME_PAGES = {"/projects", "/projects/{project}", "/projects/{project}/members", "/account"}
SMALL = bench.SeedSize(contacts=200, emails=2000)


def run_bench(cache_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.dashboard", "--contacts", "200", "--emails", "2000",
                           "--loads", "8", "--concurrency", "4", "--cache-dir", str(cache_dir), *extra],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=240)


def row_pattern(path: str) -> re.Pattern[str]:
    """A page's line: p50 p95 max cpu, bare p50 p95 cpu, the two ratios, then the two aims' verdicts."""
    number = r"\s+[0-9]+\.[0-9]+"
    return re.compile(re.escape(path) + number * 9 + r"\s+p95<=1[05]0 (PASS|MISS)  ratio>=0\.5 (PASS|MISS)$", re.M)


def uuid7_time(value: str) -> datetime:
    return datetime.fromtimestamp((uuid.UUID(value).int >> 80) / 1000, UTC)


@pytest.mark.long
async def test_the_run_loads_every_page_this_branch_has_and_reuses_its_seed(tmp_path, empty_database_url):
    database = ["--database-url", empty_database_url] if PG_URL else []
    first = run_bench(tmp_path / "cache", *database)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"200 contacts, 2,000 emails \(seeded in [0-9.]+ s\); 8 loads per page by 4 clients",
                     first.stdout), first.stdout
    routes = bench.routes_here()
    measured = {case.path for case in bench.PAGES if row_pattern(case.path).search(first.stdout)}
    assert FRAME_PAGES <= measured
    for case in bench.PAGES:
        if case.route in routes:
            assert case.path in measured, first.stdout
        else:
            assert f"{case.path}: no GET {case.route} on this branch, skipped" in first.stdout
    second = run_bench(tmp_path / "cache", *database)
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"\(seed cached, it took [0-9.]+ s\)", second.stdout), second.stdout
    assert {case.path for case in bench.PAGES if row_pattern(case.path).search(second.stdout)} == measured


@pytest.mark.long
@pytest.mark.skipif(bool(PG_URL), reason="--sending copies the SQLite seed")
async def test_the_pages_are_loaded_again_while_the_dispatcher_sends_and_the_seed_stays_half_way(tmp_path):
    first = run_bench(tmp_path / "cache", "--sending", "500")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "the same pages while the dispatcher sends the campaign's queued emails at 500 per second" in first.stdout
    again = first.stdout.split("the same pages while", 1)[1]
    assert row_pattern("/projects/{project}/campaigns/{campaign}/progress").search(again), first.stdout
    sent = re.search(r"sent while loading: ([0-9,]+) emails in [0-9]+ s", first.stdout)
    assert sent and int(sent.group(1).replace(",", "")) > 0, first.stdout
    [seeded] = (tmp_path / "cache").glob("*/plunkd.sqlite3")
    assert [path.name for path in seeded.parent.iterdir() if path.name.startswith("sending-")] == []
    db = Database(f"sqlite+aiosqlite:///{seeded}")
    try:
        queued = await db.read(lambda s: s.execute(select(func.count()).select_from(OutboxItem)
                                                   .where(OutboxItem.campaign_id.is_not(None))).scalar_one())
    finally:
        await db.dispose()
    assert queued > 0  # the cached seed's campaign is still half way for the next run
    assert "seed cached" in run_bench(tmp_path / "cache").stdout


def test_sending_needs_the_sqlite_seed_and_a_rate(capsys):
    for argv, message in ((["--sending", "50", "--database-url", "postgresql+asyncpg://x/y"],
                           "--sending runs on a copy of the SQLite seed, not with --database-url"),
                          (["--sending", "-1"], "--sending takes a rate above 0")):
        with pytest.raises(SystemExit) as stopped:
            bench.parse_args(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


async def test_the_seed_has_every_row_the_pages_show_and_each_main_query_finds_them(db):
    ids = await bench.seed(db, SMALL)
    results = {case.path: await db.read(case.main_query, ids) for case in bench.PAGES}

    emails = results["/projects/{project}/emails"]
    assert len(emails) == bench.LIST_SIZE + 1
    assert [e["id"] for e in emails] == sorted((e["id"] for e in emails), reverse=True)
    newest, oldest = await db.read(lambda s: s.execute(
        select(func.max(Email.id), func.min(Email.id))).one())
    now = datetime.now(UTC)
    assert now - timedelta(minutes=5) < uuid7_time(newest) <= now
    assert now - timedelta(days=30, minutes=5) < uuid7_time(oldest) < now - timedelta(days=29)
    assert {abs(uuid7_time(e["id"]) - e["created_at"]) < timedelta(milliseconds=1) for e in emails} == {True}
    assert {e["source"] for e in results["/projects/{project}/emails"]} <= {"api", "smtp", "campaign", "workflow"}

    to_one = results["/projects/{project}/emails?recipient={recipient}"]
    assert to_one and {e["recipient"] for e in to_one} == {ids["recipient"]}
    bounced = results["/projects/{project}/emails?status=BOUNCED"]
    assert bounced and {e["status"] for e in bounced} == {EmailStatus.BOUNCED}
    assert all(e["error"].startswith("550 5.1.1") for e in bounced)
    found = results["/projects/{project}/contacts?q={prefix}"]
    assert sorted(c["email"] for c in found) == [f"user0000{n}{m}@example.com" for n in "1" for m in range(10)]
    assert len(results["/projects/{project}/contacts"]) == bench.LIST_SIZE + 1
    contact = results["/projects/{project}/contacts/{contact}"]
    assert contact["contact"]["email"] == "user000100@example.com" and set(contact["contact"]["data"]) == {
        "firstName", "plan", "city", "orders"}
    email = results["/projects/{project}/emails/{email}"]
    assert email["email"]["status"] == EmailStatus.BOUNCED
    bounce = [e for e in email["events"] if e["name"] == "email.bounce"]
    assert bounce and bounce[0]["data"]["reply"].startswith("550 5.1.1 <")
    assert {e["name"] for e in email["events"]} == {"email.sent", "email.bounce"}

    assert [p["name"] for p in results["/projects"]] == ["Bench shop"]
    members = results["/projects/{project}/members"]
    assert sorted(m["role"] for m in members["members"]) == ["admin", "editor", "viewer"]
    assert len(members["invitations"]) == 2
    assert [d["name"] for d in results["/projects/{project}/domains"]] == ["bench.example", "mail.bench.example"]
    assert all(d["verified"] for d in results["/projects/{project}/domains"])
    assert len(results["/projects/{project}/webhooks"]) == 2
    assert [s["email"] for s in results["/projects/{project}/suppressions"]] == ["user000000@example.com"]
    unsubscribed = await db.read(lambda s: s.execute(select(func.count()).select_from(Contact)
                                                     .where(Contact.subscribed.is_(False))).scalar_one())
    assert 5 <= unsubscribed <= 40
    await marketing_rows_are_there(db, ids, results)


async def marketing_rows_are_there(db: Database, ids: dict[str, str], results: dict[str, Any]) -> None:
    """Dashboard II's pages: templates, a segment, a workflow with runs at its steps, many "purchased"
    events and a campaign half way through sending (what the fan-out and the dispatcher leave)."""
    templates = results["/projects/{project}/templates"]
    assert [t["name"] for t in templates] == ["Win back", "Receipt", "Welcome", "Spring sale"]
    assert results["/projects/{project}/templates/{template}"]["type"] == "MARKETING"
    assert [s["name"] for s in results["/projects/{project}/segments"]] == ["Pro buyers"]
    segment = results["/projects/{project}/segments/{segment}"]
    assert segment["segment"]["condition"] == bench.SEGMENT_CONDITION
    assert "plan" in segment["keys"] and "purchased" in segment["names"]
    members = await db.read(lambda s: count_matching(s, ids["project"], bench.SEGMENT_CONDITION, datetime.now(UTC)))
    assert 0 < members < SMALL.contacts // 4

    campaigns = results["/projects/{project}/campaigns"]
    assert [(c["name"], c["status"], c["recipient_count"]) for c in campaigns] == [
        ("Spring sale", CampaignStatus.SENDING, SMALL.contacts)]
    progress = results["/projects/{project}/campaigns/{campaign}/progress"]
    assert progress.status == CampaignStatus.SENDING and progress.recipients == SMALL.contacts
    assert sum(progress.counts.values()) == SMALL.contacts
    assert progress.counts["sent"] > progress.counts["queued"] > progress.counts["failed"] > 0
    assert results["/projects/{project}/campaigns/{campaign}"]["progress"] == progress
    recipients = results["/projects/{project}/campaigns/{campaign}/recipients"]
    assert len(recipients) == bench.LIST_SIZE and {r["status"] for r in recipients} >= {"DELIVERED", "QUEUED"}

    def campaign_rows(session) -> tuple[int, int, int, set[str], dict[str, int]]:
        emails = select(func.count(), func.count(func.distinct(Email.contact_id)), func.min(Email.source),
                        func.max(Email.source)).where(Email.campaign_id == ids["campaign"])
        total, contacts, first_source, last_source = session.execute(emails).one()
        outbox = session.execute(select(func.count(), func.min(OutboxItem.priority), func.max(OutboxItem.priority))
                                 .where(OutboxItem.campaign_id == ids["campaign"])).one()
        feedback = dict(session.execute(select(Event.name, func.count()).join(Email, Email.id == Event.email_id)
                                        .where(Email.campaign_id == ids["campaign"]).group_by(Event.name)).all())
        return total, contacts, outbox, {first_source, last_source}, feedback

    total, contacts, outbox, sources, feedback = await db.read(campaign_rows)
    assert total == contacts == SMALL.contacts and sources == {"campaign"}
    assert tuple(outbox) == (progress.counts["queued"], 1, 1)
    assert feedback["email.delivery"] > feedback["email.open"] > feedback["email.click"] > 0

    workflows = results["/projects/{project}/workflows"]
    assert [w["name"] for w in workflows["workflows"]] == ["Onboarding"]
    assert workflows["runs"][ids["workflow"]]["total"] == min(bench.WORKFLOW_RUNS, SMALL.contacts)
    steps = results["/projects/{project}/workflows/{workflow}"]["steps"]
    assert steps["wait-a-bit"]["waiting"] > 0 and steps["wait-order"]["waiting"] > 0
    assert steps["welcome"]["failed"] > 0 and steps["welcome"]["passed"] > steps["tag"]["passed"] > 0

    names = dict(results["/projects/{project}/events"])
    assert names["purchased"] > 0 and names["email.delivery"] > 0
    purchased = results["/projects/{project}/events/purchased"]
    assert len(purchased) == bench.LIST_SIZE + 1 and {e["name"] for e in purchased} == {"purchased"}


async def test_a_page_that_does_not_answer_200_stops_the_run(aiohttp_server):
    """A session the server no longer knows gets the sign-in redirect: the bench must not time that as a page."""
    async def signed_out(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/login?next=/projects")

    app = web.Application()
    app.router.add_get("/projects", signed_out)
    server = await aiohttp_server(app, host="127.0.0.1")
    with pytest.raises(bench.PageError, match=r"GET http://127\.0\.0\.1:\d+/projects: HTTP 302"):
        await bench.load(f"http://127.0.0.1:{server.port}/projects", 10, 2, {"plunkd_session": "gone"})


def test_sizes_below_the_least_are_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(["--contacts", "5"])
    assert stopped.value.code == 2
    assert "at least 20 contacts, 100 emails, 1 load and 1 client" in capsys.readouterr().err
    quick = bench.parse_args(["--quick"])
    assert (quick.contacts, quick.emails, quick.loads, quick.concurrency) == (2_000, 20_000, 20, 8)


@contextlib.contextmanager
def read_sessions(db: Database) -> Iterator[list[int]]:
    """Counts the connections the app's reads take from the pool (one per `Database.read`)."""
    taken = [0]

    def checkout(*_args) -> None:
        taken[0] += 1

    event.listen(db.engine.sync_engine, "checkout", checkout)
    try:
        yield taken
    finally:
        event.remove(db.engine.sync_engine, "checkout", checkout)


async def test_a_page_reads_the_visit_and_the_visitors_role_in_one_database_session(dash):
    """What bench.dashboard found: each read is a pool checkout and a few hops to the database's thread,
    which under load cost more than the small queries; a project page read its session, then its role,
    then (members) its members, then its invitations, each in a session of its own."""
    project = dash.api.project_id
    await dash.owner.get(f"/projects/{project}")
    for path, reads in {f"/projects/{project}": 1, f"/projects/{project}/members": 2, "/account": 2,
                        "/projects": 2}.items():
        with read_sessions(dash.api.db) as taken:
            status, page = await dash.owner.get(path)
        assert status == 200 and "<h1" in page
        assert taken[0] == reads, path
    stranger = await dash.browser("stranger@example.com", "viewer")
    other_id, _, _ = await dash.api.new_project("elsewhere")
    with read_sessions(dash.api.db) as taken:
        status, _ = await stranger.get(f"/projects/{other_id}/members")
    assert (status, taken[0]) == (404, 1)
    status, page = await stranger.get(f"/projects/{project}/members")
    assert status == 200 and "stranger@example.com" in page


async def test_concurrent_page_loads_reuse_the_pooled_read_connections(dash):
    """What bench.dashboard found on SQLite: the read pool kept SQLAlchemy's default 5 connections whatever
    `database.pool_size` said, so an 8-client load opened (and closed) a connection, its thread and its
    PRAGMAs for several requests of every round."""
    project = dash.api.project_id
    paths = [f"/projects/{project}", f"/projects/{project}/members", "/account", "/projects"] * 2
    opened = [0]

    def connect(*_args) -> None:
        opened[0] += 1

    async def round_of_loads() -> None:
        answers = await asyncio.gather(*[dash.owner.client.get(path) for path in paths])
        assert [answer.status for answer in answers] == [200] * len(paths)
        for answer in answers:
            await answer.read()

    await round_of_loads()
    event.listen(dash.api.db.engine.sync_engine, "connect", connect)
    try:
        for _ in range(5):
            await round_of_loads()
    finally:
        event.remove(dash.api.db.engine.sync_engine, "connect", connect)
    assert opened[0] == 0


async def test_a_database_holding_other_data_is_not_seeded_over(db, database_url, tmp_path):
    await db.write(lambda s: create_project(s, "Someone's shop", "shop@example.com", ""))
    config = load_config(env={"PLUNKD_SERVER_DATA_DIR": str(tmp_path), "PLUNKD_DATABASE_URL": database_url})
    where = "give an empty one" if PG_URL else f"remove {tmp_path} to seed again"
    with pytest.raises(SystemExit, match=f"holds other data, or a seed that did not finish: {re.escape(where)}"):
        await bench.ready_database(db, config, SMALL, "a-key")
    counts = await db.read(lambda s: (s.execute(select(func.count()).select_from(Project)).scalar_one(),
                                      s.execute(select(func.count()).select_from(Email)).scalar_one()))
    assert counts == (1, 0)
