"""A campaign to 100,000 contacts: how long until every recipient's outbox row is committed, against a
bare `INSERT … SELECT` of as many rows into the same database; who used the machine's cores meanwhile (plunkd's
processes, PostgreSQL's when its server runs here, the load generator); and /v1/send latency (p99)
while the campaign is fanned out and while it dispatches, against the same server idle. One run, ratios printed.

    python -m bench.campaign [--contacts 100000] [--rate 100] [--probes 1000] [--database-url postgresql+asyncpg://…]
                             [--database-icu-locale en-US] [--quick]

The server is a real `plunkd serve` (API process + dispatcher process, file transport at `--rate`).
Contacts are written through the storage layer's table in bulk before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import aiohttp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.common import (
    bench_database,
    create_project,
    free_port,
    insert_into,
    machine_busy_seconds,
    parse_with_quick,
    plunkd_env,
    process_table,
    server_process,
    temp_dir,
    tree_cpu_seconds,
)
from bench.setup_sender import verify_offline
from storage.db import Database
from storage.models import Contact, new_id, utcnow

CONTACT_BATCH = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=100.0,
                        help="the dispatcher's send rate (messages/s); above the probes' own rate, so the campaign "
                             "really dispatches while they run")
    parser.add_argument("--probes", type=int, default=1000,
                        help="/v1/send requests per latency sample (the idle p99 of fewer is a few of its slowest)")
    parser.add_argument("--seconds", type=float, default=120.0, help="give up on the fan-out after this")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--database-icu-locale", default="",
                        help="PostgreSQL: make the run's database with this ICU locale (such as en-US) as its "
                             "collation, as a server initialized with a language's locale compares text")
    args = parse_with_quick(parser, contacts=1000, probes=30, seconds=30.0)
    if args.database_icu_locale and not args.database_url:
        parser.error("--database-icu-locale needs --database-url (a PostgreSQL server)")
    return args


async def seed_contacts(url: str, project_id: str, count: int) -> float:
    db = Database(url)
    started = time.perf_counter()
    table = Contact.__table__
    for first in range(0, count, CONTACT_BATCH):
        now = utcnow()
        rows = [{"id": new_id(), "project_id": project_id, "email": f"reader{i}@example.org", "subscribed": True,
                 "data": {"name": f"Reader {i}", "plan": "pro" if i % 3 else "free"}, "created_at": now,
                 "updated_at": now} for i in range(first, min(first + CONTACT_BATCH, count))]
        await db.write(insert_into(table, rows))
    await db.dispose()
    return time.perf_counter() - started


async def project_id_of(url: str) -> str:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        found = (await conn.execute(text("SELECT id FROM projects WHERE name = 'bench'"))).scalar_one()
    await engine.dispose()
    return found


async def latencies(session: aiohttp.ClientSession, base: str, sk: str, count: int, concurrency: int = 4,
                    until: asyncio.Event | None = None) -> list[float]:
    """`count` sends (or until `until` is set, at least 20), `concurrency` at a time; each one's seconds."""
    samples: list[float] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count and not (until is not None and until.is_set() and len(samples) >= 20):
            issued += 1
            body = {"to": f"probe{issued % 50}@example.org", "subject": "Receipt", "body": "<p>Thanks</p>",
                    "from": "shop@bench.example"}
            started = time.perf_counter()
            async with session.post(f"{base}/v1/send", json=body, headers={"Authorization": f"Bearer {sk}"}) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            samples.append(time.perf_counter() - started)

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) >= 2 else samples[0]


async def campaign_state(engine, campaign_id: str) -> tuple[bool, int]:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT fanout_done, recipient_count FROM campaigns WHERE id = :i"),
                                  {"i": campaign_id})).one()
    return bool(row[0]), row[1]


async def campaign_sent(engine, campaign_id: str) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM emails WHERE campaign_id = :i AND sent_at IS NOT NULL"),
                                   {"i": campaign_id})).scalar_one()


async def until_sending(engine, campaign_id: str, seconds: float) -> None:
    """Wait (bounded) for the campaign's first emails to go out: the transactional mail the probes queued
    goes first."""
    deadline = time.perf_counter() + seconds
    while await campaign_sent(engine, campaign_id) == 0:
        assert time.perf_counter() < deadline, "the campaign did not start dispatching"
        await asyncio.sleep(0.1)


async def database_server_pid(engine) -> int | None:
    """PostgreSQL's server process (the parent of this connection's backend) when it runs on this machine; None on
    SQLite, or when the server is elsewhere."""
    if engine.dialect.name != "postgresql":
        return None
    async with engine.connect() as conn:
        backend = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    try:
        if not Path(f"/proc/{backend}/cmdline").read_bytes().startswith(b"postgres"):
            return None
    except OSError:
        return None
    return process_table()[backend][0]


def cpu_now(server_pid: int, database_pid: int | None) -> dict[str, float]:
    """CPU seconds so far: the machine's busy time, and that of plunkd's processes, PostgreSQL's (when it runs here)
    and this process. Differences tell who took the cores."""
    own = os.times()
    return {"busy": machine_busy_seconds(), "plunkd": tree_cpu_seconds((server_pid,)),
            "database": tree_cpu_seconds((database_pid,)) if database_pid is not None else 0.0,
            "bench": own.user + own.system}


async def run_campaign(base: str, sk: str, url: str, args: argparse.Namespace, server_pid: int) -> dict[str, float]:
    engine = create_async_engine(url)
    results: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        await latencies(session, base, sk, 100)  # warm up
        results["idle_p99"] = p99(await latencies(session, base, sk, args.probes))
        headers = {"Authorization": f"Bearer {sk}"}
        async with session.post(f"{base}/campaigns", headers=headers, json={
                "subject": "Our news, {{name ?? friend}}", "body": "<p>Hello {{name}}, here is the news.</p>",
                "from": "news@bench.example", "audience": "ALL"}) as resp:
            campaign_id = (await resp.json())["data"]["id"]
        async with session.post(f"{base}/campaigns/{campaign_id}/send", headers=headers, json={}) as resp:
            assert resp.status == 200, await resp.text()
        database_pid = await database_server_pid(engine)
        started, cpu_before = time.perf_counter(), cpu_now(server_pid, database_pid)
        fanned_out = asyncio.Event()
        probe = asyncio.create_task(latencies(session, base, sk, args.probes * 100, until=fanned_out))
        deadline = started + args.seconds
        while time.perf_counter() < deadline:
            done, queued = await campaign_state(engine, campaign_id)
            if done:
                break
            await asyncio.sleep(0.02)
        results["queue_seconds"] = time.perf_counter() - started
        results.update({f"cpu_{name}": seconds - cpu_before[name]
                        for name, seconds in cpu_now(server_pid, database_pid).items()})
        results["database_here"] = float(database_pid is not None)
        fanned_out.set()
        during = await probe
        results["fanout_p99"] = p99(during)
        assert done and queued == args.contacts, f"fan-out incomplete: {queued} of {args.contacts} queued"
        # the probes' transactional mail goes out first, at the dispatcher's rate
        await until_sending(engine, campaign_id, args.seconds + (100 + args.probes + len(during)) / args.rate)
        sent_before = await campaign_sent(engine, campaign_id)
        results["dispatching_p99"] = p99(await latencies(session, base, sk, args.probes, concurrency=2))
        results["sent_during"] = await campaign_sent(engine, campaign_id) - sent_before
    await engine.dispose()
    return results


async def bare_insert_select(url: str, count: int) -> float:
    """The baseline: the rows' worth of one `INSERT … SELECT` from contacts into a plain table, committed."""
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE bench_bare (id VARCHAR(36) PRIMARY KEY, contact_id VARCHAR(36), "
                                "recipient VARCHAR(320), due_at VARCHAR(40))"))
    started = time.perf_counter()
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO bench_bare SELECT id, id, email, 'now' FROM contacts LIMIT :n"),
                           {"n": count})
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return elapsed


def run_all(data: str, url: str, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    port = free_port()
    env = plunkd_env(data, port, PLUNKD_DATABASE_URL=url, PLUNKD_DELIVERY_ENABLED="true",
                     PLUNKD_DELIVERY_RATE_PER_SECOND=str(args.rate), PLUNKD_DELIVERY_TRANSPORT="file")
    sk = create_project(data, env)
    asyncio.run(verify_offline(url, "bench", "bench.example"))
    seeded = asyncio.run(seed_contacts(url, asyncio.run(project_id_of(url)), args.contacts))
    print(f"seeded {args.contacts:,} contacts in {seeded:.1f} s")
    with server_process(["-m", "plunkd.cli", "serve"], port, env) as server:
        results = asyncio.run(run_campaign(f"http://127.0.0.1:{port}", sk, url, args, server.pid))
    return results, asyncio.run(bare_insert_select(url, args.contacts))


def main() -> None:
    args = parse_args()
    with temp_dir() as data, bench_database(args.database_url, data, args.database_icu_locale) as url:
        results, bare = run_all(data, url, args)
    backend = "PostgreSQL" if args.database_url else "SQLite"
    if args.database_icu_locale:
        backend += f", ICU {args.database_icu_locale}"
    queue = results["queue_seconds"]
    aim = "< 5 s" if args.database_url else "< 10 s"
    print(f"[{backend}] campaign to {args.contacts:,}: all outbox rows committed in {queue:.2f} s (aim {aim}); "
          f"bare INSERT … SELECT of {args.contacts:,} rows {bare:.2f} s; ratio {queue / bare:.1f}x")
    cores = os.cpu_count() or 1
    database = ""
    if args.database_url:
        database = (f"PostgreSQL's {results['cpu_database']:.1f}, " if results["database_here"]
                    else "PostgreSQL's not counted (its server is not on this machine), ")
    print(f"[{backend}] CPU seconds during the fan-out, of {cores * queue:.1f} ({cores} cores): plunkd's processes "
          f"{results['cpu_plunkd']:.1f}, {database}this load generator {results['cpu_bench']:.1f}; the machine idle "
          f"{cores * queue - results['cpu_busy']:.1f}")
    idle, during, dispatching = results["idle_p99"], results["fanout_p99"], results["dispatching_p99"]
    print(f"[{backend}] /v1/send p99: idle {idle * 1000:.1f} ms, during the fan-out {during * 1000:.1f} ms "
          f"(ratio {during / idle:.2f}, aim <= 2), while dispatching at {args.rate:g}/s {dispatching * 1000:.1f} ms "
          f"(ratio {dispatching / idle:.2f}, aim <= 2; {results['sent_during']:,.0f} campaign emails went out "
          "meanwhile)")


if __name__ == "__main__":
    main()
