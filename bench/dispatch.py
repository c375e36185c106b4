"""Dispatch throughput and rate accuracy, through the smtp transport into a bare aiosmtpd sink
running in its own process.

1. Rate limit off: N queued emails dispatched end to end (claim, headers, DKIM, send, record) vs
   N bare aiosmtplib sends into the same sink at the same concurrency, each of its 8 senders on one
   connection kept open (as the smtp transport keeps its own); prints the ratio. Both clocks stop when
   the sink has accepted the last message (its 250 to DATA).
2. Rate set to 14/s and 200/s: sends over a window (default 30 s) and the measured rate, which
   must be at most the set rate and no more than 2% below it.

    python -m bench.dispatch [--count 1000] [--window 30] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time

import aiosmtplib

from bench.common import free_port, parse_with_quick, report, server_process, temp_dir
from bench.setup_sender import verify_offline
from core.config import DeliveryConfig, SmarthostConfig
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.result import SendOutcome, SendResult
from delivery.transports import SmtpTransport
from pipeline.compose import MessageSpec
from pipeline.projects import create_project
from pipeline.submit import Submission, submit
from storage.db import Database

SPEC = MessageSpec("shop@bench.example", "Shop", "Your receipt", "<p>Thanks for your order.</p>" * 20)


class TimedTransport(SmtpTransport):
    """The smtp transport, noting when each message was handed to it (the moment the rate limits) and when the
    sink accepted each one."""

    def __init__(self, settings: SmarthostConfig) -> None:
        super().__init__(settings)
        self.handed_at: list[float] = []
        self.accepted_at: list[float] = []

    async def send(self, sender: str, recipients: list[str], message: bytes,
                   envelope_sender: str | None = None) -> SendResult:
        self.handed_at.append(time.monotonic())
        result = await super().send(sender, recipients, message, envelope_sender)
        if result.outcome == SendOutcome.SENT:
            self.accepted_at.append(time.monotonic())
        return result


async def queue(db: Database, project_id: str, count: int) -> None:
    batch = 200
    for start in range(0, count, batch):
        addresses = [f"user{i}@example.org" for i in range(start, min(count, start + batch))]
        await db.write(functools.partial(submit, submission=Submission(project_id, "api", "shop@bench.example",
                                                                       addresses, compose=SPEC.build)))


async def prepared_db(folder: str, count: int) -> tuple[Database, str]:
    url = f"sqlite+aiosqlite:///{folder}/plunkd.sqlite3"
    db = Database(url, sync_every_commit=False)  # as in the dispatcher process `plunkd serve` starts
    await db.migrate()
    issued = await db.write(lambda s: create_project(s, "bench", "shop@bench.example", "Shop"))
    await verify_offline(url, "bench", "bench.example")
    await queue(db, issued.project.id, count)
    return db, issued.project.id


async def dispatch(db: Database, transport: TimedTransport, rate: float, stop_after: float | None,
                   expected: int) -> None:
    settings = DeliveryConfig(rate_per_second=rate, concurrency=8, batch_size=100, poll_seconds=0.05)
    dispatcher = Dispatcher(db, transport, TokenBucket(rate), settings)
    task = asyncio.create_task(dispatcher.run())
    started = time.monotonic()
    while len(transport.accepted_at) < expected and (stop_after is None or time.monotonic() - started < stop_after):
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await dispatcher.drain()


async def unlimited(port: int, count: int) -> tuple[float, float]:
    with temp_dir() as folder:
        db, _ = await prepared_db(folder, count)
        transport = TimedTransport(SmarthostConfig(host="127.0.0.1", port=port))
        started = time.monotonic()
        await dispatch(db, transport, 0, 600, count)
        ours = len(transport.accepted_at) / (transport.accepted_at[-1] - started)
        await transport.close()
        await db.dispose()
    message = SPEC.build("user@example.org", {})
    pending = list(range(count))
    accepted_at: list[float] = []

    async def worker() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            while pending:
                pending.pop()
                await client.sendmail("shop@bench.example", ["user@example.org"], message)
                accepted_at.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*[worker() for _ in range(8)])
    bare = len(accepted_at) / (accepted_at[-1] - started)
    return ours, bare


async def limited(port: int, rate: float, window: float) -> float:
    count = int(rate * window * 1.2) + 50
    with temp_dir() as folder:
        db, _ = await prepared_db(folder, count)
        transport = TimedTransport(SmarthostConfig(host="127.0.0.1", port=port))
        await dispatch(db, transport, rate, window + 2, count)
        await transport.close()
        await db.dispose()
    times = transport.handed_at
    start = times[0] + 1.0
    inside = [t for t in times if start <= t < start + window]
    return len(inside) / window


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0)
    args = parse_with_quick(parser, count=100, window=1.0)
    port = free_port()
    with server_process(["bench/sink_server.py", str(port)], port):
        ours, bare = asyncio.run(unlimited(port, args.count))
        report(f"dispatch, rate limit off ({args.count} emails, 8 concurrent, smtp into a sink)", ours, bare,
               "msg/s")
        for rate in (14.0, 200.0):
            measured = asyncio.run(limited(port, rate, args.window))
            verdict = "OK" if rate * 0.98 <= measured <= rate else "OUT OF BOUNDS"
            print(f"dispatch at {rate:.0f}/s over {args.window:.0f} s: measured {measured:.2f}/s "
                  f"({measured / rate:.3f} of the set rate; must be 0.98-1.00) {verdict}")


if __name__ == "__main__":
    main()
