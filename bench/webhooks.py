"""Outbound webhooks: deliveries per second from `webhooks.sender.WebhookSender` (claim with a lease, sign,
POST, record each attempt) to a bare aiohttp receiver on loopback, against a bare aiohttp client POST loop
(same receiver, same body, same concurrency, no database and no signature), run before and after ours (the
better of the two counts). Ratio printed.

    python -m bench.webhooks [--deliveries 5000] [--concurrency 16] [--database-url postgresql+asyncpg://…] [--quick]

The receiver runs in a process of its own (this file with --serve), so it does not share the sender's loop.
The deliveries are queued first (events recorded through `pipeline.events.record_event`, which queues them),
then the sender is timed from its first claim until the last one is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
from aiohttp import web
from sqlalchemy import func, select

from bench.common import bench_database, free_port, parse_with_quick, server_process, temp_dir
from core.config import WebhooksConfig
from pipeline import webhooks as rules
from pipeline.events import event_payload, record_event
from pipeline.projects import create_project
from storage.db import Database
from storage.models import WebhookDelivery, utcnow
from webhooks.client import body_of
from webhooks.sender import WebhookSender

QUEUE_CHUNK = 500
DATA = {"plan": "pro", "source": "bench", "note": "x" * 200}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    return parse_with_quick(parser, deliveries=200)


def serve(port: int) -> None:
    """The receiver: 200 with a small JSON body for every POST."""
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def queue(db: Database, count: int, url: str) -> str:
    from bench.common import use_bench_key

    use_bench_key()
    await db.migrate()
    issued = await db.write(lambda s: create_project(s, "bench", "news@example.com", "Bench"))
    project_id = issued.project.id
    await db.write(lambda s: rules.create_endpoint(s, project_id, url, ["signed-up"], True, True, 10))
    for start in range(0, count, QUEUE_CHUNK):
        size = min(QUEUE_CHUNK, count - start)

        def record(session, size=size) -> None:
            for _ in range(size):
                record_event(session, project_id, None, "signed-up", DATA)

        await db.write(record)
    return project_id


async def delivered(db: Database) -> int:
    return await db.read(lambda s: s.execute(select(func.count()).select_from(WebhookDelivery)
                                             .where(WebhookDelivery.status == "DELIVERED")).scalar_one())


async def ours(db: Database, count: int, concurrency: int) -> float:
    settings = WebhooksConfig(allow_private_targets=True, concurrency=concurrency, batch_size=concurrency * 4,
                              poll_seconds=0.05)
    sender = WebhookSender(db, settings)
    started = time.perf_counter()
    task = asyncio.create_task(sender.run())
    deadline = started + 300
    try:
        while sender.delivered < count and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    elapsed = time.perf_counter() - started
    done = await delivered(db)
    assert done == count, f"only {done} of {count} deliveries were delivered"
    return count / elapsed


async def bare(url: str, count: int, concurrency: int) -> float:
    body = body_of(event_payload("00000000-0000-7000-8000-000000000000", "signed-up", None, None, DATA,
                                 utcnow())).encode()
    next_index = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                next_index += 1
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as reply:
                    await reply.read()
                    assert reply.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


async def measure(database_url: str, count: int, concurrency: int, url: str) -> None:
    db = Database(database_url, sync_every_commit=False)  # as in the dispatcher process, where the sender runs
    db.writer.start()
    try:
        await queue(db, count, url)
        before = await bare(url, count, concurrency)
        rate = await ours(db, count, concurrency)
        baseline = max(before, await bare(url, count, concurrency))  # the better of a run before and after ours
    finally:
        await db.dispose()
    kind = "PostgreSQL" if db.is_postgres else "SQLite"
    print(f"{count} webhook deliveries, {concurrency} at once, {kind}: plunkd {rate:,.0f} deliveries/s, bare aiohttp "
          f"POST loop {baseline:,.0f} posts/s, ratio {rate / baseline:.2f}")


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args.serve)
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    with server_process(["-m", "bench.webhooks", "--serve", str(port)], port):
        with temp_dir() as data, bench_database(args.database_url, data) as database_url:
            asyncio.run(measure(database_url, args.deliveries, args.concurrency, url))


if __name__ == "__main__":
    main()
