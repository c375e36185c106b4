"""Where outbound webhooks may go (issue 19, points 3, 4 and 9), on the real app and database (SQLite, or
PostgreSQL with PLUNKD_TEST_DATABASE_URL), with real receivers on 127.0.0.1: every spelling of a private
address is refused when an endpoint or a workflow webhook step is saved (422 private_target) and never
reached when one saved earlier (while `webhooks.allow_private_targets` was on) is sent; workflow webhooks go
through the endpoint sender's client (no redirects, a capped reply, a time limit) and log the host only.
Names resolve through the machine's own /etc/hosts; nothing is mocked."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from urllib.parse import urlsplit

import pytest
import yarl
from aiohttp import web

from api.context import CONFIG
from pipeline.webhook_targets import public_address
from storage import workflows as store
from storage.models import utcnow
from tests.test_webhooks import deliveries, send_what_is_due, track_event
from tests.test_workflows_engine import make_workflow, one_run, outcomes, scheduler_for

HOSTNAME = socket.gethostname()
SPELLINGS = ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::127.0.0.1]", "[64:ff9b::7f00:1]",
             "[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::7f00:1]", "[::ffff:a9fe:a9fe]", "[2002:7f00:1::1]",
             "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "169.254.169.254", "10.0.0.1", "localhost", HOSTNAME]
"""Loopback, link-local (the metadata service) and private addresses, spelt as decimal, hex and octal
numbers, short dotted forms, IPv4-compatible, NAT64 (well-known and local-use prefixes), IPv4-mapped, 6to4
and Teredo (client 127.0.0.1) IPv6 forms, and names from /etc/hosts."""
PRIVATE = "a loopback or private address (webhooks.allow_private_targets is off)"
SECRET_URL_PATH = "/services/T000/B000/SECRETPATHTOKEN?token=SECRETQUERY"


def first_address(host: str) -> str | None:
    """What a name (or a number) resolves to first, None for an IP literal (judged as written)."""
    bare = host.strip("[]")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in bare else socket.AF_INET, bare)
        return None
    except OSError:
        pass
    found = [info[4][0] for info in socket.getaddrinfo(bare, 80, type=socket.SOCK_STREAM)]
    assert found and not any(public_address(address) for address in found), found
    return found[0]


def refusal(url: str, field: str) -> dict:
    host = urlsplit(url).hostname
    address = None if host == "localhost" else first_address(host)
    what = f"{host} resolves to {address}, " if address else f"{host} is "
    return {"field": field, "code": "private_target", "message": what + PRIVATE}


def send_error(url: str) -> str:
    """The error the client records for a private target: aiohttp refuses the URL, the resolver finds only
    non-public addresses, or the socket factory refuses the address the connector was about to connect to."""
    parsed = yarl.URL(url)
    host, port = parsed.host, parsed.port
    bare = host.strip("[]")
    if bare in ("2130706433", "0177.0.0.1", "127.1"):
        return "the URL is not valid"
    if first_address(bare) is not None or bare == "localhost":
        return (f"ClientConnectorDNSError: Cannot connect to host {host}:{port} ssl:default [{host} resolves only "
                "to non-public addresses and webhooks.allow_private_targets is off]")
    return (f"ClientConnectorError: Cannot connect to host {host}:{port} ssl:default [{host} is not a public "
            "address and webhooks.allow_private_targets is off]")


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_every_spelling_of_a_private_address_is_refused_when_an_endpoint_is_saved(api, spelling):
    url = f"http://{spelling}:8080/hook"
    status, body = await api.call("POST", "/webhooks", json={"url": url, "events": ["signed-up"]})
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", body
    assert body["error"]["errors"] == [refusal(url, "url")]
    status, body = await api.call("POST", "/webhooks", json={"url": "https://hooks.example.com/h", "events": ["a"]})
    assert status == 201, "a name that does not resolve (no network here) is accepted: it is checked when sent"
    made = body["data"]
    status, body = await api.call("PATCH", f"/webhooks/{made['id']}", json={"url": url})
    assert status == 422 and body["error"]["errors"] == [refusal(url, "url")], body
    status, body = await api.call("GET", "/webhooks")
    assert [item["url"] for item in body["data"]["items"]] == ["https://hooks.example.com/h"], "nothing stored"


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_every_spelling_of_a_private_address_is_refused_when_a_workflow_is_saved(api, spelling):
    url = f"http://{spelling}:8080/hook"
    steps = [{"id": "first", "type": "update", "data": {"seen": True}, "next": "hook"},
             {"id": "hook", "type": "webhook", "url": url}]
    status, body = await api.call("POST", "/workflows", json={"name": "w", "trigger": {"event": "e"},
                                                                "steps": steps})
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", body
    assert body["error"]["errors"] == [refusal(url, "steps.1.url")]
    public = [steps[0], {**steps[1], "url": "https://hooks.example.com/h"}]
    status, body = await api.call("POST", "/workflows", json={"name": "w", "trigger": {"event": "e"},
                                                                "steps": public})
    assert status == 201, body
    made = body["data"]
    status, body = await api.call("PATCH", f"/workflows/{made['id']}", json={"steps": steps})
    assert status == 422 and body["error"]["errors"] == [refusal(url, "steps.1.url")], body
    status, body = await api.call("GET", "/workflows")
    assert [item["steps"] for item in body["data"]["items"]] == [public], "nothing stored"
    api.client.app[CONFIG].webhooks.allow_private_targets = True
    status, body = await api.call("POST", "/workflows", json={"name": "w2", "trigger": {"event": "e"},
                                                                "steps": steps})
    assert status == 201, "allow_private_targets lets a workflow post to a private address, as an endpoint"


async def test_no_spelling_of_a_private_address_is_reached_by_an_endpoint_saved_earlier(api, receiver):
    """Endpoints saved while private targets were allowed, on every spelling of the receiver's address (and
    the metadata and private ones): once they are not, the receiver gets no request."""
    api.client.app[CONFIG].webhooks.allow_private_targets = True
    urls = [f"http://{spelling}:{receiver.port}/hook" for spelling in SPELLINGS]
    endpoints = {}
    for url in [*urls, receiver.url()]:
        status, body = await api.call("POST", "/webhooks", json={"url": url, "events": ["signed-up"]})
        assert status == 201, body
        endpoints[url] = body["data"]["id"]
    api.client.app[CONFIG].webhooks.allow_private_targets = False
    await track_event(api, "ann@example.org", "signed-up")
    started = time.monotonic()
    await send_what_is_due(api, retry_base_seconds=60.0)
    assert time.monotonic() - started < 5, "refused before connecting, not timed out"
    assert receiver.received == []
    for url in urls:
        [item] = await deliveries(api, endpoints[url])
        assert (item["status"], item["attempts"], item["lastStatus"]) == ("PENDING", 1, None), url
        assert item["lastError"] == send_error(url)
    [item] = await deliveries(api, endpoints[receiver.url()])
    assert item["lastError"] == send_error(receiver.url())


async def scheduled_until_idle(api) -> float:
    """Run the workflow scheduler until nothing is due; the seconds it took."""
    scheduler = scheduler_for(api)
    started = time.monotonic()
    try:
        await scheduler.run_until_idle()
    finally:
        await scheduler.close()
    return time.monotonic() - started


async def test_no_workflow_webhook_reaches_a_private_address(api, receiver):
    """Workflow webhook steps stored earlier (or by an older version) on the receiver's address in every
    spelling, on the metadata service and on a private address: no request arrives, and each run records
    why its POST failed."""
    urls = [receiver.url("/hook"), "http://169.254.169.254/latest/meta-data/iam/", "http://10.0.0.1/",
            *[f"http://{spelling}:{receiver.port}/hook" for spelling in SPELLINGS]]
    workflows = {url: await make_workflow(api, [{"id": "hook", "type": "webhook", "url": url}], ["ping"])
                 for url in urls}
    await track_event(api, "ann@example.org", "ping")
    took = await scheduled_until_idle(api)
    assert took < 5, "refused before connecting, not timed out"
    assert receiver.received == []
    for url, workflow in workflows.items():
        run = await one_run(api, workflow)
        assert run.status == "ACTIVE" and outcomes(run)[-1] == "webhook failed", url
        assert run.history[-1]["reason"] == send_error(url)


async def test_workflow_webhooks_follow_no_redirect_read_a_capped_reply_and_time_out(api, aiohttp_server):
    """The 300 MB reply that took the dispatcher to 719 MB: a workflow webhook reads at most
    max_response_bytes of it and drops the connection; a redirect is not followed; a slow receiver times
    out after timeout_seconds."""
    hooks = api.client.app[CONFIG].webhooks
    hooks.allow_private_targets, hooks.timeout_seconds = True, 0.5
    seen: list[str] = []
    endless_done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return web.Response(status=200)

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response(status=200)

    async def endless(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(status=200)
        await reply.prepare(request)
        try:
            for _ in range(512):
                await reply.write(b"x" * 65536)
        except (ConnectionError, asyncio.CancelledError):  # aiohttp cancels a handler whose client left
            endless_done.set_result("dropped")
            raise
        endless_done.set_result("all 32 MB read")
        return reply

    app = web.Application()
    for path, handler in (("/moved", moved), ("/elsewhere", elsewhere), ("/slow", slow), ("/endless", endless)):
        app.router.add_route("*", path, handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    workflows = {path: await make_workflow(api, [{"id": "hook", "type": "webhook",
                                                  "url": f"http://127.0.0.1:{server.port}{path}"}], ["ping"])
                 for path in ("/moved", "/slow", "/endless")}
    await track_event(api, "ann@example.org", "ping")
    took = await scheduled_until_idle(api)
    assert took < 2.5
    assert await asyncio.wait_for(endless_done, 5) == "dropped"
    assert seen == [], "the redirect was not followed"
    run = await one_run(api, workflows["/moved"])
    assert outcomes(run)[-1] == "webhook failed" and run.history[-1]["reason"] == (
        "HTTP 302 (redirects are not followed)")
    run = await one_run(api, workflows["/slow"])
    assert outcomes(run)[-1] == "webhook failed" and run.history[-1]["reason"] == "no reply within 0.5 s"
    run = await one_run(api, workflows["/endless"])
    assert run.status == "COMPLETED" and outcomes(run)[-1] == "posted" and run.history[-1]["status"] == 200


async def garbage_server() -> asyncio.Server:
    """Answers any request with a status line HTTP clients cannot parse (aiohttp's error for it quotes the
    whole URL)."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 2000 Whatever\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_webhook_urls_reach_the_logs_as_their_host_only(api, receiver, caplog):
    """A Slack-style URL carries its secret in the path and query: workflow webhook steps (posted, failed,
    and answered with garbage) and endpoint deliveries log the host, never the path or query."""
    caplog.set_level(logging.DEBUG)
    api.client.app[CONFIG].webhooks.allow_private_targets = True
    garbage = await garbage_server()
    garbage_url = f"http://127.0.0.1:{garbage.sockets[0].getsockname()[1]}{SECRET_URL_PATH}"
    try:
        posted = await make_workflow(api, [{"id": "hook", "type": "webhook", "url": receiver.url(SECRET_URL_PATH)}],
                                     ["ping"])
        garbled = await make_workflow(api, [{"id": "hook", "type": "webhook", "url": garbage_url}], ["ping"])
        status, body = await api.call("POST", "/webhooks", json={"url": garbage_url, "events": ["ping"]})
        assert status == 201, body
        endpoint = body["data"]["id"]
        receiver.replies = [503, 200]
        await track_event(api, "ann@example.org", "ping")
        scheduler = scheduler_for(api)
        try:
            await scheduler.run_until_idle()
            run = await one_run(api, posted)
            await api.db.write(lambda s: store.postpone(s, [run.id], utcnow()))  # skip the backoff
            await scheduler.run_until_idle()
        finally:
            await scheduler.close()
        await send_what_is_due(api, retry_base_seconds=60.0)
    finally:
        garbage.close()
        await garbage.wait_closed()
    assert [r.path for r in receiver.received] == ["/services/T000/B000/SECRETPATHTOKEN"] * 2
    assert outcomes(await one_run(api, posted))[-1] == "posted"
    run = await one_run(api, garbled)
    assert run.history[-1]["reason"] == ("ClientResponseError: Bad status line:   Invalid response status:    "
                                         "b'HTTP/1.1 2000 Whatever'                 ^")
    [item] = await deliveries(api, endpoint)
    assert item["lastError"] == run.history[-1]["reason"]
    lines = [record.getMessage() + (record.exc_text or "") for record in caplog.records]
    assert any("webhook to 127.0.0.1 → 503" in line for line in lines), lines
    assert any("webhook to 127.0.0.1 → 200" in line for line in lines), lines
    assert [line for line in lines if "SECRETPATHTOKEN" in line or "SECRETQUERY" in line] == []
