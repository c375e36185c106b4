"""What every benchmark's PostgreSQL run shares (bench.common)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.common import DURABILITY_SETTINGS, fresh_database


async def shown(url: str) -> dict[str, str]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        values = {name: (await conn.execute(text(f"SHOW {name}"))).scalar_one() for name in DURABILITY_SETTINGS}
    await engine.dispose()
    return values


@pytest.mark.postgres_only
def test_a_run_on_a_server_that_does_not_make_commits_durable_says_so(database_url, capsys):
    """A benchmark's PostgreSQL figures are a production server's only when its commits are durable. A run on a
    server with fsync, synchronous_commit or full_page_writes off (as .ci/run sets the test server) warns on
    stderr, naming each; on a durable server it says nothing. Checked against what the server shows itself."""
    off = [f"{name}=off" for name, value in asyncio.run(shown(database_url)).items() if value == "off"]
    with fresh_database(database_url) as url:
        assert asyncio.run(shown(url)).keys() == set(DURABILITY_SETTINGS)
    err = capsys.readouterr().err
    if off:
        assert err.startswith(f"warning: this PostgreSQL server runs with {', '.join(off)} "), err
        assert "not comparable" in err
    else:
        assert err == ""
