"""The webhook endpoints API through the real app and database: CRUD, the secret shown once, pagination,
and every kind of bad input with the exact reply (malformed, oversized, hostile, unauthenticated, another
project's ids), the cap per project, and that no route of ours answers under /webhooks/incoming."""

from __future__ import annotations

import base64

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from sqlalchemy import func, insert, select

from api.context import CONFIG
from api.routing import register
from api.webhooks import ROUTES
from storage import webhooks as webhook_store
from storage.models import WebhookDelivery, WebhookDeliveryStatus, new_id
from tests.test_events import deleted_in_parts

HOOK = {"url": "https://hooks.example.com/plunk?source=plunkd", "events": ["signed-up", "email.*"]}
VALIDATION = {"code": "VALIDATION_ERROR", "message": "Request validation failed", "statusCode": 422,
              "suggestion": "One or more fields are missing or have incorrect values."}


async def create(api, key: str | None = None, **fields) -> dict:
    status, body = await api.call("POST", "/webhooks", key=key, json={**HOOK, **fields})
    assert status == 201, body
    return body["data"]


async def refused(api, method: str, path: str, payload, status: int = 422) -> list[tuple[str, str, str]]:
    got, body = await api.call(method, path, json=payload)
    assert got == status, body
    error = body["error"]
    assert body["success"] is False and body["message"] == error["message"]
    if status == 422:
        assert {key: error[key] for key in VALIDATION} == VALIDATION
        return [(e["field"], e["code"], e["message"]) for e in error["errors"]]
    return [(error["code"], error["message"], "")]


async def test_deleting_an_endpoint_deletes_its_deliveries_a_part_at_a_time_and_other_writes_go_on_between(
        api, monkeypatch):
    """An endpoint's deliveries went with it in the DELETE's one transaction: a busy endpoint's held every other write
    on SQLite's one writer until it committed. They go first, a thousand per transaction (ten here), the endpoint
    looked up again in each: another project's DELETE is still 404 and deletes none."""
    made = await create(api)
    rows = [{"id": new_id(), "endpoint_id": made["id"], "event_name": "signed-up", "payload": {},
             "status": WebhookDeliveryStatus.DELIVERED, "attempt_log": []} for _ in range(25)]
    await api.db.write(lambda s: s.execute(insert(WebhookDelivery), rows))

    def deliveries(session) -> int:
        return session.execute(select(func.count()).select_from(WebhookDelivery)
                               .where(WebhookDelivery.endpoint_id == made["id"])).scalar_one()

    deleted = await deleted_in_parts(api, monkeypatch, f"/webhooks/{made['id']}", deliveries, webhook_store,
                                     "delete_deliveries")
    assert deleted["id"] == made["id"]


async def test_create_shows_the_secret_once_then_get_list_update_delete(api):
    made = await create(api)
    assert made["url"] == HOOK["url"] and made["events"] == ["signed-up", "email.*"] and made["enabled"] is True
    assert made["secret"].startswith("whsec_") and len(base64.b64decode(made["secret"][6:])) == 32
    assert made["consecutiveFailures"] == 0 and made["disabledReason"] is None and made["disabledAt"] is None
    status, body = await api.call("GET", f"/webhooks/{made['id']}")
    assert status == 200 and body["data"] == {key: value for key, value in made.items() if key != "secret"}
    second = await create(api, url="http://hooks.example.net/x", events=[" ordered ", "ordered", "*"])
    assert second["events"] == ["ordered", "*"], "stripped as /v1/track stores names, each once"
    status, body = await api.call("GET", "/webhooks?limit=1")
    assert status == 200 and body["data"]["total"] == 2 and body["data"]["hasMore"] is True
    assert [item["id"] for item in body["data"]["items"]] == [second["id"]], "newest first"
    assert "secret" not in body["data"]["items"][0]
    status, body = await api.call("GET", f"/webhooks?limit=1&cursor={body['data']['nextCursor']}")
    assert [item["id"] for item in body["data"]["items"]] == [made["id"]] and body["data"]["hasMore"] is False

    status, body = await api.call("PATCH", f"/webhooks/{made['id']}", json={"url": "https://other.example.com/h"})
    assert status == 200 and body["data"]["url"] == "https://other.example.com/h"
    assert body["data"]["events"] == made["events"], "omitted fields are unchanged"
    status, body = await api.call("PATCH", f"/webhooks/{made['id']}", json={"events": ["contact.subscribed"],
                                                                           "url": None, "enabled": None})
    assert status == 200 and body["data"]["events"] == ["contact.subscribed"]
    assert body["data"]["url"] == "https://other.example.com/h" and body["data"]["enabled"] is True

    status, body = await api.call("DELETE", f"/webhooks/{made['id']}")
    assert status == 200 and body["data"]["id"] == made["id"]
    for method in ("GET", "DELETE", "PATCH"):
        status, body = await api.call(method, f"/webhooks/{made['id']}", json={})
        assert status == 404 and body["error"]["message"] == f"Webhook {made['id']} not found"
    status, body = await api.call("GET", "/api/v1/webhooks")
    assert status == 200 and [item["id"] for item in body] == [second["id"]], "the legacy dialect: a plain array"


async def test_rotating_the_secret_shows_the_new_one_once(api):
    made = await create(api)
    status, body = await api.call("POST", f"/webhooks/{made['id']}/rotate-secret")
    assert status == 200 and body["data"]["secret"] not in (made["secret"], None)
    status, body = await api.call("GET", f"/webhooks/{made['id']}")
    assert "secret" not in body["data"]


@pytest.mark.parametrize(("payload", "errors"), [
    ({"url": "ftp://hooks.example.com/x", "events": ["a"]},
     [("url", "invalid_url", "Expected an http:// or https:// URL with a host")]),
    ({"url": "https://user:pass@hooks.example.com/", "events": ["a"]},
     [("url", "invalid_url", "The URL may not carry a user name or password; authenticate the request by its "
                             "signature")]),
    ({"url": "https://hooks.example.com:99999/", "events": ["a"]},
     [("url", "invalid_url", "Expected an http:// or https:// URL with a host and a valid port")]),
    ({"url": "https://hooks.example.com/\x01", "events": ["a"]},
     [("url", "invalid_url", "Expected an http:// or https:// URL with a host")]),
    ({"url": "https://hooks.example.com/" + "a" * 2048, "events": ["a"]},
     [("url", "too_big", "String should have at most 2048 characters")]),
    ({"url": "javascript:alert(1)", "events": ["a"]},
     [("url", "invalid_url", "Expected an http:// or https:// URL with a host")]),
    ({"url": 5, "events": "a"},
     [("url", "invalid_type", "Input should be a valid string"), ("events", "invalid_type", "Input should be a "
                                                                                             "valid list")]),
    ({"events": ["a"]}, [("url", "invalid_type", "Required")]),
    ({"url": "https://hooks.example.com/"}, [("events", "invalid_type", "Required")]),
    ({"url": "https://hooks.example.com/", "events": []},
     [("events", "too_small", "List should have at least 1 item after validation, not 0")]),
    ({"url": "https://hooks.example.com/", "events": ["a"] * 51},
     [("events", "too_big", "List should have at most 50 items after validation, not 51")]),
    ({"url": "https://hooks.example.com/", "events": ["a" * 201]},
     [("events.0", "too_big", "String should have at most 200 characters")]),
    ({"url": "https://hooks.example.com/", "events": ["ok", "   "]},
     [("events.1", "unknown_event", "Event names are 1 to 200 characters")]),
    ({"url": "https://hooks.example.com/", "events": ["ok", "email.delivered", "segment.vip.joined", "contact.*x"]},
     [(f"events.{index}", "unknown_event", f"'{name}' is not an event plunkd records; system events are "
       "email.sent, email.delivery, email.open, email.click, email.bounce, email.complaint, email.received, "
       "contact.subscribed, "
       "contact.unsubscribed, domain.verified, domain.unverified, campaign.paused, reputation.warning, "
       "reputation.paused, segment.<slug>.entry|exit, *, email.*, contact.*, segment.*")
      for index, name in ((1, "email.delivered"), (2, "segment.vip.joined"), (3, "contact.*x"))]),
    ({"url": "https://hooks.example.com/", "events": ["a\x00b"]},
     [("events.0", "invalid_string", "Text may not contain unpaired UTF-16 surrogates (such as \\ud800), nor NUL "
                                     "outside data")]),
    ({"url": "https://hooks.example.com/", "events": ["a"], "enabled": "yes"},
     [("enabled", "invalid_type", "Input should be a valid boolean")]),
])
async def test_bad_webhooks_are_refused_naming_the_field(api, payload, errors):
    assert await refused(api, "POST", "/webhooks", payload) == errors
    status, body = await api.call("GET", "/webhooks")
    assert body["data"]["total"] == 0, "nothing was stored"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/x", "http://localhost/x", "http://api.localhost/x", "http://[::1]/x", "http://10.1.2.3/x",
    "http://192.168.0.10/x", "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/",
    "http://100.64.0.1/", "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/", "http://[fd00::1]/", "http://224.0.0.1/",
])
async def test_private_targets_are_refused_by_default(api, url):
    host = url.split("/")[2].rsplit(":", 1)[0] if not url.startswith("http://[") else url.split("/")[2].split("]")[0]
    host = host.strip("[]")
    assert await refused(api, "POST", "/webhooks", {"url": url, "events": ["a"]}) == [
        ("url", "private_target", f"{host} is a loopback or private address (webhooks.allow_private_targets is "
                                  "off)")]
    made = await create(api)
    assert await refused(api, "PATCH", f"/webhooks/{made['id']}", {"url": url}) == [
        ("url", "private_target", f"{host} is a loopback or private address (webhooks.allow_private_targets is "
                                  "off)")]


async def test_private_targets_are_accepted_when_allowed(api):
    api.client.app[CONFIG].webhooks.allow_private_targets = True
    made = await create(api, url="http://127.0.0.1:9/hook")
    assert made["url"] == "http://127.0.0.1:9/hook"


async def test_bad_updates_change_nothing(api):
    made = await create(api)
    path = f"/webhooks/{made['id']}"
    assert await refused(api, "PATCH", path, {"events": []}) == [
        ("events", "too_small", "List should have at least 1 item after validation, not 0")]
    assert await refused(api, "PATCH", path, {"url": "gopher://x/", "events": ["email.opened"]}) == [
        ("url", "invalid_url", "Expected an http:// or https:// URL with a host")]
    assert await refused(api, "PATCH", path, {"enabled": 1}) == [
        ("enabled", "invalid_type", "Input should be a valid boolean")]
    assert await refused(api, "PATCH", path, [1, 2]) == [("body", "invalid_type", "Expected a JSON object")]
    status, body = await api.call("GET", path)
    assert body["data"]["url"] == made["url"] and body["data"]["events"] == made["events"]


async def test_malformed_and_oversized_bodies(api):
    api.client.app[CONFIG].api.max_body_bytes = 4096
    resp = await api.client.post("/webhooks", data=b'{"url": ', headers={**api.auth(),
                                                                           "Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "BAD_REQUEST"
    assert body["error"]["message"] == "Request body is not valid JSON: Expecting value: line 1 column 9 (char 8)"
    resp = await api.client.post("/webhooks", data=b"", headers=api.auth())
    assert resp.status == 400 and (await resp.json())["error"]["message"] == ("Request body is empty; expected a "
                                                                               "JSON object")
    resp = await api.client.post("/webhooks", json={**HOOK, "url": "https://h.example.com/" + "a" * 5000},
                                 headers=api.auth())
    body = await resp.json()
    assert resp.status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert body["error"]["message"] == "Request body is larger than 4096 bytes"


async def test_a_project_has_at_most_max_endpoints(api):
    api.client.app[CONFIG].webhooks.max_endpoints_per_project = 2
    await create(api)
    await create(api)
    status, body = await api.call("POST", "/webhooks", json=HOOK)
    assert status == 422
    assert body["error"]["message"] == "This project has reached its limit of 2 webhook endpoints"
    assert body["error"]["errors"] == [{"field": "url", "code": "too_many_webhooks", "message": "A project can "
                                        "have at most 2 webhook endpoints (webhooks.max_endpoints_per_project)"}]
    _, other_sk, _ = await api.new_project()
    await create(api, key=other_sk)  # the cap is per project


async def test_every_route_needs_a_secret_key(api):
    made = await create(api)
    routes = [("GET", "/webhooks"), ("POST", "/webhooks"), ("GET", f"/webhooks/{made['id']}"),
              ("PATCH", f"/webhooks/{made['id']}"), ("DELETE", f"/webhooks/{made['id']}"),
              ("POST", f"/webhooks/{made['id']}/rotate-secret"), ("GET", f"/webhooks/{made['id']}/deliveries"),
              ("POST", f"/webhooks/{made['id']}/test")]
    for method, path in routes:
        for headers, status, message in (
                ({}, 401, "Missing API key"),
                ({"Authorization": "Bearer sk_not-a-key"}, 401, "Invalid API key"),
                ({"Authorization": "Basic c2s6"}, 401, "Missing API key"),
                ({"Authorization": f"Bearer {api.pk}"}, 403,
                 "This endpoint requires a secret key (sk_…); public keys may only call /v1/track")):
            resp = await api.client.request(method, path, json=HOOK, headers=headers)
            body = await resp.json()
            assert (resp.status, body["error"]["message"]) == (status, message), (method, path, headers)
    status, body = await api.call("GET", f"/webhooks/{made['id']}")
    assert status == 200 and body["data"]["url"] == made["url"], "nothing changed"


async def test_another_projects_webhooks_are_not_found(api):
    made = await create(api)
    _, other_sk, _ = await api.new_project()
    for method, path in (("GET", f"/webhooks/{made['id']}"), ("PATCH", f"/webhooks/{made['id']}"),
                         ("DELETE", f"/webhooks/{made['id']}"), ("POST", f"/webhooks/{made['id']}/rotate-secret"),
                         ("GET", f"/webhooks/{made['id']}/deliveries"), ("POST", f"/webhooks/{made['id']}/test"),
                         ("GET", "/webhooks/not-a-uuid"), ("GET", "/webhooks/incoming")):
        status, body = await api.call(method, path, key=other_sk, json={"enabled": False})
        name = path.split("/")[2]
        assert (status, body["error"]["code"], body["error"]["message"]) == (
            404, "NOT_FOUND", f"Webhook {name} not found"), (method, path)
    status, body = await api.call("GET", "/webhooks", key=other_sk)
    assert body["data"]["total"] == 0
    status, body = await api.call("GET", f"/webhooks/{made['id']}")
    assert body["data"]["enabled"] is True, "the other project's PATCH changed nothing"


async def test_delivery_list_query_is_checked(api):
    made = await create(api)
    path = f"/webhooks/{made['id']}/deliveries"
    resp = await api.client.get(f"{path}?limit=0&status=SENT&cursor=nope", headers=api.auth())
    body = await resp.json()
    assert resp.status == 422 and [(e["field"], e["code"]) for e in body["error"]["errors"]] == [
        ("limit", "invalid_type"), ("cursor", "invalid_string"), ("status", "invalid_enum_value")]
    status, body = await api.call("GET", f"{path}?status=FAILED")
    assert status == 200 and body["data"] == {"items": [], "nextCursor": None, "hasMore": False, "total": 0}


async def test_a_disabled_endpoint_cannot_be_tested(api):
    made = await create(api, enabled=False)
    assert made["enabled"] is False and made["disabledReason"] == "disabled when created"
    status, body = await api.call("POST", f"/webhooks/{made['id']}/test")
    assert status == 409 and body["error"]["code"] == "CONFLICT"
    assert body["error"]["message"] == f"Webhook {made['id']} is disabled"


async def test_no_route_of_ours_answers_under_webhooks_incoming():
    """The SNS intake lives at /webhooks/incoming/…: aiohttp tries the longest fixed prefix first, so its routes
    win over /webhooks/{id}/… whatever the order they are added in (here ours come first)."""
    app = web.Application()
    register(app, ROUTES)

    async def intake(request: web.Request) -> web.Response:
        return web.Response(text=f"intake {request.match_info.get('provider', 'sns')}")

    app.router.add_post("/webhooks/incoming/sns", intake)
    app.router.add_post("/webhooks/incoming/{provider}/test", intake)
    app.router.freeze()
    for path in ("/webhooks/incoming/sns", "/webhooks/incoming/ses/test"):
        match = await app.router.resolve(make_mocked_request("POST", path))
        assert match.handler is intake, path
    assert not [route for route in ROUTES if route.path.startswith("/webhooks/incoming")]
