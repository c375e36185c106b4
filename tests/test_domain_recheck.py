"""Domains re-checked (issue 25, item 3): the re-check (`domaincheck.rechecker`) looks a verified domain's
records up again; when its DKIM record is gone from the (test) resolver the domain is HELD, `domain.unverified`
is recorded and posted to webhooks, its queued mail stays QUEUED and is not sent (the API and /metrics show
how much is held); when the record is back (the next re-check, or POST /domains/:id/verify) the mail is
released, `domain.verified` recorded, and delivered signed (the file transport)."""

from __future__ import annotations

import asyncio
import email
from datetime import timedelta
from email import policy

import dkim
from sqlalchemy import select

from api.context import CONFIG
from domaincheck.rechecker import DomainRechecker
from storage.models import Email, OutboxItem, utcnow
from tests.test_campaigns import dispatcher_for
from tests.test_delivery import dispatch_all, dns_for


def later(hours: float):
    """A clock `hours` ahead: the re-check interval has passed."""
    return lambda: utcnow() + timedelta(hours=hours)


async def queue(api, *recipients: str) -> list[str]:
    status, body = await api.call("POST", "/v1/send", json={"to": list(recipients), "subject": "Receipt",
                                                            "body": "<p>Thanks</p>"})
    assert status == 200, body
    return [sent["email"] for sent in body["data"]["emails"]]


async def domain(api, domain_id: str) -> dict:
    status, body = await api.call("GET", f"/domains/{domain_id}")
    assert status == 200, body
    return body["data"]


async def statuses(api) -> list[str]:
    return await api.db.read(lambda s: sorted(s.execute(select(Email.status)).scalars()))


async def metric(api, line_start: str) -> float:
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    [value] = [line.split()[-1] for line in (await resp.text()).splitlines() if line.startswith(line_start)]
    return float(value)


async def test_a_missing_dkim_record_holds_the_mail_and_its_return_releases_it(api, sender, dns_server, tmp_path):
    status, hook = await api.call("POST", "/webhooks", json={"url": "https://hooks.example.net/plunk",
                                                             "events": ["domain.unverified", "domain.verified"]})
    assert status == 201, hook
    ids = await queue(api, "ann@example.org", "bob@example.org")
    dkim_name = next(r["name"] for r in sender["records"] if r["purpose"] == "dkim")
    dkim_value = dns_server.records.pop(dkim_name)
    config = api.client.app[CONFIG]
    assert await DomainRechecker(api.db, config).run_once() == 0, "checked at verify: not due yet"
    assert await DomainRechecker(api.db, config, clock=later(6.1)).run_once() == 1

    held = await domain(api, sender["id"])
    assert (held["status"], held["verified"], held["heldEmails"]) == ("HELD", False, 2)
    assert held["lastCheck"]["dkim"] is False and held["heldSince"] is not None
    assert await metric(api, 'plunkd_outbox_held{reason="DKIM"}') == 2.0
    folder = tmp_path / "out"
    await dispatch_all(dispatcher_for(api, folder))
    assert not folder.exists() or list(folder.glob("*.eml")) == [], "nothing goes out unsigned"
    assert await statuses(api) == ["QUEUED", "QUEUED"], "held, not failed"
    status, body = await api.call("POST", "/v1/send", json={"to": "cat@example.org", "subject": "x", "body": "y"})
    assert status == 422 and body["error"]["errors"][0]["code"] == "unverified_domain", body
    status, body = await api.call("GET", "/events?name=domain.unverified")
    [event] = body["data"]["items"]
    assert event["data"]["domain"] == "example.com" and event["data"]["check"]["dkim"] is False
    status, body = await api.call("GET", f"/webhooks/{hook['data']['id']}/deliveries")
    assert [d["type"] for d in body["data"]["items"]] == ["domain.unverified"], body

    dns_server.records[dkim_name] = dkim_value
    assert await DomainRechecker(api.db, config, clock=later(12.2)).run_once() == 1
    back = await domain(api, sender["id"])
    assert (back["status"], back["verified"], back["heldEmails"]) == ("VERIFIED", True, 0)
    assert await metric(api, 'plunkd_outbox_held{reason="DKIM"}') == 0.0
    await dispatch_all(dispatcher_for(api, folder))
    written = [path.read_bytes() for path in folder.glob("*.eml")]
    assert len(written) == 2 and await statuses(api) == ["SENT", "SENT"]
    for raw in written:
        assert dkim.verify(raw.split(b"\r\n", 1)[1], dnsfunc=dns_for(sender))
    assert sorted(str(email.message_from_bytes(raw, policy=policy.default)["To"]) for raw in written) == [
        "ann@example.org", "bob@example.org"]
    status, body = await api.call("GET", "/events?name=domain.verified")
    assert [e["data"]["domain"] for e in body["data"]["items"]] == ["example.com"], "not at its first verify"
    status, body = await api.call("GET", f"/webhooks/{hook['data']['id']}/deliveries")
    assert sorted(d["type"] for d in body["data"]["items"]) == ["domain.unverified", "domain.verified"], body
    assert await api.db.read(lambda s: sorted(s.execute(select(Email.id)).scalars())) == sorted(ids)


async def test_verify_over_the_api_releases_held_mail(api, sender, dns_server, tmp_path):
    await queue(api, "ann@example.org")
    dkim_name = next(r["name"] for r in sender["records"] if r["purpose"] == "dkim")
    dkim_value = dns_server.records.pop(dkim_name)
    await DomainRechecker(api.db, api.client.app[CONFIG], clock=later(7)).run_once()
    assert (await domain(api, sender["id"]))["heldEmails"] == 1
    status, body = await api.call("POST", f"/domains/{sender['id']}/verify")
    assert status == 200 and body["data"]["status"] == "HELD", "still missing: still held"
    dns_server.records[dkim_name] = dkim_value
    status, body = await api.call("POST", f"/domains/{sender['id']}/verify")
    assert status == 200 and (body["data"]["status"], body["data"]["heldEmails"]) == ("VERIFIED", 0), body
    folder = tmp_path / "out"
    await dispatch_all(dispatcher_for(api, folder))
    assert len(list(folder.glob("*.eml"))) == 1 and await statuses(api) == ["SENT"]


async def test_mail_a_dispatcher_claims_for_a_held_domain_is_parked_not_sent(api, sender, dns_server, tmp_path):
    """An email queued before the hold but leased by a dispatcher at the re-check (so the re-check cannot
    park it) is parked by the dispatcher when it reads the domain."""
    await queue(api, "ann@example.org")

    def lease(session):
        session.execute(OutboxItem.__table__.update().values(claimed_by="another-node"))

    await api.db.write(lease)
    dns_server.records.pop(next(r["name"] for r in sender["records"] if r["purpose"] == "dkim"))
    await DomainRechecker(api.db, api.client.app[CONFIG], clock=later(7)).run_once()
    assert (await domain(api, sender["id"]))["heldEmails"] == 0, "leased elsewhere: the re-check left it"
    folder = tmp_path / "out"
    await dispatch_all(dispatcher_for(api, folder))
    assert not folder.exists() or list(folder.glob("*.eml")) == []
    assert (await domain(api, sender["id"]))["heldEmails"] == 1 and await statuses(api) == ["QUEUED"]


async def test_a_failed_lookup_changes_nothing_and_each_domain_is_claimed_once_per_interval(api, sender, dns_server):
    """Two nodes re-checking at once (two re-checkers on the database) look the domain up once."""
    config = api.client.app[CONFIG]
    config.dns.port = 1  # nothing answers: the lookup times out
    config.dns.timeout_seconds = 0.3
    nodes = [DomainRechecker(api.db, config, clock=later(7)) for _ in range(2)]
    assert sorted(await asyncio.gather(*(node.run_once() for node in nodes))) == [0, 1], "one node takes it"
    same = await domain(api, sender["id"])
    assert (same["status"], same["verified"]) == ("VERIFIED", True), "a resolver's hiccup unverifies nothing"
    assert await DomainRechecker(api.db, config, clock=later(7)).run_once() == 0, "claimed: not due again"
    config.dns.recheck_hours = 0
    assert await DomainRechecker(api.db, config, clock=later(100)).run_once() == 0, "0: never re-checked"
