"""Segments: every operator against contacts that should and should not match, event conditions with
controlled timestamps, validation errors by path and code, the HTTP edges, the /events guard, membership
tracking, and the cost of tracking on /v1/track (no segment query for a project that tracks none)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from pipeline.marketing.segments import MAX_DEPTH, MAX_NODES, slugify
from storage.models import Campaign, Contact, Event, SegmentMember, new_id, utcnow
from storage.segments import CONTACTS, condition_clause, parse_instant

NOW = utcnow()


# ---------------------------------------------------------------------------------------------------
# Helpers.

async def add_contact(api, email: str, data: dict | None = None, subscribed: bool = True,
                      created_at: datetime | None = None) -> str:
    status, body = await api.call("POST", "/contacts", json={"email": email, "data": data or {},
                                                             "subscribed": subscribed})
    assert status == 201, body
    contact_id = body["data"]["id"]
    if created_at is not None:
        table = Contact.__table__
        await api.db.write(lambda s: s.connection().execute(
            table.update().where(table.c.id == contact_id).values(created_at=created_at, updated_at=created_at)))
    return contact_id


async def add_event(api, contact_id: str, name: str, created_at: datetime) -> None:
    row = {"id": new_id(), "project_id": api.project_id, "contact_id": contact_id, "name": name, "data": {},
           "email_id": None, "created_at": created_at}
    await api.db.write(lambda s: s.connection().execute(Event.__table__.insert(), row))


async def create_segment(api, condition: Any, name: str | None = None, track: bool = False) -> dict:
    status, body = await api.call("POST", "/segments", json={
        "name": name or f"s-{new_id()}", "condition": condition, "trackMembership": track})
    assert status == 201, body
    return body["data"]


async def matching_emails(api, condition: Any) -> set[str]:
    """The emails the condition matches, through /segments/{id}/contacts; checked against /count."""
    segment = await create_segment(api, condition)
    status, body = await api.call("GET", f"/segments/{segment['id']}/contacts?limit=100")
    assert status == 200, body
    emails = {item["email"] for item in body["data"]["items"]}
    assert body["data"]["total"] == len(emails)
    status, counted = await api.call("GET", f"/segments/{segment['id']}/count")
    assert status == 200 and counted["data"] == {"count": len(emails)}, counted
    status, _ = await api.call("DELETE", f"/segments/{segment['id']}")
    assert status == 200
    return emails


async def event_names(api) -> list[str]:
    status, body = await api.call("GET", "/events?limit=100")
    assert status == 200, body
    return [item["name"] for item in body["data"]["items"]]


async def segment_events(api) -> list[str]:
    return sorted(name for name in await event_names(api) if name.startswith("segment."))


async def members(api, segment_id: str) -> set[str]:
    table = SegmentMember.__table__
    rows = await api.db.read(lambda s: s.connection().execute(
        select(table.c.contact_id).where(table.c.segment_id == segment_id)).scalars().all())
    return set(rows)


# ---------------------------------------------------------------------------------------------------
# Field operators.

@pytest.fixture
async def people(api) -> dict[str, str]:
    ids = {}
    ids["ann"] = await add_contact(api, "ann@example.com", {
        "plan": "pro", "age": 30, "vip": True, "signup": "2024-03-01T10:00:00.000Z", "Name": "Ann"},
        created_at=datetime(2020, 1, 1, tzinfo=UTC))
    ids["bob"] = await add_contact(api, "bob@example.com", {
        "plan": "free", "age": 17.5, "vip": False, "signup": "2023-12-31T23:59:59.000Z", "é": "ü",
        'we"ird.key': "yes"}, subscribed=False, created_at=datetime(2021, 6, 1, 12, tzinfo=UTC))
    ids["cy"] = await add_contact(api, "cy@sample.org", {"plan": 3, "age": "30", "nested": {"plan": "pro"}},
                                  created_at=datetime(2022, 1, 1, tzinfo=UTC))
    ids["dee"] = await add_contact(api, "dee@sample.org", {})
    return ids


def leaf(field: str, op: str, value: Any = None) -> dict:
    return {"field": field, "op": op} if op in ("exists", "notExists") else {"field": field, "op": op, "value": value}


FIELD_CASES = [
    (leaf("email", "equals", "ANN@Example.com"), {"ann"}),
    (leaf("email", "notEquals", "ann@example.com"), {"bob", "cy", "dee"}),
    (leaf("email", "contains", "@sample."), {"cy", "dee"}),
    (leaf("email", "contains", "SAMPLE"), {"cy", "dee"}),
    (leaf("email", "notContains", "sample"), {"ann", "bob"}),
    (leaf("subscribed", "equals", True), {"ann", "cy", "dee"}),
    (leaf("subscribed", "equals", False), {"bob"}),
    (leaf("subscribed", "notEquals", True), {"bob"}),
    (leaf("createdAt", "before", "2021-06-01"), {"ann"}),
    (leaf("createdAt", "before", "2021-06-01T12:00:00Z"), {"ann"}),
    (leaf("createdAt", "before", "2021-06-01T12:00:01+00:00"), {"ann", "bob"}),
    (leaf("createdAt", "after", "2021-06-01T13:00:00+02:00"), {"bob", "cy", "dee"}),
    (leaf("createdAt", "after", "2021-12-31"), {"cy", "dee"}),
    (leaf("updatedAt", "before", "2022-01-01T00:00:00.001Z"), {"ann", "bob", "cy"}),
    (leaf("data.plan", "equals", "pro"), {"ann"}),
    (leaf("data.plan", "equals", "PRO"), set()),
    (leaf("data.plan", "equals", 3), {"cy"}),
    (leaf("data.plan", "equals", 3.0), {"cy"}),
    (leaf("data.plan", "notEquals", "pro"), {"bob", "cy", "dee"}),
    (leaf("data.age", "equals", 30), {"ann"}),
    (leaf("data.age", "equals", "30"), {"cy"}),
    (leaf("data.vip", "equals", True), {"ann"}),
    (leaf("data.vip", "equals", False), {"bob"}),
    (leaf("data.vip", "notEquals", True), {"bob", "cy", "dee"}),
    (leaf("data.plan", "contains", "r"), {"ann", "bob"}),
    (leaf("data.plan", "contains", "R"), set()),
    (leaf("data.plan", "notContains", "r"), {"cy", "dee"}),
    (leaf("data.Name", "contains", "An"), {"ann"}),
    (leaf("data.name", "exists"), set()),
    (leaf("data.plan", "exists"), {"ann", "bob", "cy"}),
    (leaf("data.plan", "notExists"), {"dee"}),
    (leaf("data.nested", "exists"), {"cy"}),
    (leaf("data.age", "greaterThan", 18), {"ann"}),
    (leaf("data.age", "greaterThan", 17.5), {"ann"}),
    (leaf("data.age", "lessThan", 18), {"bob"}),
    (leaf("data.age", "lessThan", 1e300), {"ann", "bob"}),
    (leaf("data.signup", "before", "2024-01-01"), {"bob"}),
    (leaf("data.signup", "after", "2024-03-01T09:59:59Z"), {"ann"}),
    (leaf("data.signup", "after", "2024-03-01T12:00:00+02:00"), set()),
    (leaf("data.signup", "before", "2024-03-01T12:00:00.001+02:00"), {"ann", "bob"}),
    (leaf("data.é", "equals", "ü"), {"bob"}),
    (leaf('data.we"ird.key', "equals", "yes"), {"bob"}),
    ({"all": []}, {"ann", "bob", "cy", "dee"}),
    ({"any": []}, set()),
    ({"all": [leaf("data.plan", "exists"), leaf("subscribed", "equals", True)]}, {"ann", "cy"}),
    ({"any": [leaf("data.plan", "equals", "pro"), leaf("email", "contains", "dee")]}, {"ann", "dee"}),
    ({"not": leaf("email", "contains", "sample")}, {"ann", "bob"}),
    ({"not": {"any": [leaf("data.plan", "notExists"), leaf("data.vip", "equals", False)]}}, {"ann", "cy"}),
    ({"not": leaf("data.age", "greaterThan", 18)}, {"bob", "cy", "dee"}),
    ({"all": [{"not": {"not": leaf("data.vip", "exists")}}, {"any": [leaf("data.age", "lessThan", 20),
                                                                   leaf("email", "equals", "ann@example.com")]}]},
     {"ann", "bob"}),
]


async def test_field_operators_match_exactly_the_right_contacts(api, people):
    for condition, expected in FIELD_CASES:
        emails = await matching_emails(api, condition)
        assert {email.split("@")[0] for email in emails} == expected, condition


# ---------------------------------------------------------------------------------------------------
# Event conditions.

async def test_event_conditions_count_and_window(api):
    a = await add_contact(api, "a@example.com")
    b = await add_contact(api, "b@example.com")
    await add_contact(api, "c@example.com")
    for days in (2, 10, 40):
        await add_event(api, a, "purchase", NOW - timedelta(days=days))
    await add_event(api, b, "purchase", NOW - timedelta(hours=12))
    await add_event(api, b, "refund", NOW - timedelta(hours=1))
    cases = [
        ({"event": "purchase", "op": "did"}, {"a", "b"}),
        ({"event": " purchase ", "op": "did"}, {"a", "b"}),
        ({"event": "purchase", "op": "did", "atLeast": 1}, {"a", "b"}),
        ({"event": "purchase", "op": "did", "atLeast": 2}, {"a"}),
        ({"event": "purchase", "op": "did", "atLeast": 3}, {"a"}),
        ({"event": "purchase", "op": "did", "atLeast": 4}, set()),
        ({"event": "purchase", "op": "did", "atLeast": 2, "withinDays": 30}, {"a"}),
        ({"event": "purchase", "op": "did", "atLeast": 3, "withinDays": 30}, set()),
        ({"event": "purchase", "op": "did", "atLeast": 3, "withinDays": 41}, {"a"}),
        ({"event": "purchase", "op": "did", "withinDays": 5}, {"a", "b"}),
        ({"event": "purchase", "op": "did", "withinDays": 1}, {"b"}),
        ({"event": "purchase", "op": "did", "atLeast": 2, "withinDays": 5}, set()),
        ({"event": "purchase", "op": "did", "withinDays": None}, {"a", "b"}),
        ({"event": "purchase", "op": "didNot"}, {"c"}),
        ({"event": "purchase", "op": "didNot", "withinDays": 1}, {"a", "c"}),
        ({"event": "purchase", "op": "didNot", "withinDays": 3}, {"c"}),
        ({"event": "refund", "op": "did"}, {"b"}),
        ({"event": "never", "op": "didNot"}, {"a", "b", "c"}),
        ({"all": [{"event": "purchase", "op": "did"}, {"event": "refund", "op": "didNot"}]}, {"a"}),
        ({"not": {"event": "purchase", "op": "did", "atLeast": 2}}, {"b", "c"}),
    ]
    for condition, expected in cases:
        emails = await matching_emails(api, condition)
        assert {email.split("@")[0] for email in emails} == expected, condition


async def test_condition_clause_in_a_fan_out_query(api):
    """The campaign fan-out's own query shape: subscribed contacts after a cursor, in id order, in chunks."""
    ids = [await add_contact(api, f"f{i}@example.com", {"n": i}, subscribed=i != 3) for i in range(6)]
    await add_event(api, ids[4], "opened", NOW - timedelta(days=1))
    tree = {"any": [{"field": "data.n", "op": "lessThan", "value": 4}, {"event": "opened", "op": "did"}]}

    def chunk(session, cursor: str):
        stmt = (select(CONTACTS.c.id, CONTACTS.c.email)
                .where(CONTACTS.c.project_id == api.project_id, CONTACTS.c.subscribed.is_(True),
                       CONTACTS.c.id > cursor, condition_clause(tree, utcnow()))
                .order_by(CONTACTS.c.id).limit(2))
        return [tuple(row) for row in session.connection().execute(stmt)]

    seen, cursor = [], ""
    while rows := await api.db.read(chunk, cursor):
        seen += rows
        cursor = rows[-1][0]
    assert [row[1] for row in seen] == ["f0@example.com", "f1@example.com", "f2@example.com", "f4@example.com"]


def test_parse_instant_and_slugs():
    assert parse_instant("2024-03-01") == datetime(2024, 3, 1, tzinfo=UTC)
    assert parse_instant("2024-03-01t12:30:00.123456789+02:00") == datetime(2024, 3, 1, 10, 30, 0, 123456, tzinfo=UTC)
    assert parse_instant("0001-01-01T00:00:00+01:00") == datetime.min.replace(tzinfo=UTC)
    for bad in ("2024-02-30", "2024-03-01 10:00:00Z", "2024-03-01T10:00Z", "20240301", "2024-03-01T10:00:00",
                "2024-03-01T10:00:00+24:00", "tomorrow", "２０２４-03-01"):
        with pytest.raises(ValueError):
            parse_instant(bad)
    assert slugify("Pro users") == "pro-users"
    assert slugify("  Café — VIP!! ") == "cafe-vip"
    assert slugify("a.b_c") == "a-b-c"
    assert slugify("!!!") == "segment"
    assert slugify("日本 ユーザー") == "日本-ユーザー"
    assert len(slugify("x" * 200)) == 100


# ---------------------------------------------------------------------------------------------------
# Validation.

def nested_nots(levels: int) -> dict:
    node: dict = leaf("email", "contains", "a")
    for _ in range(levels - 1):
        node = {"not": node}
    return node


GOOD = leaf("email", "equals", "a@example.com")
VALIDATION_CASES = [
    ({"all": [GOOD, {"field": "email", "op": "like", "value": "x"}]}, [("condition.all.1.op", "unknown_operator")]),
    ({"field": "phone", "op": "equals", "value": "x"}, [("condition.field", "unknown_field")]),
    ({"field": "data.", "op": "exists"}, [("condition.field", "unknown_field")]),
    ({"field": "data." + "k" * 201, "op": "exists"}, [("condition.field", "too_big")]),
    ({"field": 7, "op": "equals", "value": "x"}, [("condition.field", "invalid_type")]),
    ({"field": "email", "op": "greaterThan", "value": 1}, [("condition.op", "invalid_operator")]),
    ({"field": "email", "op": "did", "value": "x"}, [("condition.op", "invalid_operator")]),
    ({"field": "subscribed", "op": "contains", "value": "x"}, [("condition.op", "invalid_operator")]),
    ({"field": "createdAt", "op": "equals", "value": "2024-01-01"}, [("condition.op", "invalid_operator")]),
    ({"field": "email", "op": 3, "value": "x"}, [("condition.op", "invalid_type")]),
    ({"field": "email", "value": "x"}, [("condition.op", "required")]),
    ({"field": "email", "op": "equals"}, [("condition.value", "required")]),
    ({"field": "email", "op": "equals", "value": 1}, [("condition.value", "invalid_type")]),
    ({"field": "email", "op": "equals", "value": "x" * 1001}, [("condition.value", "too_big")]),
    ({"field": "subscribed", "op": "equals", "value": "true"}, [("condition.value", "invalid_type")]),
    ({"field": "data.age", "op": "greaterThan", "value": "18"}, [("condition.value", "invalid_type")]),
    ({"field": "data.age", "op": "greaterThan", "value": True}, [("condition.value", "invalid_type")]),
    ({"field": "data.age", "op": "lessThan", "value": 1e301}, [("condition.value", "too_big")]),
    ({"field": "data.age", "op": "equals", "value": 10 ** 400}, [("condition.value", "too_big")]),
    ({"field": "data.x", "op": "equals", "value": [1]}, [("condition.value", "invalid_type")]),
    ({"field": "data.x", "op": "equals", "value": None}, [("condition.value", "invalid_type")]),
    ({"field": "data.x", "op": "contains", "value": 1}, [("condition.value", "invalid_type")]),
    ({"field": "data.x", "op": "exists", "value": 1}, [("condition.value", "unknown_key")]),
    ({"field": "data.x", "op": "exists", "extra": 1}, [("condition.extra", "unknown_key")]),
    ({"field": "createdAt", "op": "before", "value": "yesterday"}, [("condition.value", "invalid_date")]),
    ({"field": "data.d", "op": "after", "value": "2024-02-30"}, [("condition.value", "invalid_date")]),
    ({"field": "createdAt", "op": "before", "value": 1700000000}, [("condition.value", "invalid_type")]),
    ({"event": "x", "op": "did", "atLeast": 0}, [("condition.atLeast", "too_small")]),
    ({"event": "x", "op": "did", "atLeast": 1_000_001}, [("condition.atLeast", "too_big")]),
    ({"event": "x", "op": "did", "atLeast": "2"}, [("condition.atLeast", "invalid_type")]),
    ({"event": "x", "op": "did", "atLeast": True}, [("condition.atLeast", "invalid_type")]),
    ({"event": "x", "op": "did", "withinDays": 1.5}, [("condition.withinDays", "invalid_type")]),
    ({"event": "x", "op": "did", "withinDays": 36_501}, [("condition.withinDays", "too_big")]),
    ({"event": "x", "op": "didNot", "atLeast": 2}, [("condition.atLeast", "unknown_key")]),
    ({"event": "x", "op": "equals"}, [("condition.op", "invalid_operator")]),
    ({"event": "x"}, [("condition.op", "required")]),
    ({"event": "x", "op": "did", "value": 1}, [("condition.value", "unknown_key")]),
    ({"event": "  ", "op": "did"}, [("condition.event", "too_small")]),
    ({"event": "e" * 201, "op": "did"}, [("condition.event", "too_big")]),
    ({"event": 5, "op": "did"}, [("condition.event", "invalid_type")]),
    ({}, [("condition", "invalid_condition")]),
    ({"foo": 1}, [("condition", "invalid_condition")]),
    ({"all": GOOD}, [("condition.all", "invalid_type")]),
    ({"any": [1, GOOD, "x"]}, [("condition.any.0", "invalid_type"), ("condition.any.2", "invalid_type")]),
    ({"not": {"all": [], "extra": 1}}, [("condition.not.extra", "unknown_key")]),
    ({"all": [], "any": []}, [("condition.any", "unknown_key")]),
    ({"any": [{"all": [{"not": {"field": "email", "op": "exists"}}]}]},
     [("condition.any.0.all.0.not.op", "invalid_operator")]),
    ({"all": [{"field": "nope", "op": "equals", "value": 1}, {"event": "x", "op": "did", "atLeast": 0}]},
     [("condition.all.0.field", "unknown_field"), ("condition.all.1.atLeast", "too_small")]),
    (nested_nots(MAX_DEPTH + 1), [("condition" + ".not" * MAX_DEPTH, "too_deep")]),
    ({"any": [GOOD] * MAX_NODES}, [(f"condition.any.{MAX_NODES - 1}", "too_many_nodes")]),
]


async def test_condition_errors_name_the_path_and_code(api):
    for condition, expected in VALIDATION_CASES:
        status, body = await api.call("POST", "/segments", json={"name": "bad", "condition": condition})
        assert status == 422, (condition, body)
        assert body["error"]["code"] == "VALIDATION_ERROR"
        assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == expected, condition
    segment = await create_segment(api, GOOD)
    status, body = await api.call("PATCH", f"/segments/{segment['id']}",
                                  json={"condition": {"all": [GOOD, {"field": "email", "op": "like", "value": 1}]}})
    assert status == 422
    assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == [("condition.all.1.op", "unknown_operator")]


async def test_limits_are_inclusive(api):
    await create_segment(api, nested_nots(MAX_DEPTH))
    await create_segment(api, {"any": [GOOD] * (MAX_NODES - 1)})
    await create_segment(api, {"event": "x", "op": "did", "atLeast": 1_000_000, "withinDays": 36_500})
    await create_segment(api, {"event": "x", "op": "did", "atLeast": 2.0})


async def test_bad_requests(api):
    _, _, other_pk = await api.new_project("other")
    for body, field, code in [({"condition": GOOD}, "name", "invalid_type"),
                              ({"name": "", "condition": GOOD}, "name", "too_small"),
                              ({"name": "x" * 201, "condition": GOOD}, "name", "too_big"),
                              ({"name": "x"}, "condition", "invalid_type"),
                              ({"name": "x", "condition": "all"}, "condition", "invalid_type"),
                              ({"name": "x", "condition": [GOOD]}, "condition", "invalid_type"),
                              ({"name": "x", "condition": GOOD, "trackMembership": "yes"}, "trackMembership",
                               "invalid_type"),
                              ({"name": "x\x00", "condition": GOOD}, "name", "invalid_string")]:
        status, reply = await api.call("POST", "/segments", json=body)
        assert status == 422, (body, reply)
        assert (field, code) in [(e["field"], e["code"]) for e in reply["error"]["errors"]], reply
    status, reply = await api.call("POST", "/segments", json=["x"])
    assert status == 422 and reply["error"]["errors"][0]["field"] == "body"
    status, reply = await api.call("POST", "/segments", data=b'{"name": "x", "condition": {', headers={
        "Content-Type": "application/json"})
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST"
    status, reply = await api.call("POST", "/segments", data=b"", headers={"Content-Type": "application/json"})
    assert status == 400
    huge = {"name": "x", "condition": {"any": [leaf("email", "equals", "x" * 1000)] * 16_000}}
    status, reply = await api.call("POST", "/segments", json=huge)
    assert status == 413 and reply["error"]["code"] == "PAYLOAD_TOO_LARGE"
    deep: dict = GOOD
    for _ in range(40):
        deep = {"not": deep}
    status, reply = await api.call("POST", "/segments", json={"name": "x", "condition": deep})
    assert status == 422 and {e["code"] for e in reply["error"]["errors"]} == {"too_deep"}
    for method, path in [("GET", "/segments"), ("POST", "/segments"), ("GET", "/segments/x"),
                         ("PATCH", "/segments/x"), ("DELETE", "/segments/x"), ("GET", "/segments/x/contacts"),
                         ("GET", "/segments/x/count")]:
        resp = await api.client.request(method, path, json={"name": "x", "condition": GOOD})
        assert resp.status == 401, (method, path)
        status, reply = await api.call(method, path, key=api.pk, json={"name": "x", "condition": GOOD})
        assert status == 403 and reply["error"]["code"] == "FORBIDDEN", (method, path)
        status, reply = await api.call(method, path, key=other_pk, json={"name": "x", "condition": GOOD})
        assert status == 403
    status, reply = await api.call("GET", "/segments?limit=0")
    assert status == 422 and reply["error"]["errors"][0]["field"] == "limit"
    status, reply = await api.call("GET", "/segments?cursor=nope")
    assert status == 422 and reply["error"]["errors"][0]["field"] == "cursor"


async def test_unknown_and_foreign_segments_are_404(api):
    other_id, other_sk, _ = await api.new_project("other")
    status, body = await api.call("POST", "/segments", key=other_sk, json={"name": "theirs", "condition": GOOD})
    assert status == 201
    theirs = body["data"]["id"]
    for segment_id in (new_id(), theirs, "not-an-id"):
        for method, path, payload in [("GET", "", None), ("PATCH", "", {"name": "y"}), ("DELETE", "", None),
                                      ("GET", "/contacts", None), ("GET", "/count", None)]:
            status, body = await api.call(method, f"/segments/{segment_id}{path}", json=payload)
            assert status == 404 and body["error"]["code"] == "NOT_FOUND", (method, path, body)
    status, body = await api.call("GET", f"/segments/{theirs}", key=other_sk)
    assert status == 200


# ---------------------------------------------------------------------------------------------------
# CRUD and listing.

async def test_create_get_update_delete(api):
    await add_contact(api, "pro@example.com", {"plan": "pro"})
    await add_contact(api, "free@example.com", {"plan": "free"}, subscribed=False)
    condition = {"field": "data.plan", "op": "exists"}
    status, body = await api.call("POST", "/v1/segments", json={"name": "Paying Users!", "condition": condition})
    assert status == 201, body
    segment = body["data"]
    assert segment["slug"] == "paying-users" and segment["condition"] == condition
    assert segment["trackMembership"] is False and "count" not in segment
    status, body = await api.call("GET", f"/segments/{segment['id']}")
    assert status == 200 and body["data"]["count"] == 2 and body["data"]["name"] == "Paying Users!"

    status, body = await api.call("POST", "/segments", json={"name": "paying users", "condition": GOOD})
    assert status == 409 and body["error"]["code"] == "CONFLICT" and "paying-users" in body["error"]["message"]
    other = await create_segment(api, GOOD, name="Other")
    status, body = await api.call("PATCH", f"/segments/{other['id']}", json={"name": "Paying-Users"})
    assert status == 409 and body["error"]["code"] == "CONFLICT"

    new_condition = {"field": "data.plan", "op": "equals", "value": "pro"}
    status, body = await api.call("PATCH", f"/segments/{segment['id']}",
                                  json={"name": "Pro", "condition": new_condition})
    assert status == 200, body
    assert body["data"]["slug"] == "pro" and body["data"]["condition"] == new_condition
    assert body["data"]["updatedAt"] >= segment["updatedAt"]
    status, body = await api.call("PATCH", f"/segments/{segment['id']}", json={"name": "Pro"})
    assert status == 200 and body["data"]["slug"] == "pro"
    status, body = await api.call("PATCH", f"/segments/{segment['id']}", json={})
    assert status == 200 and body["data"]["condition"] == new_condition
    status, body = await api.call("GET", f"/segments/{segment['id']}/count")
    assert status == 200 and body["data"] == {"count": 1}
    status, body = await api.call("GET", f"/api/v1/segments/{segment['id']}/count")
    assert status == 200 and body == {"count": 1}
    status, body = await api.call("GET", "/api/v1/segments")
    assert status == 200 and isinstance(body, list) and len(body) == 2

    status, body = await api.call("DELETE", f"/segments/{segment['id']}")
    assert status == 200 and body["data"]["id"] == segment["id"]
    status, _ = await api.call("GET", f"/segments/{segment['id']}")
    assert status == 404
    status, _ = await api.call("POST", "/segments", json={"name": "pro", "condition": GOOD})
    assert status == 201


async def test_list_segments_paginates_newest_first(api):
    made = [(await create_segment(api, GOOD, name=f"seg {i}"))["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        status, body = await api.call("GET", "/segments?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200 and body["data"]["total"] == 5
        seen += [item["id"] for item in body["data"]["items"]]
        if not body["data"]["hasMore"]:
            assert body["data"]["nextCursor"] is None
            break
        cursor = body["data"]["nextCursor"]
    assert seen == made[::-1]


async def test_segment_contacts_paginate_newest_first_subscribed_or_not(api):
    made = []
    for i in range(5):
        made.append(await add_contact(api, f"m{i}@example.com", {"group": "a"}, subscribed=i % 2 == 0))
        await add_contact(api, f"x{i}@example.com", {"group": "b"})
    segment = await create_segment(api, {"field": "data.group", "op": "equals", "value": "a"})
    seen, cursor, pages = [], None, 0
    while True:
        status, body = await api.call(
            "GET", f"/segments/{segment['id']}/contacts?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        page = body["data"]
        assert page["total"] == 5 and len(page["items"]) <= 2
        seen += page["items"]
        pages += 1
        if not page["hasMore"]:
            break
        cursor = page["nextCursor"]
    assert pages == 3
    assert [item["id"] for item in seen] == made[::-1]
    assert {item["subscribed"] for item in seen} == {True, False}
    assert set(seen[0]) == {"id", "email", "subscribed", "data", "createdAt", "updatedAt"}
    status, body = await api.call("GET", f"/api/v1/segments/{segment['id']}/contacts?limit=1")
    assert status == 200 and isinstance(body, list) and body[0]["id"] == made[-1]


async def test_segment_used_by_a_campaign_cannot_be_deleted(api):
    segment = await create_segment(api, GOOD)
    row = {"id": new_id(), "project_id": api.project_id, "name": "c", "subject": "s", "body": "b", "style": "PLUNK",
           "audience": "SEGMENT", "segment_id": segment["id"], "recipients": [], "status": "DRAFT",
           "fanout_done": False, "recipient_count": 0, "created_at": NOW, "updated_at": NOW}
    await api.db.write(lambda s: s.connection().execute(Campaign.__table__.insert(), row))
    status, body = await api.call("DELETE", f"/segments/{segment['id']}")
    assert status == 409 and body["error"]["code"] == "CONFLICT" and "campaign" in body["error"]["message"]
    status, _ = await api.call("GET", f"/segments/{segment['id']}")
    assert status == 200
    table = Campaign.__table__
    await api.db.write(lambda s: s.connection().execute(table.delete().where(table.c.id == row["id"])))
    status, _ = await api.call("DELETE", f"/segments/{segment['id']}")
    assert status == 200


async def test_a_finished_campaign_keeps_a_snapshot_of_its_deleted_segment(api):
    """Issue 20: a SENT (or CANCELLED) campaign no longer blocks deleting its segment with a 409; it keeps
    what it was sent to. A campaign still to go out keeps blocking it."""
    segment = await create_segment(api, GOOD)
    rows = [{"id": new_id(), "project_id": api.project_id, "name": status, "subject": "s", "body": "b",
             "style": "PLUNK", "audience": "SEGMENT", "segment_id": segment["id"], "recipients": [], "status": status,
             "fanout_done": status != "SENDING", "recipient_count": 3, "created_at": NOW, "updated_at": NOW}
            for status in ("SENT", "CANCELLED", "SENDING")]
    await api.db.write(lambda s: s.connection().execute(Campaign.__table__.insert(), rows))
    status, body = await api.call("DELETE", f"/segments/{segment['id']}")
    assert (status, body["error"]["code"]) == (409, "CONFLICT") and "not finished" in body["error"]["message"]
    table = Campaign.__table__
    await api.db.write(lambda s: s.connection().execute(table.delete().where(table.c.id == rows[2]["id"])))

    status, body = await api.call("DELETE", f"/segments/{segment['id']}")
    assert status == 200, body
    status, _ = await api.call("GET", f"/segments/{segment['id']}")
    assert status == 404
    for row in rows[:2]:
        status, body = await api.call("GET", f"/campaigns/{row['id']}")
        assert status == 200, body
        assert body["data"]["segment"] is None and body["data"]["audience"] == "SEGMENT"
        assert body["data"]["segmentSnapshot"] == {"id": segment["id"], "name": segment["name"], "condition": GOOD}


async def test_events_a_segment_uses_cannot_be_deleted(api):
    for name in ("signed-up", "clicked"):
        status, _ = await api.call("POST", "/v1/track", json={"email": "ann@example.com", "event": name})
        assert status == 200
    segment = await create_segment(api, {"all": [GOOD, {"not": {"event": "signed-up", "op": "did"}}]},
                                   name="Never signed up")
    status, body = await api.call("DELETE", "/events/signed-up")
    assert status == 409 and body["error"]["code"] == "CONFLICT"
    assert "Never signed up" in body["error"]["message"] and body["message"] == body["error"]["message"]
    status, body = await api.call("DELETE", "/v1/events/clicked")
    assert status == 200 and body["data"] == {"name": "clicked", "deleted": 1}
    assert "signed-up" in await event_names(api)
    status, _ = await api.call("PATCH", f"/segments/{segment['id']}", json={"condition": GOOD})
    assert status == 200
    status, body = await api.call("DELETE", "/events/signed-up")
    assert status == 200 and body["data"]["deleted"] == 1


# ---------------------------------------------------------------------------------------------------
# Membership tracking.

async def test_membership_entry_exit_and_no_event_without_change(api):
    already = await add_contact(api, "already@example.com", {"plan": "pro"})
    segment = await create_segment(api, {"all": [{"field": "data.plan", "op": "equals", "value": "pro"},
                                                 {"field": "subscribed", "op": "equals", "value": True}]},
                                   name="Pro users", track=True)
    assert await members(api, segment["id"]) == {already}
    assert await segment_events(api) == []  # the snapshot records no entries

    track = {"email": "new@example.com", "event": "visit", "data": {"plan": "free"}}
    status, body = await api.call("POST", "/v1/track", key=api.pk, json=track)
    assert status == 200
    new = body["data"]["contact"]
    assert await segment_events(api) == []
    status, _ = await api.call("POST", "/v1/track", key=api.pk, json={**track, "data": {"plan": "pro"}})
    assert status == 200
    assert await segment_events(api) == ["segment.pro-users.entry"]
    assert await members(api, segment["id"]) == {already, new}

    status, _ = await api.call("POST", "/v1/track", key=api.pk, json={**track, "data": {"plan": "pro", "n": 2}})
    status, _ = await api.call("PATCH", f"/contacts/{new}", json={"data": {"other": 1}})
    assert await segment_events(api) == ["segment.pro-users.entry"]

    status, _ = await api.call("POST", "/contacts/unsubscribe", json={"email": "new@example.com"})
    assert status == 200
    assert await segment_events(api) == ["segment.pro-users.entry", "segment.pro-users.exit"]
    status, _ = await api.call("POST", "/contacts/subscribe", json={"id": new})
    assert await segment_events(api) == ["segment.pro-users.entry", "segment.pro-users.entry",
                                         "segment.pro-users.exit"]
    status, _ = await api.call("PUT", "/contacts", json={"id": already, "data": {"plan": "team"}})
    assert status == 200
    assert await members(api, segment["id"]) == {new}
    status, body = await api.call("GET", f"/events/contact/{already}")
    assert [e["name"] for e in body["data"]["items"]] == ["segment.pro-users.exit"]
    assert body["data"]["items"][0]["data"] == {"segmentId": segment["id"]}

    status, body = await api.call("POST", "/contacts", json={"email": "fresh@example.com", "data": {"plan": "pro"}})
    assert status == 201
    status, body = await api.call("GET", f"/events/contact/{body['data']['id']}")
    assert [e["name"] for e in body["data"]["items"]] == ["segment.pro-users.entry"]


async def test_event_conditions_enter_on_track(api):
    segment = await create_segment(api, {"event": "purchase", "op": "did", "atLeast": 2}, name="Repeat buyers",
                                   track=True)
    track = {"email": "buyer@example.com", "event": "purchase"}
    status, _ = await api.call("POST", "/v1/track", json=track)
    assert status == 200 and await segment_events(api) == []
    status, body = await api.call("POST", "/v1/track", json=track)
    assert status == 200 and await segment_events(api) == ["segment.repeat-buyers.entry"]
    assert await members(api, segment["id"]) == {body["data"]["contact"]}
    status, _ = await api.call("POST", "/v1/track", json=track)
    assert await segment_events(api) == ["segment.repeat-buyers.entry"]


async def test_tracking_switch_and_condition_change_snapshot_without_events(api):
    a = await add_contact(api, "a@example.com", {"tier": 1})
    b = await add_contact(api, "b@example.com", {"tier": 2})
    segment = await create_segment(api, {"field": "data.tier", "op": "equals", "value": 1}, name="Tier")
    assert await members(api, segment["id"]) == set()
    status, body = await api.call("PATCH", f"/segments/{segment['id']}", json={"trackMembership": True})
    assert status == 200 and body["data"]["trackMembership"] is True
    assert await members(api, segment["id"]) == {a}
    status, _ = await api.call("PATCH", f"/segments/{segment['id']}",
                               json={"condition": {"field": "data.tier", "op": "greaterThan", "value": 1}})
    assert await members(api, segment["id"]) == {b}
    assert await segment_events(api) == []
    status, _ = await api.call("PUT", "/contacts", json={"id": a, "data": {"tier": 5}})
    assert await segment_events(api) == ["segment.tier.entry"]
    status, _ = await api.call("PATCH", f"/segments/{segment['id']}", json={"trackMembership": False})
    assert await members(api, segment["id"]) == set()
    status, _ = await api.call("PUT", "/contacts", json={"id": a, "data": {"tier": 0}})
    assert await segment_events(api) == ["segment.tier.entry"]
    status, _ = await api.call("DELETE", f"/segments/{segment['id']}")
    assert status == 200


class StatementLog:
    """Every SQL statement the app's engines run while active."""

    def __init__(self, db) -> None:
        self.engines = [e for e in (db.engine.sync_engine, db.sync_engine) if e is not None]
        self.statements: list[str] = []

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.statements.append(statement)

    def __enter__(self) -> StatementLog:
        for engine in self.engines:
            event.listen(engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc) -> None:
        for engine in self.engines:
            event.remove(engine, "before_cursor_execute", self._record)

    def touching_segments(self) -> list[str]:
        return [s for s in self.statements if "segment" in s.lower()]


async def test_track_runs_no_segment_query_without_tracked_segments(api):
    track = {"email": "t@example.com", "event": "visit", "data": {"n": 1}}
    await create_segment(api, {"field": "data.n", "op": "exists"}, name="Untracked")
    status, _ = await api.call("POST", "/v1/track", key=api.pk, json=track)  # caches "no tracked segments"
    assert status == 200
    with StatementLog(api.db) as log:
        for n in range(2, 5):
            status, _ = await api.call("POST", "/v1/track", key=api.pk, json={**track, "data": {"n": n}})
            assert status == 200
        status, _ = await api.call("POST", "/contacts/unsubscribe", json={"email": "t@example.com"})
        assert status == 200
    assert log.statements and log.touching_segments() == []

    await create_segment(api, {"field": "data.n", "op": "greaterThan", "value": 10}, name="Tracked", track=True)
    with StatementLog(api.db) as log:  # the write forgot the cached answer: no TTL to wait for
        status, _ = await api.call("POST", "/v1/track", key=api.pk, json={**track, "data": {"n": 11}})
        assert status == 200
    assert log.touching_segments()
    assert await segment_events(api) == ["segment.tracked.entry"]


# ---------------------------------------------------------------------------------------------------
# Random trees against a reference evaluator in Python (the same answers on SQLite and PostgreSQL).

RANDOM_CONTACTS = [
    ("ann@example.com", True, {"plan": "pro", "age": 30, "d": "2024-03-01T10:00:00.000Z", "tag": "Alpha"}, 2020),
    ("bob@example.com", False, {"plan": "free", "age": 17.5, "d": "2023-12-31", "tag": "alpha"}, 2021),
    ("cy@sample.org", True, {"plan": 3, "age": "30", "d": "2024-03-01T10:00:00Z", "vip": True}, 2022),
    ("dee@sample.org", True, {}, 2023),
    ("eve@example.net", False, {"plan": True, "age": -2, "vip": False, "tag": "b-c", "o": {"x": 1}}, 2024),
    ("fay@example.net", True, {"plan": "", "age": 0, "d": 20240301, "tag": "Ümlaut", "o": [1, 2]}, 2025),
]
RANDOM_EVENTS = {"ann": [("buy", 0.5), ("buy", 3.5), ("buy", 20.5), ("open", 1.5)], "bob": [("buy", 0.5)],
                 "cy": [("open", 10.5), ("open", 40.5)], "eve": [("buy", 100.5)]}
VALUE_POOLS = {
    "text": ["pro", "free", "PRO", "r", "", "alpha", "Alpha", "ü", "b-c", "30", "example", "@sample.", "ANN"],
    "scalar": ["pro", "free", "30", 30, 30.0, 3, -2, 0, True, False, 17.5],
    "number": [0, -2, 3, 17.5, 18, 30, 1e300, -0.5],
    "date": ["2024-03-01", "2024-03-01T10:00:00Z", "2024-03-01T12:00:00+02:00", "2023-12-31", "2021-06-01T00:00:00Z",
             "2024-01-01T00:00:00.000-05:00", "2030-01-01"],
    "boolean": [True, False],
}


def random_leaf(rng) -> dict:
    from pipeline.marketing.segments import _OPERANDS

    choice = rng.random()
    if choice < 0.2:
        node = {"event": rng.choice(["buy", "open", "none"]), "op": rng.choice(["did", "didNot"])}
        if node["op"] == "did" and rng.random() < 0.6:
            node["atLeast"] = rng.choice([1, 2, 3])
        if rng.random() < 0.6:
            node["withinDays"] = rng.choice([1, 2, 5, 30, 365, None])
        return node
    field = rng.choice(["email", "subscribed", "createdAt", "updatedAt", "data.plan", "data.age", "data.d",
                        "data.tag", "data.vip", "data.o", "data.missing"])
    kind = field if field in ("email", "subscribed") else "timestamp" if field.endswith("At") else "data"
    op = rng.choice(sorted(_OPERANDS[kind]))
    operand = _OPERANDS[kind][op]
    return leaf(field, op, rng.choice(VALUE_POOLS[operand]) if operand else None)


def random_tree(rng, depth: int = 1) -> dict:
    if depth < 4 and rng.random() < 0.4:
        kind = rng.choice(["all", "any", "not"])
        if kind == "not":
            return {"not": random_tree(rng, depth + 1)}
        return {kind: [random_tree(rng, depth + 1) for _ in range(rng.randint(0, 3))]}
    return random_leaf(rng)


def reference(tree: dict, contact: dict, events: list[tuple[str, datetime]], now: datetime) -> bool:
    from storage.segments import iso_text

    if "all" in tree:
        return all(reference(child, contact, events, now) for child in tree["all"])
    if "any" in tree:
        return any(reference(child, contact, events, now) for child in tree["any"])
    if "not" in tree:
        return not reference(tree["not"], contact, events, now)
    if "event" in tree:
        since = now - timedelta(days=tree["withinDays"]) if tree.get("withinDays") else datetime.min.replace(tzinfo=UTC)
        count = sum(1 for name, at in events if name == tree["event"] and at >= since)
        return count >= tree.get("atLeast", 1) if tree["op"] == "did" else count == 0
    op, value = tree["op"], tree.get("value")
    if op.startswith("not"):
        return not reference({**tree, "op": op[3].lower() + op[4:]}, contact, events, now)
    field = tree["field"]
    if field == "email":
        return contact["email"] == value.lower() if op == "equals" else value.lower() in contact["email"]
    if field == "subscribed":
        return contact["subscribed"] == value
    if field in ("createdAt", "updatedAt"):
        stamp = contact["created_at"]
        return stamp < parse_instant(value) if op == "before" else stamp > parse_instant(value)
    data = contact["data"]
    key = field[5:]
    present = key in data and data[key] is not None
    stored = data.get(key)
    is_number = isinstance(stored, int | float) and not isinstance(stored, bool)
    if op == "exists":
        return present
    if op == "equals":
        if isinstance(value, bool):
            return stored is value
        if isinstance(value, int | float):
            return is_number and float(stored) == float(value)
        return isinstance(stored, str) and stored == value
    if op == "contains":
        return isinstance(stored, str) and value in stored
    if op in ("greaterThan", "lessThan"):
        return is_number and (stored > value if op == "greaterThan" else stored < value)
    bound = iso_text(parse_instant(value))
    return isinstance(stored, str) and (stored < bound if op == "before" else stored > bound)


async def test_random_trees_agree_with_a_reference_evaluator(api):
    import random

    from pipeline.contacts import merge_data
    from pipeline.marketing.segments import validate_condition

    now = utcnow()
    contacts, events = [], {}
    for email, subscribed, data, year in RANDOM_CONTACTS:
        created = datetime(year, 3, 1, 10, tzinfo=UTC)
        contact_id = await add_contact(api, email, data, subscribed, created_at=created)
        stored, _ = merge_data({}, data)  # what the contact holds ("" values are ignored)
        contacts.append({"email": email, "subscribed": subscribed, "data": stored, "created_at": created})
        events[email] = [(name, now - timedelta(days=days))
                         for name, days in RANDOM_EVENTS.get(email.split("@")[0], [])]
        for name, at in events[email]:
            await add_event(api, contact_id, name, at)

    def matching(session, tree):
        stmt = select(CONTACTS.c.email).where(CONTACTS.c.project_id == api.project_id, condition_clause(tree, now))
        return set(session.connection().execute(stmt).scalars())

    rng = random.Random(20261123)
    seen_sizes = set()
    for _ in range(300):
        tree = random_tree(rng)
        validate_condition(tree)
        expected = {c["email"] for c in contacts if reference(tree, c, events[c["email"]], now)}
        assert await api.db.read(matching, tree) == expected, tree
        seen_sizes.add(len(expected))
    assert len(seen_sizes) >= 5  # the trees split the contacts in many ways, not all-or-nothing


async def test_imported_numbers_and_dates_are_compared_as_numbers_and_dates(api, config, tmp_path):
    """`plunkd contacts import` types the columns, so the segment from the issue matches (it matched
    nothing when every value was stored as text) and so do date conditions."""
    from tests.test_cli_and_config import plunkd

    csv_path = tmp_path / "people.csv"
    csv_path.write_text("email,age,joined\nold@example.org,69,2024-03-01\nyoung@example.org,25,2023-12-31\n"
                        "edge@example.org,60,2024-02-01T00:00:00Z\nnone@example.org,,\n")
    result = plunkd(tmp_path, "contacts", "import", str(csv_path), "--project", "test",
                    env={"PLUNKD_DATABASE_URL": config.database_url})
    assert result.returncode == 0, result.stderr
    assert "imported into test: 4 created, 0 updated, 0 skipped" in result.stdout
    assert await matching_emails(api, {"field": "data.age", "op": "greaterThan", "value": 60}) == {"old@example.org"}
    assert await matching_emails(api, {"field": "data.age", "op": "lessThan", "value": 61}) == {
        "young@example.org", "edge@example.org"}
    assert await matching_emails(api, {"field": "data.joined", "op": "after", "value": "2024-01-15"}) == {
        "old@example.org", "edge@example.org"}
    assert await matching_emails(api, {"field": "data.age", "op": "exists"}) == {
        "old@example.org", "young@example.org", "edge@example.org"}
    status, body = await api.call("POST", "/segments", json={
        "name": "text operand", "condition": {"field": "data.age", "op": "greaterThan", "value": "60"}})
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR"
