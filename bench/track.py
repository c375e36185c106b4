"""POST /v1/track under concurrent load vs a bare aiohttp handler doing one insert, same run.

    python -m bench.track [--count 4000] [--concurrency 32] [--database-url postgresql+asyncpg://…] [--processes N]
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


def track_body(i: int) -> dict:
    return {"email": f"user{i % 500}@example.com", "event": "page-view", "data": {"n": i, "plan": "pro"}}


def main() -> None:
    args = http_bench_args(4000)
    with temp_dir() as data, bench_database(args.database_url, data) as url:
        port = free_port()
        env = plunkd_env(data, port, PLUNKD_DATABASE_URL=url, PLUNKD_SERVER_PROCESSES=str(args.processes))
        sk = create_project(data, env)
        with server_process(["-m", "plunkd.cli", "serve"], port, env):
            ours, ok, errors = asyncio.run(http_load(
                f"http://127.0.0.1:{port}/v1/track", track_body, {"Authorization": f"Bearer {sk}"},
                args.concurrency, args.count, args.seconds))
        assert errors == 0, f"{errors} track requests failed"
        bare, *unsynced = bare_insert_rates(url, data, args, track_body)
    report(f"POST /v1/track ({args.count} requests, {args.concurrency} concurrent, {args.processes} acceptor(s))",
           ours, bare, "req/s", 0.8 if args.database_url else 1.0, *unsynced)


if __name__ == "__main__":
    main()
