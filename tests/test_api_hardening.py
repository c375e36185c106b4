"""Hostile and malformed input to the HTTP API: each is refused at the door with a 4xx naming the
problem, nothing is stored, and replies stay valid JSON whatever the database already holds."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.contact_data import UNSTORABLE, json_problems
from pipeline.errors import FieldError
from storage import events as event_store


async def raw_call(api, method, path, body: bytes, key=None, headers=None):
    resp = await api.client.request(method, path, data=body, headers={
        **api.auth(key), "Content-Type": "application/json", **(headers or {})})
    return resp.status, await resp.json()


async def nothing_stored(api) -> None:
    _, events = await api.call("GET", "/events")
    _, contacts = await api.call("GET", "/contacts/count")
    assert events["data"]["total"] == 0 and contacts["data"]["count"] == 0


@pytest.mark.parametrize("data_json, field, code", [
    ('{"x": "\\ud800"}', "data.x", "invalid_string"),
    ('{"\\udfff": 1}', "data.\ufffd", "invalid_string"),  # the key, shown with U+FFFD for each surrogate
    ('{"x": NaN}', "data.x", "invalid_number"),
    ('{"x": -Infinity}', "data.x", "invalid_number"),
    ('{"x": 1e400}', "data.x", "invalid_number"),
])
async def test_track_refuses_unstorable_data_with_a_public_key(api, data_json, field, code):
    body = f'{{"email": "a@example.com", "event": "e", "data": {data_json}}}'.encode()
    status, reply = await raw_call(api, "POST", "/v1/track", body, key=api.pk)
    assert status == 422, reply
    assert reply["error"]["errors"][0]["field"].startswith(field) and reply["error"]["errors"][0]["code"] == code
    await nothing_stored(api)


async def test_nul_is_refused_outside_data_and_kept_inside(api):
    status, reply = await raw_call(api, "POST", "/v1/track", b'{"email": "a@example.com", "event": "a\\u0000b"}')
    assert status == 422 and reply["error"]["errors"][0]["field"] == "event"
    await nothing_stored(api)
    status, reply = await raw_call(api, "POST", "/v1/track",
                                   b'{"email": "a@example.com", "event": "e", "data": {"k": "a\\u0000b"}}')
    assert status == 200, reply
    _, contact = await api.call("GET", f"/contacts/{reply['data']['contact']}")
    assert contact["data"]["data"] == {"k": "a\x00b"}


async def test_data_over_the_configured_size_is_refused_naming_the_limit(api):
    payload = {"email": "a@example.com", "event": "e", "data": {"blob": "x" * (64 * 1024)}}
    status, reply = await api.call("POST", "/v1/track", key=api.pk, json=payload)
    assert status == 422
    error = reply["error"]["errors"][0]
    assert error["field"] == "data" and error["code"] == "too_big"
    assert "at most 65536 bytes" in error["message"] and "api.max_data_bytes" in error["message"]
    status, reply = await api.call("POST", "/contacts", json={"email": "b@example.com", **{
        "data": payload["data"]}})
    assert status == 422 and reply["error"]["errors"][0]["code"] == "too_big"
    await nothing_stored(api)


async def test_a_long_key_over_a_long_list_is_walked_in_linear_time_and_refused_for_its_size(api):
    """The walk for what no store can carry (an ignored field's NUL makes the body be walked) spelled every
    child's path, a copy of the long key for each element of the list: 160 KB took 7 s and 3 GB of the API
    process, a few hundred KB more could exhaust its memory. Now a 1.5 MB body is answered at once with the
    data's size refusal, and NUL inside `data` still passes the walk while one outside it does not."""
    key = "k" * 500_000
    body = ('{"email": "a@example.com", "event": "e", "data": {"k": {"' + key + '": [' + ",".join(["0"] * 500_000)
            + ']}}, "ignored": "\\u0000"}').encode()
    started = time.monotonic()
    status, reply = await raw_call(api, "POST", "/v1/track", body, key=api.pk)
    assert time.monotonic() - started < 10.0
    assert status == 422 and reply["error"]["errors"][0]["field"] == "data", reply
    assert reply["error"]["errors"][0]["code"] == "too_big"
    assert json_problems({"data": {key: ["a\x00b"] * 3}, "event": {"x": [1, "\x00"]}}) == [
        FieldError("event.x.1", UNSTORABLE, "invalid_string")]
    await nothing_stored(api)


async def test_deep_nesting_is_a_client_error(api):
    deep = b'{"email": "a@example.com", "event": "e", "data": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    status, reply = await raw_call(api, "POST", "/v1/track", deep)
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST" and "nested" in reply["message"]
    nested = b'{"email": "a@example.com", "event": "e", "data": {"x": ' + b"[" * 40 + b"]" * 40 + b"}}"
    status, reply = await raw_call(api, "POST", "/v1/track", nested)
    assert status == 422 and reply["error"]["errors"][0]["code"] == "too_deep"
    await nothing_stored(api)


@pytest.mark.parametrize("path, field", [
    ("/contacts?limit=%C2%B2", "limit"),
    ("/events?limit=" + "9" * 5000, "limit"),
    ("/contacts?limit=%EF%BC%95", "limit"),
    ("/events/stats?start=9999-12-31T23:59:59-01:00", "start"),
    ("/events/stats?end=0001-01-01T00:00:00%2B01:00", "end"),
    ("/events/stats?start=", "start"),
    ("/contacts?cursor=", "cursor"),
    ("/contacts?subscribed=", "subscribed"),
    ("/contacts?search=" + "a" * 321, "search"),
])
async def test_odd_query_values_are_422_not_500(api, path, field):
    status, reply = await api.call("GET", path)
    assert status == 422, reply
    assert reply["error"]["errors"][0]["field"] == field


async def test_nul_in_the_url_is_400(api):
    for path in ("/contacts/a%00b", "/events?name=a%00b", "/events/a%00b"):
        status, reply = await api.call("GET" if "events/a" not in path else "DELETE", path)
        assert status == 400 and reply["message"] == "The URL may not contain NUL characters", path


async def test_replies_stay_valid_json_whatever_is_stored(api):
    """Rows written before the door refused such data (or by other tools) must not break reads."""
    _, tracked = await api.call("POST", "/v1/track", json={"email": "a@example.com", "event": "e"})
    contact_id = tracked["data"]["contact"]
    await api.db.write(lambda s: event_store.insert_event(s, api.project_id, contact_id, "bad", {"s": "x\ud800y"}))
    for path in ("/events", f"/events/contact/{contact_id}", f"/contacts/{contact_id}", "/contacts"):
        resp = await api.client.get(path, headers=api.auth())
        assert resp.status == 200, path
        json.loads((await resp.read()).decode("utf-8"))
    _, events = await api.call("GET", "/events?name=bad")
    assert events["data"]["items"][0]["data"] == {"s": "x\ufffdy"}


async def test_non_finite_numbers_reaching_a_json_column_are_stored_and_answered_as_null(api):
    """The API refuses NaN and ±Infinity; a value written past it (here straight to the store) has them stored
    as null on both databases (PostgreSQL's json type would refuse the standard library's NaN)."""
    def insert(session):
        return event_store.insert_event(session, api.project_id, None, "nan",
                                        {"n": float("nan"), "big": float("inf"), "small": float("-inf")})

    await api.db.write(insert)
    resp = await api.client.get("/events?name=nan", headers=api.auth())
    assert resp.status == 200
    assert json.loads(await resp.read())["data"]["items"][0]["data"] == {"n": None, "big": None, "small": None}


async def test_every_error_carries_a_top_level_message(api):
    for method, path, key in (("GET", "/contacts", "sk_nope"), ("GET", "/contacts/nope", None),
                              ("GET", "/contacts", api.pk)):
        status, reply = await api.call(method, path, key=key)
        assert status in (401, 403, 404)
        assert reply["message"] == reply["error"]["message"] and reply["message"]


async def test_head_health_and_allow_on_405(api):
    resp = await api.client.head("/health")
    assert resp.status == 200 and await resp.read() == b""
    for method, path, allow in (("TRACE", "/v1/send", "POST"), ("PUT", "/contacts/count", "GET"),
                                ("POST", "/contacts/abc", "DELETE, GET, PATCH"), ("OPTIONS", "/contacts", None)):
        resp = await api.client.request(method, path, headers=api.auth())
        assert resp.status == 405, (method, path)
        if allow:
            assert resp.headers["Allow"] == allow
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_is_served_on_track_only(api):
    resp = await api.client.options("/v1/track", headers={"Origin": "https://shop.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in resp.headers
    resp = await api.client.post("/v1/track", json={"email": "a@example.com", "event": "view"},
                                 headers={**api.auth(api.pk), "Origin": "https://shop.example"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
    resp = await api.client.post("/v1/track", json={"email": "a@example.com"},
                                 headers={**api.auth(api.pk), "Origin": "https://shop.example"})
    assert resp.status == 422 and resp.headers["Access-Control-Allow-Origin"] == "*"
    resp = await api.client.get("/contacts", headers={**api.auth(), "Origin": "https://shop.example"})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_allow_list(aiohttp_client, config):
    from plunkd.app import create_app

    config.api.cors_origins = ["https://shop.example"]
    client = await aiohttp_client(create_app(config))
    resp = await client.options("/v1/track", headers={"Origin": "https://shop.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example" and resp.headers["Vary"] == "Origin"
    resp = await client.options("/v1/track", headers={"Origin": "https://evil.example"})
    assert resp.status == 204 and "Access-Control-Allow-Origin" not in resp.headers


async def test_legacy_dialect_under_api_v1(api):
    status, tracked = await api.call("POST", "/api/v1/track", json={"email": "a@example.com", "event": "e"})
    assert status == 200 and set(tracked) == {"success", "contact", "event", "timestamp"}
    assert tracked["success"] is True
    status, created = await api.call("POST", "/api/v1/contacts", json={"email": "b@example.com"})
    assert status == 200, "seed 001 documents 200 for a created contact"
    assert set(created) == {"success", "id", "email", "subscribed", "data", "createdAt", "updatedAt"}
    status, listed = await api.call("GET", "/api/v1/contacts")
    assert status == 200 and isinstance(listed, list) and {c["email"] for c in listed} == {"a@example.com",
                                                                                          "b@example.com"}
    status, count = await api.call("GET", "/api/v1/contacts/count")
    assert status == 200 and count == {"count": 2}
    status, fetched = await api.call("GET", f"/api/v1/contacts/{created['id']}")
    assert fetched["email"] == "b@example.com" and fetched["success"] is True
    status, names = await api.call("GET", "/api/v1/events/names")
    assert names == ["e"]
    status, error = await api.call("GET", "/api/v1/contacts/nope")
    assert status == 404 and error["success"] is False and error["message"] == error["error"]["message"]
    status, same = await api.call("GET", "/v1/contacts/count")
    assert same == {"success": True, "data": {"count": 2}}


async def test_openapi_tells_statuses_schemas_and_limits(api):
    _, spec = await api.call("GET", "/openapi.json")
    paths = spec["paths"]
    assert set(paths["/contacts"]["post"]["responses"]) == {"201", "400", "401", "403", "409", "413", "422", "429"}
    assert "404" in paths["/contacts/{id}"]["get"]["responses"]
    assert "head" in paths["/health"] and "options" in paths["/v1/track"]
    assert "options" not in paths["/contacts"]
    limit = next(p for p in paths["/contacts"]["get"]["parameters"] if p["name"] == "limit")["schema"]
    assert limit["minimum"] == 1 and limit["maximum"] == 100 and limit["type"] == "integer"
    track_body = spec["components"]["schemas"]["TrackBody"]
    assert track_body["properties"]["email"]["format"] == "email"
    ok = paths["/contacts/{id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["properties"]["data"] == {"$ref": "#/components/schemas/ContactOut"}
    legacy = paths["/api/v1/contacts"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert legacy["type"] == "array"
    failure = paths["/contacts"]["post"]["responses"]["409"]["content"]["application/json"]["schema"]
    assert failure == {"$ref": "#/components/schemas/Failure"}
