"""POST /v1/track under concurrent load vs a bare aiohttp handler doing one insert, same run.

    python -m bench.track [--count 4000] [--concurrency 32] [--database-url postgresql+asyncpg://…]
"""

from __future__ import annotations

import argparse
import asyncio

from bench.common import create_project, free_port, http_load, plunkd_env, report, server_process, temp_dir


def track_body(i: int) -> dict:
    return {"email": f"user{i % 500}@example.com", "event": "page-view", "data": {"n": i, "plan": "pro"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()

    with temp_dir() as data:
        port = free_port()
        env = plunkd_env(data, port, **({"PLUNKD_DATABASE_URL": args.database_url} if args.database_url else {}))
        sk = create_project(data, env)
        with server_process(["-m", "plunkd.cli", "serve"], port, env):
            ours, ok, errors = asyncio.run(http_load(
                f"http://127.0.0.1:{port}/v1/track", track_body, {"Authorization": f"Bearer {sk}"},
                args.concurrency, args.count, args.seconds))
        assert errors == 0, f"{errors} track requests failed"

        port = free_port()
        url = args.database_url or f"sqlite+aiosqlite:///{data}/bare.sqlite3"
        with server_process(["bench/bare_insert_server.py", url, str(port)], port):
            bare, _, bare_errors = asyncio.run(http_load(
                f"http://127.0.0.1:{port}/insert", track_body, {}, args.concurrency, args.count, args.seconds))
        assert bare_errors == 0
    report(f"POST /v1/track ({args.count} requests, {args.concurrency} concurrent)", ours, bare, "req/s", 0.8)


if __name__ == "__main__":
    main()
