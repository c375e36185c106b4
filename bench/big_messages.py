"""Do large messages stall the server? Median latency of GET /health plus POST /v1/track, idle and
while 20 SMTP clients (another process) each send 10 MB messages over implicit TLS; prints both and
the ratio (the aim is at most 2.0).

    python -m bench.big_messages [--clients 20] [--megabytes 10] [--probes 40] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.synchronize
import statistics
import time

import aiohttp

from bench.common import create_project, free_port, parse_with_quick, plunkd_env, server_process, temp_dir
from bench.setup_sender import verify_offline
from bench.smtp import connect_tls


def big_message(megabytes: int) -> bytes:
    head = b"From: Shop <shop@bench.example>\r\nTo: big@example.org\r\nSubject: big\r\n\r\n"
    return head + (b"y" * 998 + b"\r\n") * (megabytes * 1024 * 1024 // 1000)


def send_big(port: int, password: str, clients: int, megabytes: int,
             started: multiprocessing.synchronize.Event) -> None:
    async def one() -> None:
        client = await connect_tls(port, password)
        await client.sendmail("bounce@bench.example", ["big@example.org"], big_message(megabytes))
        await client.quit()

    async def run() -> None:
        started.set()
        await asyncio.gather(*[one() for _ in range(clients)])

    asyncio.run(run())


async def probe(http_port: int, key: str, count: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as session:
        for i in range(count):
            started = time.perf_counter()
            async with session.get("/health") as resp:
                await resp.read()
            async with session.post("/v1/track", json={"email": f"p{i}@example.org", "event": "probe"},
                                    headers={"Authorization": f"Bearer {key}"}) as resp:
                await resp.read()
                assert resp.status == 200, await resp.text()
            times.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--megabytes", type=int, default=10)
    parser.add_argument("--probes", type=int, default=40)
    args = parse_with_quick(parser, clients=2, megabytes=1, probes=10)
    with temp_dir() as data:
        http_port, tls_port, starttls_port = free_port(), free_port(), free_port()
        url = f"sqlite+aiosqlite:///{data}/plunkd.sqlite3"
        env = plunkd_env(data, http_port, PLUNKD_DATABASE_URL=url, PLUNKD_SMTP_ENABLED="true",
                         PLUNKD_SMTP_HOST="127.0.0.1", PLUNKD_SMTP_TLS_PORT=str(tls_port),
                         PLUNKD_SMTP_STARTTLS_PORT=str(starttls_port),
                         PLUNKD_SMTP_MAX_MESSAGE_BYTES=str((args.megabytes + 1) * 1024 * 1024))
        sk = create_project(data, env)
        asyncio.run(verify_offline(url, "bench", "bench.example"))
        with server_process(["-m", "plunkd.cli", "serve"], tls_port, env):
            idle = statistics.median(asyncio.run(probe(http_port, sk, args.probes)))
            started = multiprocessing.Event()
            senders = multiprocessing.Process(target=send_big, args=(tls_port, sk, args.clients, args.megabytes,
                                                                      started))
            senders.start()
            started.wait(30)
            time.sleep(0.2)
            loaded_times = asyncio.run(probe(http_port, sk, args.probes))
            senders_running = senders.is_alive()
            senders.join(300)
            if senders.exitcode != 0:
                raise SystemExit(f"the SMTP senders failed (exit {senders.exitcode})")
    loaded = statistics.median(loaded_times)
    print(f"{args.clients} clients x {args.megabytes} MB over SMTP; /health + /v1/track median latency: "
          f"idle {idle * 1000:.2f} ms, under load {loaded * 1000:.2f} ms, ratio {loaded / idle:.2f} (aim <= 2.0)"
          + ("" if senders_running else "  [the senders finished before the probes did]"))


if __name__ == "__main__":
    main()
