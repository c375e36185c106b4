"""POST /v1/send under concurrent load vs a bare aiohttp handler doing one insert, same run.
The dispatcher is off: this measures acceptance (validation, contact upsert, MIME, durable commit).

    python -m bench.send [--count 3000] [--concurrency 32] [--database-url postgresql+asyncpg://…] [--processes N]
        [--quick]

The baseline is bench/bare_insert_server.py (SQLite: with an fsync per commit as plunkd, and beside it without).
"""

from __future__ import annotations

import asyncio

from bench.common import (
    bare_insert_servers,
    bench_database,
    create_project,
    free_port,
    http_bench_args,
    interleaved_rates,
    plunkd_env,
    report,
    server_process,
    temp_dir,
)
from bench.setup_sender import verify_offline


def send_body(i: int) -> dict:
    return {"to": f"user{i % 500}@example.org", "subject": "Your receipt {{name ?? friend}}",
            "body": f"<p>Hello {{{{name ?? there}}}}, thanks for order <b>{i}</b>.</p>", "from": "shop@bench.example"}


def main() -> None:
    args = http_bench_args(3000)
    with temp_dir() as data, bench_database(args.database_url, data) as url:
        port = free_port()
        env = plunkd_env(data, port, PLUNKD_DATABASE_URL=url, PLUNKD_SERVER_PROCESSES=str(args.processes))
        sk = create_project(data, env)
        asyncio.run(verify_offline(url, "bench", "bench.example"))
        with server_process(["-m", "plunkd.cli", "serve"], port, env), bare_insert_servers(url, data) as bare_urls:
            ours, bare, *unsynced = interleaved_rates(
                [(f"http://127.0.0.1:{port}/v1/send", {"Authorization": f"Bearer {sk}"}),
                 *((bare_url, {}) for bare_url in bare_urls)], send_body, args)
    report(f"POST /v1/send ({args.count} requests, {args.concurrency} concurrent, {args.processes} acceptor(s))",
           ours, bare, "req/s", 0.8, *unsynced)


if __name__ == "__main__":
    main()
