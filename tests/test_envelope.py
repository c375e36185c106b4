"""SPEC §2: envelope, request ids, rate limit, unknown routes, internal errors, health and OpenAPI."""

from __future__ import annotations

import re
import uuid

from api.context import RATE_LIMITER


async def test_request_id_is_echoed_or_made(api):
    resp = await api.client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    resp = await api.client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    uuid.UUID(resp.headers["X-Request-Id"])
    resp = await api.client.get("/health")
    assert (await resp.json()) == {"success": True, "data": {"status": "ok"}}


async def test_unknown_route_and_method_use_the_envelope(api):
    resp = await api.client.get("/nope")
    body = await resp.json()
    assert resp.status == 404 and body["success"] is False and body["error"]["code"] == "NOT_FOUND"
    assert body["error"]["requestId"] == resp.headers["X-Request-Id"]
    assert body["timestamp"].endswith("Z")
    resp = await api.client.put("/v1/track", headers=api.auth())
    assert resp.status == 405 and (await resp.json())["success"] is False


async def test_rate_limit_headers_and_429(api):
    api.client.app[RATE_LIMITER].limit = 3
    for expected_remaining in (2, 1, 0):
        resp = await api.client.get("/contacts/count", headers=api.auth())
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Limit"] == "3"
        assert resp.headers["X-RateLimit-Remaining"] == str(expected_remaining)
    resp = await api.client.get("/contacts/count", headers=api.auth())
    body = await resp.json()
    assert resp.status == 429 and body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    other_id, other_sk, _ = await api.new_project()
    resp = await api.client.get("/contacts/count", headers=api.auth(other_sk))
    assert resp.status == 200, "the budget is per project"


async def test_internal_error_hides_details(api, monkeypatch):
    from storage import contacts

    def explode(*args, **kwargs):
        raise RuntimeError("SELECT secret FROM projects -- boom")

    monkeypatch.setattr(contacts, "count_contacts", explode)
    resp = await api.client.get("/contacts/count", headers=api.auth())
    text = await resp.text()
    assert resp.status == 500
    assert "SELECT" not in text and "Traceback" not in text and "boom" not in text
    assert (await resp.json())["error"]["code"] == "INTERNAL_ERROR"


async def test_openapi_describes_served_routes(api):
    resp = await api.client.get("/openapi.json")
    spec = await resp.json()
    assert spec["openapi"].startswith("3.")
    for path, method in [("/v1/track", "post"), ("/contacts", "get"), ("/v1/contacts", "put"),
                         ("/contacts/{id}", "patch"), ("/events/{eventName}", "delete"), ("/health", "get")]:
        assert method in spec["paths"][path], (path, method)
    assert "/track" not in spec["paths"], "the public API is served under /v1 only"
    assert spec["paths"]["/v1/track"]["post"]["x-key-kinds"] == ["sk_", "pk_"]
    schema = spec["components"]["schemas"]["TrackBody"]
    assert set(schema["required"]) == {"email", "event"}
    for path, methods in spec["paths"].items():
        for method in methods:
            probe = await api.client.request(method.upper(), re.sub(r"\{[^}]+\}", "x", path))
            assert probe.status != 405 and not (probe.status == 404 and
                                                (await probe.json())["error"]["message"] == "No such endpoint")


async def test_creates_answer_201_except_where_seed_001_documents_200(api):
    """One rule for creates: 201 Created, and /openapi.json says so; seed 001 documents 200 for its two
    creates (POST /contacts and POST /campaigns of the /v1 API), so those answer 200 under /v1 and /api/v1."""
    created = {}
    for path, payload in [("/contacts", {"email": "a@example.com"}),
                          ("/campaigns", {"subject": "S", "body": "B", "audience": "ALL"}),
                          ("/templates", {"name": "T", "subject": "S", "body": "B"}),
                          ("/segments", {"name": "All", "condition": {"field": "email", "op": "contains",
                                                                      "value": "@"}}),
                          ("/webhooks", {"url": "https://hooks.example.com/in", "events": ["signed-up"]})]:
        status, body = await api.call("POST", path, json=payload)
        assert status == 201 and body["success"] is True, (path, body)
        created[path] = body["data"]
    status, body = await api.call("POST", "/actions", json={"name": "A", "events": ["signed-up"],
                                                            "template": created["/templates"]["id"]})
    assert status == 201, body
    for prefix in ("/v1", "/api/v1"):
        status, _ = await api.call("POST", f"{prefix}/contacts", json={"email": f"b{len(prefix)}@example.com"})
        assert status == 200, prefix
        status, _ = await api.call("POST", f"{prefix}/campaigns", json={"subject": "S", "body": "B",
                                                                        "recipients": ["a@example.com"]})
        assert status == 200, prefix
    status, _ = await api.call("POST", "/v1/templates", json={"name": "T2", "subject": "S", "body": "B"})
    assert status == 201, "seed 001 has no templates: the rule holds under /v1 too"
    _, spec = await api.call("GET", "/openapi.json")
    for path in ("/contacts", "/campaigns", "/templates", "/segments", "/workflows", "/actions", "/webhooks",
                 "/domains", "/v1/templates", "/api/v1/segments"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "201" in responses and "200" not in responses, path
    for path in ("/v1/contacts", "/api/v1/contacts", "/v1/campaigns", "/api/v1/campaigns"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "200" in responses and "201" not in responses, path
