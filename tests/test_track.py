"""POST /v1/track: seed 003's rules, auth, and bad input."""

from __future__ import annotations

import asyncio

import pytest

from storage import contacts as contact_store


async def contact_of(api, email):
    return await api.db.read(contact_store.get_contact_by_email, api.project_id, email)


async def test_track_creates_contact_and_event(api):
    status, body = await api.call("POST", "/v1/track", json={"email": "Ann@Example.com", "event": "signup",
                                                             "data": {"plan": "pro"}})
    assert status == 200 and body["success"] is True
    assert set(body["data"]) == {"contact", "event", "timestamp"}
    contact = await contact_of(api, "ann@example.com")
    assert contact.id == body["data"]["contact"]
    assert contact.subscribed is True
    assert contact.data == {"plan": "pro"}
    status, events = await api.call("GET", f"/events/contact/{contact.id}")
    assert [e["name"] for e in events["data"]["items"]] == ["signup"]
    assert events["data"]["items"][0]["id"] == body["data"]["event"]


async def test_public_key_may_track_but_not_read(api):
    status, _ = await api.call("POST", "/v1/track", key=api.pk, json={"email": "a@b.co", "event": "x"})
    assert status == 200
    status, body = await api.call("GET", "/contacts", key=api.pk)
    assert status == 403
    assert body["error"]["code"] == "FORBIDDEN" and body["error"]["statusCode"] == 403


@pytest.mark.parametrize(("stored", "incoming", "expected_data", "expected_event"), [
    ({}, {"a": 1, "b": "x", "c": True, "d": {"k": "v"}}, {"a": 1, "b": "x", "c": True, "d": {"k": "v"}},
     {"a": 1, "b": "x", "c": True, "d": {"k": "v"}}),
    ({"a": 1}, {"order": {"value": "o-1", "persistent": False}}, {"a": 1}, {"order": "o-1"}),
    ({"a": 1, "b": 2}, {"a": None}, {"b": 2}, {}),
    ({"a": 1}, {"a": ""}, {"a": 1}, {}),
    ({}, {"id": "x", "email": "e@x.io", "subscribed": False, "createdAt": "t", "updatedAt": "t",
          "plunk_id": "p", "plunk_email": "p@x.io", "ok": 1}, {"ok": 1}, {"ok": 1}),
    ({"a": 1}, {"a": {"value": 5, "persistent": True}}, {"a": 5}, {"a": 5}),
    ({"a": 1}, {"missing": None}, {"a": 1}, {}),
])
async def test_track_data_rules(api, stored, incoming, expected_data, expected_event):
    email = "rules@example.com"
    if stored:
        await api.call("POST", "/contacts", json={"email": email, "data": stored})
    status, body = await api.call("POST", "/v1/track", json={"email": email, "event": "e", "data": incoming})
    assert status == 200, body
    contact = await contact_of(api, email)
    assert contact.data == expected_data
    _, events = await api.call("GET", "/events?name=e")
    assert events["data"]["items"][0]["data"] == expected_event


async def test_subscription_rules(api):
    await api.call("POST", "/v1/track", json={"email": "s@example.com", "event": "a", "subscribed": False})
    assert (await contact_of(api, "s@example.com")).subscribed is False
    await api.call("POST", "/v1/track", json={"email": "s@example.com", "event": "b"})
    assert (await contact_of(api, "s@example.com")).subscribed is False, "no value keeps the state"
    await api.call("POST", "/v1/track", json={"email": "s@example.com", "event": "c", "subscribed": True})
    assert (await contact_of(api, "s@example.com")).subscribed is True
    _, names = await api.call("GET", "/events/names")
    assert "contact.subscribed" in names["data"]


@pytest.mark.parametrize("name", ["email.sent", "email.anything", "contact.subscribed", "contact.unsubscribed",
                                  "segment.vip.entry", "segment.vip.exit"])
async def test_reserved_event_names(api, name):
    status, body = await api.call("POST", "/v1/track", json={"email": "r@example.com", "event": name})
    assert status == 422
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["error"]["errors"] == [{"field": "event", "code": "reserved_event",
                                        "message": f"'{name}' is a reserved event name emitted by plunkd itself"}]
    assert await contact_of(api, "r@example.com") is None, "a refused call leaves no contact"


@pytest.mark.parametrize("name", ["contact.created", "segment.vip", "emails.sent", "signup"])
async def test_non_reserved_lookalikes_are_accepted(api, name):
    status, _ = await api.call("POST", "/v1/track", json={"email": "r@example.com", "event": name})
    assert status == 200


async def test_every_call_records_a_new_event(api):
    for _ in range(3):
        await api.call("POST", "/v1/track", json={"email": "t@example.com", "event": "click"})
    _, body = await api.call("GET", "/events?name=click")
    assert body["data"]["total"] == 3


@pytest.mark.parametrize(("payload", "field", "code"), [
    ({"event": "x"}, "email", "invalid_type"),
    ({"email": "a@b.co"}, "event", "invalid_type"),
    ({"email": "not-an-email", "event": "x"}, "email", "invalid_string"),
    ({"email": 5, "event": "x"}, "email", "invalid_type"),
    ({"email": "a@b.co", "event": ""}, "event", "too_small"),
    ({"email": "a@b.co", "event": "x" * 201}, "event", "too_big"),
    ({"email": "a@b.co", "event": "x", "subscribed": "yes"}, "subscribed", "invalid_type"),
    ({"email": "a@b.co", "event": "x", "data": [1, 2]}, "data", "invalid_type"),
    ({"email": "a@b.co", "event": "x", "data": {str(i): i for i in range(300)}}, "data", "too_big"),
])
async def test_track_validation_errors(api, payload, field, code):
    status, body = await api.call("POST", "/v1/track", json=payload)
    assert status == 422
    assert body["success"] is False
    assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == [(field, code)]


async def test_malformed_json_is_bad_request(api):
    status, body = await api.call("POST", "/v1/track", data=b'{"email": ', headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST"
    status, body = await api.call("POST", "/v1/track", data=b"[1,2]")
    assert status == 422 and body["error"]["errors"][0]["field"] == "body"


async def test_oversized_body_is_413(api, config):
    big = b'{"email":"a@b.co","event":"x","data":{"k":"' + b"x" * (config.api.max_body_bytes + 10) + b'"}}'
    status, body = await api.call("POST", "/v1/track", data=big)
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer sk_wrong"}, {"Authorization": "Bearer junk"}])
async def test_missing_or_unknown_key_is_401(api, headers):
    resp = await api.client.post("/v1/track", json={"email": "a@b.co", "event": "x"},
                                 headers=headers or {"Authorization": ""})
    body = await resp.json()
    assert resp.status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    assert body["error"]["requestId"] == resp.headers["X-Request-Id"]


async def test_concurrent_tracks_for_one_new_email_make_one_contact(api):
    results = await asyncio.gather(*[
        api.call("POST", "/v1/track", json={"email": "race@example.com", "event": "e", "data": {f"k{i}": i}})
        for i in range(20)])
    assert {status for status, _ in results} == {200}
    assert len({body["data"]["contact"] for _, body in results}) == 1
    contact = await contact_of(api, "race@example.com")
    assert contact.data == {f"k{i}": i for i in range(20)}, "no update is lost"
