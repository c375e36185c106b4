"""POST /v1/track under concurrent load vs a bare aiohttp handler doing one insert, same run.

    python -m bench.track [--count 4000] [--concurrency 32] [--database-url postgresql+asyncpg://…]
"""

from __future__ import annotations

import asyncio

from bench.common import (
    bare_insert_rate,
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
    with temp_dir() as data:
        port = free_port()
        env = plunkd_env(data, port, **({"PLUNKD_DATABASE_URL": args.database_url} if args.database_url else {}))
        sk = create_project(data, env)
        with server_process(["-m", "plunkd.cli", "serve"], port, env):
            ours, ok, errors = asyncio.run(http_load(
                f"http://127.0.0.1:{port}/v1/track", track_body, {"Authorization": f"Bearer {sk}"},
                args.concurrency, args.count, args.seconds))
        assert errors == 0, f"{errors} track requests failed"
        bare = bare_insert_rate(data, args, track_body)
    report(f"POST /v1/track ({args.count} requests, {args.concurrency} concurrent)", ours, bare, "req/s", 0.8)


if __name__ == "__main__":
    main()
