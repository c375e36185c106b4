"""Messages/s the SMTP relay accepts (AUTH, checks, contact upsert, email + outbox records, durable
commit before 250) vs a bare aiosmtpd handler that answers 250 without work, both over implicit TLS
on loopback, in the same run. Sessions 1 and 20, messages of 2 KB and 100 KB, a new connection per
message and messages back to back.

    python -m bench.smtp [--seconds 6] [--max-messages 20000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ssl
import time

import aiosmtplib

from bench.common import create_project, free_port, parse_with_quick, plunkd_env, server_process, temp_dir
from bench.setup_sender import verify_offline


def message(size: int, index: int) -> bytes:
    head = (f"From: Shop <shop@bench.example>\r\nTo: user{index % 500}@example.org\r\n"
            f"Subject: Receipt {index}\r\nContent-Type: text/plain\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


@functools.cache
def insecure_client_tls() -> ssl.SSLContext:
    """The relay's self-signed certificate: encrypt, but do not verify (loopback benchmark). Built once:
    a context costs ~36 ms of CPU, which per connection would make the client the bottleneck."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def connect_tls(port: int, password: str | None) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=True, tls_context=insecure_client_tls(),
                             timeout=120)
    await client.connect()
    if password:
        await client.login("plunk", password)
    return client


async def load(port: int, password: str | None, sessions: int, size: int, reconnect: bool, seconds: float,
               max_messages: int) -> float:
    bodies = [message(size, i) for i in range(64)]
    sent = 0
    deadline = time.monotonic() + seconds
    connect = functools.partial(connect_tls, port, password)

    async def session(worker: int) -> None:
        nonlocal sent
        kept = None if reconnect else await connect()
        while time.monotonic() < deadline and sent < max_messages:
            client = kept or await connect()
            body = bodies[(sent + worker) % len(bodies)]
            await client.sendmail("bounce@bench.example", [f"user{(sent + worker) % 500}@example.org"], body)
            sent += 1
            if reconnect:
                await client.quit()
        if kept is not None:
            await kept.quit()

    started = time.monotonic()
    await asyncio.gather(*[session(i) for i in range(sessions)])
    return sent / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--max-messages", type=int, default=20000)
    args = parse_with_quick(parser, seconds=0.3, max_messages=100)
    with temp_dir() as data:
        http_port, tls_port, starttls_port, sink_port = free_port(), free_port(), free_port(), free_port()
        url = f"sqlite+aiosqlite:///{data}/plunkd.sqlite3"
        env = plunkd_env(data, http_port, PLUNKD_DATABASE_URL=url, PLUNKD_SMTP_ENABLED="true",
                         PLUNKD_SMTP_HOST="127.0.0.1", PLUNKD_SMTP_TLS_PORT=str(tls_port),
                         PLUNKD_SMTP_STARTTLS_PORT=str(starttls_port))
        sk = create_project(data, env)
        asyncio.run(verify_offline(url, "bench", "bench.example"))
        results = []
        with server_process(["-m", "plunkd.cli", "serve"], tls_port, env):
            cert, key = f"{data}/tls/relay-cert.pem", f"{data}/tls/relay-key.pem"
            with server_process(["bench/sink_server.py", str(sink_port), "--tls", cert, key], sink_port):
                for size in (2_000, 100_000):
                    for sessions in (1, 20):
                        for reconnect in (True, False):
                            ours = asyncio.run(load(tls_port, sk, sessions, size, reconnect, args.seconds,
                                                    args.max_messages))
                            bare = asyncio.run(load(sink_port, None, sessions, size, reconnect, args.seconds,
                                                    args.max_messages))
                            results.append((size, sessions, reconnect, ours, bare))
    print(f"{'size':>7} {'sessions':>8} {'mode':>14} {'plunkd msg/s':>13} {'bare msg/s':>11} {'ratio':>6}")
    for size, sessions, reconnect, ours, bare in results:
        mode = "new conn/msg" if reconnect else "back to back"
        print(f"{size // 1000:>5}KB {sessions:>8} {mode:>14} {ours:>13,.0f} {bare:>11,.0f} {ours / bare:>6.2f}")
    print("aim: >= 0.45 at 2 KB, 20 sessions, back to back (Postfix level)")


if __name__ == "__main__":
    main()
