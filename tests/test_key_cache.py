"""The key cache every API request and SMTP AUTH asks: a change of keys heard while a lookup is reading the
database must not leave that lookup's (possibly older) answer cached for the cache's lifetime."""

from __future__ import annotations

import asyncio

from api.context import KEYS
from pipeline.projects import rotate_keys


async def contacts_status(api, key: str) -> int:
    reply = await api.client.get("/contacts", headers=api.auth(key))
    return reply.status


async def test_a_change_heard_during_a_lookup_keeps_that_lookups_answer_out_of_the_cache(api):
    keys = api.client.app[KEYS]
    keys.forget()
    reading = asyncio.create_task(keys.lookup(api.sk))
    await asyncio.sleep(0)  # the lookup now waits on the database's read
    keys.forget_project(api.project_id)  # as NOTIFY (another node) or a local change would
    assert (await reading).project_id == api.project_id  # the key was still valid when it was read
    await api.db.write(lambda s: rotate_keys(s, api.project_id))  # its NOTIFY is what the forget stood for
    assert await contacts_status(api, api.sk) == 401  # a cached answer would have said 200 for 5 s

