"""POST /v1/track under concurrent load vs a bare aiohttp handler doing one insert, same run.

    python -m bench.track [--count 4000] [--concurrency 32] [--database-url postgresql+asyncpg://…] [--processes N]
        [--quick]

The baseline is bench/bare_insert_server.py (SQLite: with an fsync per commit as plunkd, and beside it without).
"""

from __future__ import annotations

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


def track_body(i: int) -> dict:
    return {"email": f"user{i % 500}@example.com", "event": "page-view", "data": {"n": i, "plan": "pro"}}


def main() -> None:
    args = http_bench_args(4000)
    with temp_dir() as data, bench_database(args.database_url, data) as url:
        port = free_port()
        env = plunkd_env(data, port, PLUNKD_DATABASE_URL=url, PLUNKD_SERVER_PROCESSES=str(args.processes))
        sk = create_project(data, env)
        with server_process(["-m", "plunkd.cli", "serve"], port, env), bare_insert_servers(url, data) as bare_urls:
            ours, bare, *unsynced = interleaved_rates(
                [(f"http://127.0.0.1:{port}/v1/track", {"Authorization": f"Bearer {sk}"}),
                 *((bare_url, {}) for bare_url in bare_urls)], track_body, args)
    report(f"POST /v1/track ({args.count} requests, {args.concurrency} concurrent, {args.processes} acceptor(s))",
           ours, bare, "req/s", 0.8 if args.database_url else 1.0, *unsynced)


if __name__ == "__main__":
    main()
