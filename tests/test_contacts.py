"""Contacts API: CRUD, subscription events, pagination, project isolation, bad input."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from sqlalchemy import func, select

from api import contacts as contacts_api
from storage import contacts as contact_store
from storage.models import Email, Event
from tests.test_events import deleted_in_parts


async def create(api, email="c@example.com", **extra):
    status, body = await api.call("POST", "/contacts", json={"email": email, **extra})
    assert status == 201, body
    return body["data"]


async def test_create_get_and_409(api):
    contact = await create(api, "New@Example.COM", data={"name": "Ann", "age": None})
    assert contact["email"] == "new@example.com"
    assert contact["subscribed"] is True
    assert contact["data"] == {"name": "Ann"}
    status, body = await api.call("GET", f"/contacts/{contact['id']}")
    assert status == 200 and body["data"]["id"] == contact["id"]
    status, body = await api.call("POST", "/contacts", json={"email": "new@example.com"})
    assert status == 409 and body["error"]["code"] == "CONFLICT"


async def test_versioned_and_unversioned_routes_are_the_same(api):
    contact = await create(api)
    for prefix in ("", "/v1"):
        status, body = await api.call("GET", f"{prefix}/contacts/{contact['id']}")
        assert status == 200 and body["data"]["email"] == "c@example.com"


async def test_update_by_put_and_patch(api):
    contact = await create(api, data={"a": 1, "b": 2})
    status, body = await api.call("PUT", "/contacts", json={"id": contact["id"], "data": {"a": None, "c": 3}})
    assert status == 200 and body["data"]["data"] == {"b": 2, "c": 3}
    status, body = await api.call("PATCH", f"/contacts/{contact['id']}", json={"email": "Moved@example.com"})
    assert status == 200 and body["data"]["email"] == "moved@example.com"
    await create(api, "taken@example.com")
    status, body = await api.call("PATCH", f"/contacts/{contact['id']}", json={"email": "taken@example.com"})
    assert status == 409


async def test_subscription_changes_record_events(api):
    contact = await create(api)
    status, body = await api.call("POST", "/contacts/unsubscribe", json={"id": contact["id"]})
    assert status == 200 and body["data"]["subscribed"] is False
    await api.call("POST", "/contacts/unsubscribe", json={"id": contact["id"]})
    status, body = await api.call("POST", "/v1/contacts/subscribe", json={"email": "c@example.com"})
    assert body["data"]["subscribed"] is True
    await api.call("PUT", "/contacts", json={"id": contact["id"], "subscribed": False})
    _, events = await api.call("GET", f"/events/contact/{contact['id']}")
    assert [e["name"] for e in events["data"]["items"]] == [
        "contact.unsubscribed", "contact.subscribed", "contact.unsubscribed"], "one event per real change"


async def test_delete_both_forms(api):
    one, two = await create(api, "one@example.com"), await create(api, "two@example.com")
    status, body = await api.call("DELETE", "/contacts", json={"id": one["id"]})
    assert status == 200 and body["data"]["id"] == one["id"]
    status, _ = await api.call("DELETE", f"/contacts/{two['id']}")
    assert status == 200
    for contact in (one, two):
        status, body = await api.call("GET", f"/contacts/{contact['id']}")
        assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, _ = await api.call("DELETE", f"/contacts/{two['id']}")
    assert status == 404


async def test_deleting_a_contact_with_many_events_goes_a_part_at_a_time_and_other_writes_go_on_between(
        api, sender, monkeypatch):
    """The foreign keys delete a contact's events and unlink its emails in the DELETE's own transaction: for a
    contact with 100,000 events that held every other write on SQLite for 0.65 s. They go first, a thousand per
    transaction (ten here), and tracks written all along commit between the parts; another project's DELETE is
    still 404 and touches nothing."""
    heavy = await create(api, "heavy@example.com")
    for index in range(30):
        status, _ = await api.call("POST", "/v1/track", json={"email": "heavy@example.com", "event": f"visit{index}"})
        assert status == 200
    for _ in range(6):
        status, _ = await api.call("POST", "/v1/send", json={"to": "heavy@example.com", "subject": "Receipt",
                                                             "body": "Thanks"})
        assert status == 200

    def linked(session) -> int:
        events = session.execute(select(func.count()).select_from(Event).where(Event.contact_id == heavy["id"]))
        emails = session.execute(select(func.count()).select_from(Email).where(Email.contact_id == heavy["id"]))
        return events.scalar_one() + emails.scalar_one()

    assert await api.db.read(linked) >= 36
    deleted = await deleted_in_parts(api, monkeypatch, f"/contacts/{heavy['id']}", linked, contact_store, "detach_rows")
    assert deleted["id"] == heavy["id"]
    unlinked = await api.db.read(lambda s: s.execute(select(func.count()).select_from(Email).where(
        Email.recipient == "heavy@example.com", Email.contact_id.is_(None))).scalar_one())
    assert unlinked == 6
    status, _ = await api.call("GET", f"/contacts/{heavy['id']}")
    assert status == 404


async def test_count_and_filters(api):
    await create(api, "a@example.com")
    await create(api, "b@example.com", subscribed=False)
    await create(api, "c%d@other.org")
    _, body = await api.call("GET", "/contacts/count")
    assert body["data"] == {"count": 3}
    _, body = await api.call("GET", "/contacts?subscribed=false")
    assert [c["email"] for c in body["data"]["items"]] == ["b@example.com"]
    _, body = await api.call("GET", "/contacts?search=EXAMPLE")
    assert body["data"]["total"] == 2
    _, body = await api.call("GET", "/contacts?search=%25")
    assert [c["email"] for c in body["data"]["items"]] == ["c%d@other.org"], "% is matched literally"


async def test_other_projects_ids_are_404(api):
    contact = await create(api)
    _, other_sk, _ = await api.new_project("other")
    for method, path, payload in [("GET", f"/contacts/{contact['id']}", None),
                                  ("PATCH", f"/contacts/{contact['id']}", {"data": {"x": 1}}),
                                  ("DELETE", f"/contacts/{contact['id']}", None),
                                  ("PUT", "/contacts", {"id": contact["id"], "subscribed": False}),
                                  ("POST", "/contacts/unsubscribe", {"id": contact["id"]}),
                                  ("GET", f"/events/contact/{contact['id']}", None)]:
        status, body = await api.call(method, path, key=other_sk, json=payload)
        assert status == 404, (method, path, body)
    _, body = await api.call("GET", "/contacts", key=other_sk)
    assert body["data"]["total"] == 0
    status, body = await api.call("GET", f"/contacts/{contact['id']}")
    assert body["data"]["subscribed"] is True and body["data"]["data"] == {}


async def test_pagination_is_stable_while_rows_are_inserted(api):
    for i in range(25):
        await create(api, f"p{i:02d}@example.com")
    _, first = await api.call("GET", "/contacts?limit=10")
    page = first["data"]
    assert page["hasMore"] is True and page["total"] == 25 and len(page["items"]) == 10
    assert page["items"][0]["email"] == "p24@example.com", "newest first"
    seen = [c["email"] for c in page["items"]]
    cursor = page["nextCursor"]
    await asyncio.gather(*[create(api, f"late{i}@example.com") for i in range(5)])
    while cursor:
        _, body = await api.call("GET", f"/contacts?limit=10&cursor={cursor}")
        seen += [c["email"] for c in body["data"]["items"]]
        cursor = body["data"]["nextCursor"]
        assert body["data"]["hasMore"] is bool(cursor)
    assert seen == [f"p{i:02d}@example.com" for i in range(24, -1, -1)], "no row repeated or skipped"


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "limit=-1", "cursor=nope",
                                   "cursor=' OR 1=1 --", "subscribed=maybe"])
async def test_bad_list_parameters(api, query):
    status, body = await api.call("GET", f"/contacts?{query}")
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(("method", "path", "payload", "field"), [
    ("POST", "/contacts", {}, "email"),
    ("POST", "/contacts", {"email": "x"}, "email"),
    ("POST", "/contacts", {"email": "a@b.co", "subscribed": 1}, "subscribed"),
    ("POST", "/contacts", {"email": "a@b.co", "data": "str"}, "data"),
    ("PUT", "/contacts", {"email": "a@b.co"}, "id"),
    ("PUT", "/contacts", {"id": 12}, "id"),
    ("DELETE", "/contacts", {}, "id"),
    ("POST", "/contacts/subscribe", {}, "body"),
    ("PATCH", "/contacts/whatever", {"subscribed": "no"}, "subscribed"),
])
async def test_contact_validation(api, method, path, payload, field):
    status, body = await api.call(method, path, json=payload)
    assert status == 422, body
    assert field in [e["field"] for e in body["error"]["errors"]]


async def test_unknown_id_is_404(api):
    status, body = await api.call("GET", "/contacts/01a20498-2e5d-7000-908b-a134f65e8499")
    assert status == 404
    status, body = await api.call("PUT", "/contacts", json={"id": "nope", "data": {}})
    assert status == 404


async def add_many(api, count: int) -> None:
    """`count` contacts written straight to the database (every fifth unsubscribed)."""
    def insert(session):
        for index in range(count):
            contact_store.insert_contact(session, api.project_id, f"bulk{index:04d}@example.com", index % 5 != 0, {})

    await api.db.write(insert)


def counting_pages(monkeypatch) -> list[int]:
    """Count the keyset reads of the legacy stream (the real query runs), and make its pages 100 contacts."""
    sizes: list[int] = []
    read_page = contact_store.contacts_after

    def counted(*args, **kwargs):
        page = read_page(*args, **kwargs)
        sizes.append(len(page))
        return page

    monkeypatch.setattr(contact_store, "contacts_after", counted)
    monkeypatch.setattr(contacts_api, "STREAM_PAGE_SIZE", 100)
    return sizes


async def test_legacy_get_all_contacts_streams_every_contact_in_pages(api, monkeypatch):
    """Seed 002's "Get all contacts" (GET /api/v1/contacts) answers every contact, not the first 20: a plain
    array written chunk by chunk as keyset pages are read, never one list of them all."""
    await add_many(api, 250)
    pages = counting_pages(monkeypatch)
    resp = await api.client.get("/api/v1/contacts", headers=api.auth())
    assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
    assert resp.content_type == "application/json"
    assert resp.headers["X-Request-Id"] and resp.headers["X-RateLimit-Limit"] == "1000"
    listed = await resp.json()
    assert len(listed) == 250 and len({c["email"] for c in listed}) == 250
    assert [c["id"] for c in listed] == sorted((c["id"] for c in listed), reverse=True), "newest first"
    assert set(listed[0]) == {"id", "email", "subscribed", "data", "createdAt", "updatedAt"}
    assert pages == [100, 100, 50], "three reads of at most 100 contacts each"

    pages.clear()
    status, unsubscribed = await api.call("GET", "/api/v1/contacts?subscribed=false")
    assert status == 200 and len(unsubscribed) == 50 and not any(c["subscribed"] for c in unsubscribed)
    assert pages == [50]
    status, page = await api.call("GET", "/api/v1/contacts?limit=5")
    assert status == 200 and len(page) == 5, "a page when one is asked for"
    status, body = await api.call("GET", "/contacts")
    assert len(body["data"]["items"]) == 20 and body["data"]["total"] == 250, "the envelope pages as before"
    _, other_sk, _ = await api.new_project()
    status, empty = await api.call("GET", "/api/v1/contacts", key=other_sk)
    assert status == 200 and empty == []


async def test_a_failure_mid_stream_breaks_the_reply_instead_of_truncating_it(api, monkeypatch):
    await add_many(api, 150)
    pages = counting_pages(monkeypatch)
    read_page = contact_store.contacts_after

    def fails_second(*args, **kwargs):
        if pages:
            raise RuntimeError("database went away")
        return read_page(*args, **kwargs)

    monkeypatch.setattr(contact_store, "contacts_after", fails_second)
    resp = await api.client.get("/api/v1/contacts", headers=api.auth())
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
