"""Domains: DKIM key + records, DNS verification against a DNS server the test controls."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import event, update

from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from storage import emails as email_store
from storage.db import Database
from storage.models import Domain, Email
from tests.conftest import add_verified_domain
from tests.test_delivery import dispatch_all, settings


async def test_add_returns_records_and_verify_by_dns(api, dns_config, dns_server):
    status, body = await api.call("POST", "/domains", json={"domain": "Mail.Example.COM."})
    assert status == 201
    domain = body["data"]
    assert domain["domain"] == "mail.example.com" and domain["verified"] is False
    by_purpose = {r["purpose"]: r for r in domain["records"]}
    assert by_purpose["dkim"]["name"] == "plunkd._domainkey.mail.example.com"
    assert by_purpose["dkim"]["value"].startswith("v=DKIM1; k=rsa; p=MII")
    assert by_purpose["spf"]["value"].startswith("v=spf1")
    assert by_purpose["dmarc"]["name"] == "_dmarc.mail.example.com"

    status, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert status == 200 and body["data"]["verified"] is False
    assert body["data"]["lastCheck"]["dkim"] is False

    dns_server.publish([by_purpose["spf"]])
    wrong_key = "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwrong"
    dns_server.records[by_purpose["dkim"]["name"]] = [wrong_key]
    _, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert body["data"]["verified"] is False, "another key in DNS does not verify"

    dns_server.records[by_purpose["dkim"]["name"]] = [by_purpose["dkim"]["value"]]
    _, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert body["data"]["verified"] is True and body["data"]["lastCheck"]["dkim"] is True
    assert body["data"]["lastCheck"]["dmarc"] is False, "DMARC is advised, not required"
    _, listed = await api.call("GET", "/v1/domains")
    assert [d["domain"] for d in listed["data"]["items"]] == ["mail.example.com"]


async def test_list_follows_the_list_rule(api):
    """GET /domains pages like every list (limit default 20, max 100, cursor; {items, nextCursor, hasMore,
    total}); the legacy /api/v1 dialect answers the page as a plain array."""
    for name in ("one.example.org", "two.example.org", "three.example.org"):
        status, _ = await api.call("POST", "/domains", json={"domain": name})
        assert status == 201
    status, body = await api.call("GET", "/domains?limit=2")
    assert status == 200, body
    first = body["data"]
    assert [d["domain"] for d in first["items"]] == ["three.example.org", "two.example.org"]
    assert first["hasMore"] is True and first["total"] == 3 and first["nextCursor"]
    status, body = await api.call("GET", f"/domains?limit=2&cursor={first['nextCursor']}")
    assert [d["domain"] for d in body["data"]["items"]] == ["one.example.org"] and body["data"]["hasMore"] is False
    status, body = await api.call("GET", "/domains")
    assert status == 200 and len(body["data"]["items"]) == 3 and body["data"]["nextCursor"] is None
    for bad in ("limit=101", "limit=0", "cursor=nope"):
        status, body = await api.call("GET", f"/domains?{bad}")
        assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", bad
    status, legacy = await api.call("GET", "/api/v1/domains?limit=2")
    assert status == 200 and [d["domain"] for d in legacy] == ["three.example.org", "two.example.org"]


async def test_duplicate_and_bad_domains(api):
    status, _ = await api.call("POST", "/domains", json={"domain": "example.org"})
    assert status == 201
    status, body = await api.call("POST", "/domains", json={"domain": "EXAMPLE.org"})
    assert status == 409
    for bad in ["", "localhost", "exa mple.com", "-bad.com", "a" * 300 + ".com", "x@y.com", "example.org\n",
                " example.org", "example.org..", "\u212aexample.org"]:
        status, body = await api.call("POST", "/domains", json={"domain": bad})
        assert status == 422, bad
    status, _ = await api.call("POST", "/domains", json={"domain": 5})
    assert status == 422


async def test_other_projects_domain_is_404(api, dns_config, dns_server):
    domain = await add_verified_domain(api, dns_server)
    _, other_sk, _ = await api.new_project()
    for method, path in (("GET", f"/domains/{domain['id']}"), ("POST", f"/domains/{domain['id']}/verify")):
        status, _ = await api.call(method, path, key=other_sk)
        assert status == 404


@pytest.mark.parametrize("key_kind", ["pk", None])
async def test_domains_need_secret_key(api, key_kind):
    headers = {"Authorization": f"Bearer {api.pk}"} if key_kind else {}
    resp = await api.client.post("/domains", json={"domain": "example.net"}, headers=headers)
    assert resp.status == (403 if key_kind else 401)


SLOW_KEY_SECONDS = 6.0
"""Key generation as a slow machine does it (here 20-300 ms; the test adds this much, releasing the GIL
as OpenSSL does), so a key made inside a write would hold the writer at least this long: well above what
a loaded CI machine adds to a write or a /v1/track call (a CI run once stalled one for 2.7 s), so the
timing checks below only fail for a key made on the write path."""


@dataclass
class KeyWatch:
    generated_while_writing: list[bool] = field(default_factory=list)
    """For each key generated: whether a write function was running on that thread."""
    held: list[float] = field(default_factory=list)
    """How long each write function held the writer, in seconds."""


def watch_key_generation(monkeypatch, slow_seconds: float = 0.0) -> KeyWatch:
    watch, writing = KeyWatch(), threading.local()
    real_write, real_generate = Database.write, rsa.generate_private_key

    async def timed_write(self, fn, light=False, alone=False):
        def timed(session):
            writing.depth = getattr(writing, "depth", 0) + 1
            started = time.perf_counter()
            try:
                return fn(session)
            finally:
                watch.held.append(time.perf_counter() - started)
                writing.depth -= 1
        return await real_write(self, timed, light, alone)

    def watched_generate(*args, **kwargs):
        watch.generated_while_writing.append(getattr(writing, "depth", 0) > 0)
        time.sleep(slow_seconds)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(Database, "write", timed_write)
    monkeypatch.setattr(rsa, "generate_private_key", watched_generate)
    return watch


async def test_key_generation_stays_off_the_write_path(api, monkeypatch):
    """The RSA key is made in a thread before the transaction: the shared writer (every write of the
    server goes through it) is never held for a key generation, so /v1/track keeps its pace."""
    watch = watch_key_generation(monkeypatch, SLOW_KEY_SECONDS)

    async def track_until(done: asyncio.Event) -> list[tuple[int, float]]:
        calls = []
        for index in range(900):  # under the fixture's 1,000 requests a minute, with the four domain adds
            if done.is_set():
                break
            started = time.perf_counter()
            status, _ = await api.call("POST", "/v1/track", key=api.pk,
                                       json={"email": f"t{index}@example.org", "event": "visit"})
            calls.append((status, time.perf_counter() - started))
        return calls

    done = asyncio.Event()
    tracking = asyncio.create_task(track_until(done))
    added = await asyncio.gather(*(api.call("POST", "/domains", json={"domain": f"d{i}.example.com"})
                                   for i in range(4)))
    done.set()
    calls = await tracking
    assert [status for status, _ in added] == [201] * 4
    assert watch.generated_while_writing == [False] * 4, "no key is generated inside a write transaction"
    assert max(watch.held) < SLOW_KEY_SECONDS / 2, f"the writer was held {max(watch.held) * 1000:.0f} ms"
    assert calls and {status for status, _ in calls} == {200}
    slowest = max(seconds for _, seconds in calls)
    assert slowest < SLOW_KEY_SECONDS, f"a /v1/track call waited {slowest * 1000:.0f} ms"


def test_cli_domain_add_makes_the_key_off_the_write_path_and_keeps_the_cap(tmp_path, database_url, monkeypatch,
                                                                          capsys):
    from plunkd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PLUNKD_CONFIG", raising=False)
    monkeypatch.setenv("PLUNKD_DATABASE_URL", database_url)
    monkeypatch.setenv("PLUNKD_SERVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PLUNKD_API_MAX_DOMAINS_PER_PROJECT", "1")
    watch = watch_key_generation(monkeypatch)
    assert main(["project", "create", "--name", "shop", "--from-email", "hi@shop.example"]) == 0
    assert main(["domain", "add", "shop.example", "--project", "shop"]) == 0
    assert watch.generated_while_writing == [False]
    capsys.readouterr()
    assert main(["domain", "add", "mail.shop.example", "--project", "shop"]) == 1
    database, failure = capsys.readouterr().err.splitlines()
    assert database.startswith("database: ") and failure == "plunkd: This project has reached its limit of 1 domain"
    assert watch.generated_while_writing == [False], "no key is made for a refused domain"


async def test_domains_per_project_are_capped(api, config):
    config.api.max_domains_per_project = 2
    for name in ("a.example.com", "b.example.com"):
        status, _ = await api.call("POST", "/domains", json={"domain": name})
        assert status == 201
    status, body = await api.call("POST", "/domains", json={"domain": "c.example.com"})
    assert status == 422
    body["error"].pop("requestId")
    assert body["error"] == {
        "code": "VALIDATION_ERROR", "statusCode": 422,
        "message": "This project has reached its limit of 2 domains",
        "errors": [{"field": "domain", "code": "too_many_domains",
                    "message": "A project can have at most 2 domains (api.max_domains_per_project)"}],
        "suggestion": "Delete a domain the project no longer uses (DELETE /domains/:id), "
                      "or raise api.max_domains_per_project."}
    _, listed = await api.call("GET", "/domains")
    assert sorted(d["domain"] for d in listed["data"]["items"]) == ["a.example.com", "b.example.com"]
    _, other_sk, _ = await api.new_project()
    status, _ = await api.call("POST", "/domains", key=other_sk, json={"domain": "c.example.com"})
    assert status == 201, "the cap is per project"
    racing = await asyncio.gather(*(api.call("POST", "/domains", key=other_sk, json={"domain": f"r{i}.example.com"})
                                    for i in range(3)))
    assert sorted(status for status, _ in racing) == [201, 422, 422], "concurrent adds do not overshoot the cap"


async def test_sends_read_the_verified_domains_and_tracking_defaults_once_and_see_a_change_at_once(
        api, sender, dns_server):
    """Every write batch of sends read the sender's domain and the project's tracking defaults: on PostgreSQL two of
    the six round trips a batch waits on in turn (/v1/send took 9-11 % more requests a second without them). Both
    are kept per process (`storage.interest`): later sends read neither, and a change made in this process is seen
    by the next send (another process sees it within two seconds)."""
    send = {"to": "ann@example.org", "subject": "s", "body": "<p>b</p>"}
    assert (await api.call("POST", "/v1/send", json=send))[0] == 200
    statements: list[str] = []
    engine = api.db.sync_engine or api.db.engine.sync_engine
    listener = event.listens_for(engine, "before_cursor_execute")(lambda c, cur, sql, *a: statements.append(sql))
    try:
        for _ in range(3):
            assert (await api.call("POST", "/v1/send", json=send))[0] == 200
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert any("INSERT INTO emails" in sql for sql in statements), "the sends' statements were seen"
    assert [sql for sql in statements if "FROM domains" in sql or "FROM tracking_settings" in sql] == []

    status, body = await api.call("PATCH", "/settings/tracking", json={"transactional": {"opens": True}})
    assert status == 200, body
    status, body = await api.call("POST", "/v1/send", json=send)
    assert status == 200, body
    email_id = body["data"]["emails"][0]["email"]
    assert await api.db.read(lambda s: s.get(Email, email_id).track_opens) is True

    status, body = await api.call("POST", "/domains", json={"domain": "other.example"})
    assert status == 201, body
    elsewhere = {**send, "from": "news@other.example"}
    status, body = await api.call("POST", "/v1/send", json=elsewhere)
    assert status == 422 and body["error"]["errors"][0]["code"] == "unverified_domain", body
    await api.db.write(lambda s: s.execute(update(Domain).where(Domain.name == "other.example").values(verified=True)))
    status, body = await api.call("POST", "/v1/send", json=elsewhere)
    assert status == 200, "verified by another process (written here behind the cache): used at once"

    dns_server.records.clear()
    status, body = await api.call("POST", f"/domains/{sender['id']}/verify")
    assert status == 200 and body["data"]["verified"] is False, body
    status, body = await api.call("POST", "/v1/send", json=send)
    assert status == 422 and body["error"]["errors"][0]["code"] == "unverified_domain", body


async def test_delete_domain(api, sender, tmp_path):
    _, before = await api.call("GET", f"/domains/{sender['id']}")
    status, body = await api.call("POST", "/v1/send", json={"to": "ann@example.org", "subject": "s", "body": "b"})
    assert status == 200, body

    status, body = await api.call("DELETE", f"/domains/{sender['id']}")
    assert status == 409
    body["error"].pop("requestId")
    assert body["error"] == {
        "code": "CONFLICT", "statusCode": 409,
        "message": "Domain example.com has 1 queued email(s) not yet sent; it cannot be deleted until they are",
        "suggestion": "Wait until the queued emails are delivered (or have failed), then delete the domain."}
    _, still = await api.call("GET", f"/domains/{sender['id']}")
    assert still["data"] == before["data"]

    await dispatch_all(Dispatcher(api.db, FileTransport(tmp_path / "out"), TokenBucket(0), settings()))
    assert {row.status for row in await api.db.read(email_store.list_emails, api.project_id)} == {"SENT"}
    status, body = await api.call("DELETE", f"/v1/domains/{sender['id']}")
    assert status == 200 and body["data"] == before["data"]
    status, _ = await api.call("GET", f"/domains/{sender['id']}")
    assert status == 404
    _, listed = await api.call("GET", "/domains")
    assert listed["data"]["items"] == []


async def test_delete_unknown_or_other_projects_domain_is_404(api, sender):
    _, other_sk, _ = await api.new_project()
    for key, domain_id in ((None, "no-such-domain"), (other_sk, sender["id"])):
        status, body = await api.call("DELETE", f"/domains/{domain_id}", key=key)
        assert status == 404
        assert body["error"]["code"] == "NOT_FOUND" and body["error"]["message"] == f"Domain {domain_id} not found"
    status, _ = await api.call("GET", f"/domains/{sender['id']}")
    assert status == 200, "still there"


@pytest.mark.parametrize("key_kind", ["pk", None])
async def test_delete_domain_needs_secret_key(api, sender, key_kind):
    headers = {"Authorization": f"Bearer {api.pk}"} if key_kind else {}
    resp = await api.client.delete(f"/domains/{sender['id']}", headers=headers)
    body = await resp.json()
    assert resp.status == (403 if key_kind else 401)
    assert body["error"]["code"] == ("FORBIDDEN" if key_kind else "UNAUTHORIZED")
    status, _ = await api.call("GET", f"/domains/{sender['id']}")
    assert status == 200
