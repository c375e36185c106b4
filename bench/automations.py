"""10,000 workflow runs (a 5 s delay, then a send step) started at the same moment: how late each run leaves
its delay and sends after the delay's end (p50/p99; the aim is p99 < 1 s), and the steps the scheduler
executes per second against a bare claim-and-update loop on the same table (claim a batch of due runs,
write each one's next position and history, commit). One run, ratio printed.

    python -m bench.automations [--runs 10000] [--delay 5] [--database-url postgresql+asyncpg://…] [--quick]

The scheduler is `automation.scheduler.WorkflowScheduler` in this process, on a fresh SQLite file (or a
throwaway PostgreSQL database on `--database-url`'s server); runs are written straight into the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from datetime import datetime, timedelta

from sqlalchemy import JSON, bindparam, select, update

from automation.scheduler import BATCH, PARALLEL_POSTGRES, WorkflowScheduler
from bench.campaign import seed_contacts
from bench.common import bench_database, insert_into, parse_with_quick, temp_dir
from pipeline.domains import add_domain, save_check
from pipeline.projects import create_project
from storage.db import Database
from storage.models import Contact, Template, Workflow, new_id, utcnow
from storage.workflows import RUNS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--delay", type=int, default=5)
    parser.add_argument("--batch", type=int, default=BATCH, help="runs per transaction, ours and the bare loop's")
    parser.add_argument("--database-url", default="")
    return parse_with_quick(parser, runs=300, delay=1)


async def setup(db: Database, runs: int, delay: int) -> tuple[str, str]:
    from bench.common import use_bench_key

    use_bench_key()
    await db.migrate()
    issued = await db.write(lambda s: create_project(s, "bench", "news@example.com", "Bench"))
    project_id = issued.project.id
    added = await db.write(lambda s: add_domain(s, project_id, "example.com", "plunkd"))
    await db.write(lambda s: save_check(s, added.id, {"verified": True, "method": "benchmark"}))
    await seed_contacts(db.url, project_id, runs)
    now = utcnow()

    def workflow(session) -> str:
        template = Template(project_id=project_id, name="t", subject="Hi {{name}}", body="<p>Hello {{name}}</p>",
                            type="TRANSACTIONAL", style="HTML", created_at=now, updated_at=now)
        session.add(template)
        session.flush()
        flow = Workflow(project_id=project_id, name="bench", exclude_events=[], enabled=True, run_once=False,
                        kind="WORKFLOW", created_at=now, updated_at=now, definition={"steps": [
                            {"id": "wait", "type": "delay", "seconds": delay, "next": "mail"},
                            {"id": "mail", "type": "send", "template": template.id}]})
        session.add(flow)
        session.flush()
        return flow.id

    return project_id, await db.write(workflow)


async def start_runs(db: Database, project_id: str, workflow_id: str, step: str) -> None:
    """One run per contact, ACTIVE at `step`, all due now."""
    table = Contact.__table__
    contacts = await db.read(lambda s: list(s.connection().execute(
        select(table.c.id).where(table.c.project_id == project_id)).scalars()))
    now = utcnow()
    for first in range(0, len(contacts), 5000):
        rows = []
        for contact_id in contacts[first:first + 5000]:
            run_id = new_id()
            rows.append({"id": run_id, "workflow_id": workflow_id, "project_id": project_id, "contact_id": contact_id,
                         "status": "ACTIVE", "step_id": step, "due_at": now, "waiting_for": None, "once_key": run_id,
                         "trigger_event_id": None, "context": {}, "history": [], "emails_sent": 0, "created_at": now,
                         "updated_at": now})
        await db.write(insert_into(RUNS, rows))


_BARE_UPDATE = (update(RUNS).where(RUNS.c.id == bindparam("run_id"))
                .values(status=bindparam("status"), due_at=bindparam("due_at"),
                        history=bindparam("history", type_=JSON()), updated_at=bindparam("updated_at")))


async def bare_loop(db: Database, total: int, size: int) -> float:
    """Claim due runs a batch at a time and put each one to WAIT at its delay (no step logic): steps per second."""
    def batch(session) -> int:
        now = utcnow()
        stmt = (select(RUNS.c.id, RUNS.c.history).where(RUNS.c.status == "ACTIVE", RUNS.c.due_at <= now)
                .order_by(RUNS.c.due_at).limit(size))
        if db.is_postgres:
            stmt = stmt.with_for_update(skip_locked=True)
        rows = session.connection().execute(stmt).all()
        if rows:
            session.connection().execute(_BARE_UPDATE, [
                {"run_id": row.id, "status": "WAITING", "due_at": now + timedelta(hours=1), "updated_at": now,
                 "history": [*row.history, {"step": "wait", "type": "delay", "at": now.isoformat(), "outcome": "x"}]}
                for row in rows])
        return len(rows)

    started = time.perf_counter()
    done = 0
    parallel = PARALLEL_POSTGRES if db.is_postgres else 1  # as many transactions at once as the scheduler runs
    while done < total:
        moved = sum(await asyncio.gather(*(db.write(batch, alone=True) for _ in range(parallel))))
        if not moved:
            break
        done += moved
    return done / (time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(url: str, runs: int, delay: int, batch: int) -> None:
    db = Database(url, sync_every_commit=False)  # as in the dispatcher process, where the scheduler runs
    db.writer.start()
    try:
        project_id, workflow_id = await setup(db, runs, delay)
        # the baseline on the same table, then its runs are gone
        await start_runs(db, project_id, workflow_id, "wait")
        bare = await bare_loop(db, runs, batch)
        await db.write(lambda s: s.connection().execute(RUNS.delete()))

        scheduler = WorkflowScheduler(db, None, lambda: None, poll_seconds=0.2, batch=batch)
        await start_runs(db, project_id, workflow_id, "wait")
        started = time.perf_counter()
        task = asyncio.create_task(scheduler.run())
        first_phase = None
        deadline = started + delay + 120
        try:
            # progress from the scheduler's own step count: polling the table would compete with it
            # each run: the delay begins (a step), then at its end the delay is over and the send runs (two)
            while scheduler.steps < 3 * runs and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
                if first_phase is None and scheduler.steps >= runs:
                    first_phase = time.perf_counter() - started
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        total = time.perf_counter() - started
        histories = await db.read(lambda s: list(s.connection().execute(select(RUNS.c.history)).scalars()))
    finally:
        await db.dispose()
    late = []
    for history in histories:
        fired = next(entry for entry in history if entry["outcome"] == "delayed")
        late.append((datetime.fromisoformat(fired["at"]) - datetime.fromisoformat(fired["due"])).total_seconds())
    rate = runs / first_phase if first_phase else float("nan")
    print(f"{runs} runs (delay {delay} s → send), {'PostgreSQL' if db.is_postgres else 'SQLite'}: all done in "
          f"{total:.1f} s")
    print(f"firing step lateness: p50 {statistics.median(late) * 1000:.0f} ms, p99 {percentile(late, 0.99) * 1000:.0f} "
          f"ms, max {max(late) * 1000:.0f} ms  (aim p99 < 1000 ms)")
    print(f"delay steps executed: plunkd {rate:,.0f} steps/s, bare claim-and-update {bare:,.0f} steps/s, "
          f"ratio {rate / bare:.2f}")
    print(f"all steps (delay begun, delay over, send: {3 * runs}): {3 * runs / (total - delay):,.0f} steps/s over the "
          f"time not spent waiting out the delay")


def main() -> None:
    args = parse_args()
    with temp_dir() as data, bench_database(args.database_url, data) as url:
        asyncio.run(measure(url, args.runs, args.delay, args.batch))


if __name__ == "__main__":
    main()
