"""What every benchmark's PostgreSQL run shares (bench.common)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.common import DURABILITY_SETTINGS, fresh_database


async def off_in_pg_settings(url: str) -> list[str]:
    """The durability settings the server has off, read from pg_settings (not through the SHOWs the bench runs)."""
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        off = set((await conn.execute(text("SELECT name FROM pg_settings WHERE setting = 'off'"))).scalars())
    await engine.dispose()
    return [f"{name}=off" for name in DURABILITY_SETTINGS if name in off]


@pytest.mark.postgres_only
def test_a_run_on_a_server_that_does_not_make_commits_durable_says_so(database_url, capsys):
    """A benchmark's PostgreSQL figures are a production server's only when its commits are durable. A run on a
    server with fsync, synchronous_commit or full_page_writes off (as .ci/run sets the test server) warns on
    stderr, naming each; on a durable server it says nothing. Checked against what the server reports itself."""
    off = asyncio.run(off_in_pg_settings(database_url))
    with fresh_database(database_url):
        pass
    err = capsys.readouterr().err
    if off:
        assert err.startswith(f"warning: this PostgreSQL server runs with {', '.join(off)} "), err
        assert "not comparable" in err
    else:
        assert err == ""
