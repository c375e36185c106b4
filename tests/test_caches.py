"""The caches on every request's path (a key's project; a project's workflow triggers and webhook listeners): a
change heard while a lookup is reading the database must not leave that lookup's (possibly older) answer
cached for the cache's lifetime."""

from __future__ import annotations

import asyncio

from sqlalchemy.orm import Session

import pipeline.keys as keys_module
from api.context import KEYS
from pipeline.projects import rotate_keys
from storage.interest import ProjectInterest


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



def test_listeners_changed_during_a_load_are_loaded_again_at_the_next_event():
    interest: ProjectInterest[frozenset[str]] = ProjectInterest("test_triggers", ttl=60)
    session = Session()
    loads: list[str] = []

    def load_racing_a_commit() -> frozenset[str]:
        loads.append("read")
        interest.forget("p1")  # a workflow made meanwhile commits (after_commit forgets the project)
        return frozenset()  # what the read saw: no trigger yet

    assert interest.get(session, "p1", load_racing_a_commit) == frozenset()
    assert interest.get(session, "p1", lambda: frozenset({"came-back"})) == frozenset({"came-back"})
    assert interest.get(session, "p1", lambda: frozenset()) == frozenset({"came-back"})  # cached: no change since
    assert loads == ["read"]


async def test_concurrent_requests_with_an_uncached_key_read_it_once(api, monkeypatch):
    """Every TTL (5 s) the key's answer expires, and a burst of concurrent requests all missed it: 32 identical
    reads where one would do."""
    reads: list[str] = []
    find = keys_module.find_project_by_key
    monkeypatch.setattr(keys_module, "find_project_by_key",
                        lambda session, key: reads.append(key) or find(session, key))
    api.client.app[KEYS].forget()
    statuses = await asyncio.gather(*[contacts_status(api, api.sk) for _ in range(16)],
                                    contacts_status(api, "sk_" + "0" * 64))
    assert statuses == [200] * 16 + [401]
    assert sorted(reads) == sorted([api.sk, "sk_" + "0" * 64])


async def test_a_lookup_after_a_change_does_not_share_a_read_begun_before_it(api, monkeypatch):
    keys = api.client.app[KEYS]
    keys.forget()
    answered = asyncio.Event()
    read = api.db.read

    async def slow_read(fn, *args):
        found = await read(fn, *args)  # read before the change
        await answered.wait()  # answered after it
        return found

    monkeypatch.setattr(keys.db, "read", slow_read)
    before = asyncio.create_task(keys.lookup(api.sk))
    await asyncio.sleep(0.2)  # its read is done and waits to answer
    await api.db.write(lambda s: rotate_keys(s, api.project_id))
    keys.forget_project(api.project_id)  # the change is heard
    after = asyncio.create_task(keys.lookup(api.sk))
    await asyncio.sleep(0)
    answered.set()
    assert (await before) is not None  # read before the change
    assert (await after) is None, "the rotated key still worked: the lookup took the read begun before the change"
