"""Several plunkd nodes on one PostgreSQL, on this machine: acceptance (`/v1/send` and SMTP) with 1, 2 and 3
(`--nodes`) nodes, printed as a scaling ratio against one node, then the send rate they hold together against
the rate they were set to (smtp transport into a bare aiosmtpd sink in this process).

    python -m bench.cluster --database-url postgresql+asyncpg://plunkd:plunkd@127.0.0.1:5432/postgres
                            [--seconds 6] [--rate 50] [--hold-seconds 20] [--nodes 3] [--quick]

Each node is a `plunkd serve` process (its dispatcher off while acceptance is measured); the load clients
spread their connections over the nodes. On a 2-core machine the clients, the nodes and PostgreSQL share
the same two cores, so more nodes cannot add capacity here: the scaling ratio shows what a node costs,
not what more machines would give.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator

import aiohttp
from aiosmtpd.controller import Controller

from bench.common import (
    create_project,
    free_port,
    fresh_database,
    parse_with_quick,
    plunkd_env,
    server_process,
    temp_dir,
)
from bench.setup_sender import verify_offline
from bench.smtp import connect_tls, message


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True, help="a PostgreSQL server (a fresh database is made)")
    parser.add_argument("--seconds", type=float, default=6.0, help="load per measurement")
    parser.add_argument("--rate", type=float, default=50.0, help="the shared send rate to hold")
    parser.add_argument("--hold-seconds", type=float, default=20.0)
    parser.add_argument("--nodes", type=int, default=3, help="acceptance with 1 to this many nodes; as many send")
    return parse_with_quick(parser, seconds=1.0, hold_seconds=3.0, nodes=2)


@contextlib.contextmanager
def nodes(count: int, url: str, data: str, **extra: str) -> Iterator[list[dict[str, int]]]:
    """`count` nodes on the database at `url`; yields each one's ports."""
    with contextlib.ExitStack() as stack:
        started = []
        for index in range(count):
            ports = {"http": free_port(), "tls": free_port(), "starttls": free_port()}
            env = plunkd_env(f"{data}/node{index}", ports["http"], PLUNKD_DATABASE_URL=url,
                             PLUNKD_SMTP_ENABLED="true", PLUNKD_SMTP_HOST="127.0.0.1",
                             PLUNKD_SMTP_TLS_PORT=str(ports["tls"]), PLUNKD_SMTP_STARTTLS_PORT=str(ports["starttls"]),
                             **extra)
            stack.enter_context(server_process(["-m", "plunkd.cli", "serve"], ports["http"], env))
            started.append(ports)
        yield started


async def api_load(ports: list[dict[str, int]], key: str, seconds: float, concurrency: int = 24) -> float:
    """/v1/send, one recipient each, workers spread over the nodes: accepted per second."""
    sent = 0
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker(index: int) -> None:
            nonlocal sent
            url = f"http://127.0.0.1:{ports[index % len(ports)]['http']}/v1/send"
            while time.monotonic() < deadline:
                body = {"to": f"user{sent % 500}@example.org", "subject": "Hi", "body": "Hello", "from":
                        "shop@bench.example"}
                async with session.post(url, json=body, headers=headers) as reply:
                    await reply.read()
                    assert reply.status == 200, reply.status
                    sent += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sent / (time.monotonic() - started)


async def smtp_load(ports: list[dict[str, int]], key: str, seconds: float, sessions: int = 12) -> float:
    """2 KB messages back to back over implicit TLS, sessions spread over the nodes: accepted per second."""
    sent = 0
    deadline = time.monotonic() + seconds
    bodies = [message(2048, i) for i in range(64)]

    async def session(index: int) -> None:
        nonlocal sent
        client = await connect_tls(ports[index % len(ports)]["tls"], key)
        while time.monotonic() < deadline:
            await client.sendmail("bounce@bench.example", [f"user{sent % 500}@example.org"], bodies[sent % 64])
            sent += 1
        await client.quit()

    started = time.monotonic()
    await asyncio.gather(*(session(i) for i in range(sessions)))
    return sent / (time.monotonic() - started)


class Sink:
    def __init__(self) -> None:
        self.arrivals: list[float] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.arrivals.append(time.monotonic())
        return "250 2.0.0 OK"


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    most, first = 0, 0
    for last, moment in enumerate(times):
        while moment - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def prepared(url: str, data: str) -> str:
    """A project with a verified sending domain in the database at `url`; its secret key."""
    key = create_project(data, {"PLUNKD_DATABASE_URL": url, "PLUNKD_SERVER_DATA_DIR": data})
    asyncio.run(verify_offline(url, "bench", "bench.example"))
    return key


def main() -> None:
    args = parse_args()
    rates: dict[int, tuple[float, float]] = {}
    for count in range(1, args.nodes + 1):
        with temp_dir() as data, fresh_database(args.database_url) as url:
            key = prepared(url, data)
            with nodes(count, url, data) as ports:
                api = asyncio.run(api_load(ports, key, args.seconds))
                smtp = asyncio.run(smtp_load(ports, key, args.seconds))
        rates[count] = (api, smtp)
        one_api, one_smtp = rates[1]
        print(f"{count} node{'s' if count > 1 else ' '}: /v1/send {api:,.0f}/s (ratio {api / one_api:.2f} vs 1 node), "
              f"SMTP {smtp:,.0f}/s (ratio {smtp / one_smtp:.2f})")

    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        with temp_dir() as data, fresh_database(args.database_url) as url:
            key = prepared(url, data)
            queued = int(args.rate * (args.hold_seconds + 5))
            delivery = {"PLUNKD_DELIVERY_ENABLED": "true", "PLUNKD_DELIVERY_TRANSPORT": "smtp",
                        "PLUNKD_DELIVERY_SMTP_HOST": "127.0.0.1", "PLUNKD_DELIVERY_SMTP_PORT": str(controller.port),
                        "PLUNKD_DELIVERY_RATE_PER_SECOND": str(args.rate)}
            with nodes(args.nodes, url, data, **delivery) as ports:
                asyncio.run(api_load(ports, key, queued / 200.0))  # queue well ahead of the rate
                sending_by = time.monotonic() + 30  # the dispatchers start late on a loaded machine
                while not sink.arrivals and time.monotonic() < sending_by:
                    time.sleep(0.1)
                time.sleep(2.0)
                start = time.monotonic()
                time.sleep(args.hold_seconds)
                window = [moment for moment in sink.arrivals if start <= moment < start + args.hold_seconds]
    finally:
        controller.stop()
    held = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else 0.0
    print(f"{args.nodes} nodes sending: held {held:.2f}/s of a shared {args.rate:.0f}/s "
          f"(ratio {held / args.rate:.3f}), busiest second {busiest_second(window)} sends, "
          f"over {args.hold_seconds:.0f} s")


if __name__ == "__main__":
    main()
