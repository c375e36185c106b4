"""A webhook delivery survives `kill -9` of the process posting it: a real `plunkd serve` (the sender runs in
the dispatcher child) posts an event to a real receiver, which holds the request while the test kills the
child; the supervisor restarts it and the new sender posts the delivery again once its lease runs out, with
the same webhook-id and a valid signature, and records it. SQLite, or PostgreSQL with
PLUNKD_TEST_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from tests.servers import served_plunkd
from tests.test_cli_and_config import plunkd
from tests.test_processes import dispatcher_child
from tests.webhook_receiver import Receiver, start_receiver

LEASE_SECONDS = 3.0


async def eventually(check, seconds: float, what: str, log=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    tail = f"\n--- server log ---\n{log.read_text()[-5000:]}" if log is not None else ""
    raise AssertionError(f"timed out waiting for {what}{tail}")


@pytest.mark.long
async def test_kill_9_while_posting_then_redelivered_after_the_lease_with_the_same_id(tmp_path, database_url):
    released = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        await released.wait()
        return web.Response(status=200)

    receiver = Receiver(replies=[hold])
    runner = await start_receiver(receiver)
    env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_SMTP_ENABLED": "false",
           "PLUNKD_WEBHOOKS_ALLOW_PRIVATE_TARGETS": "true", "PLUNKD_WEBHOOKS_LEASE_SECONDS": str(LEASE_SECONDS),
           "PLUNKD_WEBHOOKS_TIMEOUT_SECONDS": "2.5", "PLUNKD_WEBHOOKS_POLL_SECONDS": "0.1"}
    made = plunkd(tmp_path, "project", "create", "--name", "p", "--from-email", "hello@example.com", env=env)
    assert made.returncode == 0, made.stderr
    key = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))
    auth = {"Authorization": f"Bearer {key}"}
    try:
        with served_plunkd(tmp_path, env, wait_for=None) as server:
            base, proc, log_path = server.base, server.proc, server.log_path
            async with aiohttp.ClientSession() as http:
                async def api_up():
                    try:
                        async with http.get(f"{base}/health") as reply:
                            return reply.status == 200
                    except aiohttp.ClientError:
                        return False

                await eventually(api_up, 30, "the API", log_path)
                child = await eventually(lambda: _now(dispatcher_child(proc)), 30, "the dispatcher process", log_path)
                async with http.post(f"{base}/webhooks", headers=auth,
                                     json={"url": receiver.url(), "events": ["signed-up"]}) as reply:
                    assert reply.status == 201, await reply.text()
                    hook = (await reply.json())["data"]
                receiver.secrets.append(hook["secret"])
                async with http.post(f"{base}/v1/track", headers=auth,
                                     json={"email": "ann@example.org", "event": "signed-up"}) as reply:
                    assert reply.status == 200, await reply.text()

                assert len(await receiver.wait_for(1, 30)) == 1, log_path.read_text()[-3000:]
                os.kill(child, signal.SIGKILL)
                killed_at = time.monotonic()
                await eventually(lambda: _now((pid := dispatcher_child(proc)) and pid != child), 30,
                                 "a new dispatcher process", log_path)

                async def delivered():
                    async with http.get(f"{base}/webhooks/{hook['id']}/deliveries", headers=auth) as reply:
                        items = (await reply.json())["data"]["items"]
                    return items if items and items[0]["status"] == "DELIVERED" else None

                [item] = await eventually(delivered, 30, "the delivery to be recorded", log_path)
                await asyncio.sleep(0.5)
    finally:
        released.set()
        await runner.cleanup()
    first, second = receiver.received
    assert first.webhook_id == second.webhook_id == item["id"], "the same webhook-id: the receiver can dedupe"
    assert first.body == second.body and first.verified[hook["secret"]] and second.verified[hook["secret"]]
    assert second.at - killed_at >= LEASE_SECONDS - 1.0, "posted again only once the dead sender's lease ran out"
    assert item["attempts"] == 1 and [a["status"] for a in item["attemptLog"]] == [200]


async def _now(value):
    return value
