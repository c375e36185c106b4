"""The message log at scale: one project with N emails (default 1,000,000), each filter's page loaded
200 times by 8 concurrent clients through the dashboard over HTTP, p50/p95 per filter, and the query plans.

    python -m bench.dashboard_log [--emails 1000000] [--database-url URL] [--port 20450]

Without --database-url it builds an SQLite file in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from sqlalchemy import text

from core.config import Config
from pipeline.projects import create_project
from plunkd.app import create_app
from storage import bulk
from storage import emails as email_store
from storage.message_log import EmailFilter, is_bounded, log_query
from storage.models import Email, new_id, utcnow
from tests.dashboard_kit import Browser, make_user

STATUSES = ["SENT", "DELIVERED", "BOUNCED", "QUEUED", "FAILED", "COMPLAINED", "SUPPRESSED", "SENT"]
SOURCES = ["api", "smtp", "campaign", "workflow", "api", "api"]
COLUMNS = [("id", "text"), ("project_id", "text"), ("content_id", "text"), ("recipient", "text"),
           ("sender", "text"), ("subject", "text"), ("source", "text"), ("status", "text"),
           ("created_at", "time"), ("track_opens", "bool"), ("track_clicks", "bool")]


async def fill(db, project_id: str, count: int) -> None:
    content_id = await db.write(lambda s: email_store.insert_deferred_content(s, project_id, b"{}"))
    chunk = 20_000
    for start in range(0, count, chunk):
        rows = [[new_id(), project_id, content_id, f"user{i % 200_000}@example{i % 50}.com", "hello@example.com",
                 f"Order {i} shipped" if i % 3 else f"Welcome {i}", SOURCES[i % len(SOURCES)],
                 STATUSES[i % len(STATUSES)], utcnow(), False, False] for i in range(start, min(count, start + chunk))]
        await db.write(lambda s, rows=rows: bulk.insert_rows(s, Email.__table__, COLUMNS, rows))


QUERIES = {
    "overview (no query)": None,
    "all": "",
    "recipient exact": "recipient=user12345%40example45.com&match=exact",
    "recipient prefix": "recipient=user12345",
    "status": "status=COMPLAINED",
    "source": "source=workflow",
    "status+source": "status=BOUNCED&source=smtp",
    "subject contains": "subject=welcome",
    "subject prefix": "subject=order%2099&subjectMatch=prefix",
    "date range": "from=2020-01-01&to=2099-12-31",
}
FILTERS = {
    "all": EmailFilter(), "recipient exact": EmailFilter(recipient="user12345@example45.com", recipient_exact=True),
    "recipient prefix": EmailFilter(recipient="user12345"), "status": EmailFilter(status="COMPLAINED"),
    "source": EmailFilter(source="workflow"), "status+source": EmailFilter(status="BOUNCED", source="smtp"),
    "subject contains": EmailFilter(subject="welcome", subject_contains=True),
}


async def plans(db, project_id: str) -> None:
    async with db.engine.connect() as conn:
        for name, wanted in FILTERS.items():
            window_end = "00000000-0000-7000-8000-000000000000" if is_bounded(wanted) else None
            stmt = log_query(project_id, wanted, 50, None, window_end)
            sql = str(stmt.compile(conn.engine, compile_kwargs={"literal_binds": True}))
            prefix = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
            plan = [" ".join(str(v) for v in row) for row in await conn.execute(text(prefix + sql))]
            print(f"--- {name}\n  " + "\n  ".join(plan))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--emails", type=int, default=1_000_000)
    parser.add_argument("--database-url")
    parser.add_argument("--port", type=int, default=20450)
    parser.add_argument("--loads", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dashlog-"))
    config = Config()
    config.server.data_dir = str(tmp / "data")
    config.database.url = args.database_url or f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    config.smtp.enabled = False
    config.delivery.enabled = False
    config.server.public_url = f"http://127.0.0.1:{args.port}"
    app = create_app(config)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", args.port).start()
    try:
        from dashboard.context import DB
        db = app[DB]
        project_id = (await db.write(lambda s: create_project(s, "bench", "hello@example.com", "B"))).project.id
        started = time.monotonic()
        await fill(db, project_id, args.emails)
        if db.engine.dialect.name == "postgresql":
            async with db.engine.begin() as conn:
                await conn.execute(text("ANALYZE emails"))
        print(f"{args.emails} emails in {time.monotonic() - started:.0f} s")
        await plans(db, project_id)
        await make_user(db, "bench@example.com", instance_owner=True)
        async with aiohttp.ClientSession(base_url=config.server.public_url,
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            await Browser(session).sign_in("bench@example.com")
            for name, query in QUERIES.items():
                times: list[float] = []
                path = f"/projects/{project_id}" if query is None else f"/projects/{project_id}/emails?{query}"

                async def client(loads: int, path: str = path, times: list[float] = times) -> None:
                    for _ in range(loads):
                        began = time.perf_counter()
                        async with session.get(path) as response:
                            await response.read()
                            assert response.status == 200, response.status
                        times.append(time.perf_counter() - began)

                await asyncio.gather(*(client(args.loads // args.clients) for _ in range(args.clients)))
                times.sort()
                print(f"{name:18} p50 {statistics.median(times) * 1000:6.1f} ms   "
                      f"p95 {times[int(len(times) * 0.95) - 1] * 1000:6.1f} ms")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
