"""The shared API limit's flushes: the background one and a forced one may overlap. The database is stood in
for by a dict here, since only a controlled interleaving (a slow first read) shows the race; the real
upsert is tested across two nodes in test_cluster.py."""

from __future__ import annotations

import asyncio

from api.ratelimit import SharedWindowLimiter


async def test_a_slow_flush_finishing_last_does_not_bring_back_an_older_total():
    shared: dict[tuple[str, int], int] = {}
    first_call = asyncio.Event()
    release_first = asyncio.Event()

    async def sync(counts, _prune_before):
        for key, used in counts.items():
            shared[key] = shared.get(key, 0) + used
        totals = dict(shared)
        if not first_call.is_set():
            first_call.set()
            await release_first.wait()  # the first read answers only after the second flush is done
        return totals

    limiter = SharedWindowLimiter(10, sync)
    assert limiter.take("p").allowed
    slow = asyncio.create_task(limiter.flush())
    await first_call.wait()
    for _ in range(3):
        assert limiter.take("p").allowed
    forced = asyncio.create_task(limiter.flush())
    await asyncio.sleep(0.05)
    release_first.set()
    await asyncio.gather(slow, forced)
    assert sum(shared.values()) == 4
    assert limiter.take("p").remaining == 10 - 5, "the node knows all four requests before this one"
