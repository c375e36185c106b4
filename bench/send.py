"""POST /v1/send under concurrent load vs a bare aiohttp handler doing one insert, same run.
The dispatcher is off: this measures acceptance (validation, contact upsert, MIME, durable commit).

    python -m bench.send [--count 3000] [--concurrency 32] [--database-url postgresql+asyncpg://…] [--processes N]
        [--quick]

The baseline is bench/bare_insert_server.py (SQLite: with an fsync per commit as plunkd, and beside it without).
"""

from __future__ import annotations

import asyncio

from bench.common import (
    bare_insert_rates,
    bench_database,
    create_project,
    free_port,
    http_bench_args,
    http_load,
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
        with server_process(["-m", "plunkd.cli", "serve"], port, env):
            ours, _, errors = asyncio.run(http_load(f"http://127.0.0.1:{port}/v1/send", send_body,
                                                    {"Authorization": f"Bearer {sk}"}, args.concurrency,
                                                    args.count, args.seconds))
        assert errors == 0, f"{errors} send requests failed"
        bare, *unsynced = bare_insert_rates(url, data, args, send_body)
    report(f"POST /v1/send ({args.count} requests, {args.concurrency} concurrent, {args.processes} acceptor(s))",
           ours, bare, "req/s", 0.8, *unsynced)


if __name__ == "__main__":
    main()
