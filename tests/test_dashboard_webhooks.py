"""The dashboard's webhook pages on the real app and database (SQLite, or PostgreSQL with
PLUNKD_TEST_DATABASE_URL), with a real receiver on 127.0.0.1 that verifies every signature: add an endpoint
(its secret shown once), send a test, read the delivery log, resend a delivery, enable/disable, rotate,
delete; hostile values and replies come back escaped; bad input is a 422 with nothing stored; a viewer
reads only. Nothing is mocked."""

from __future__ import annotations

import re

from api.context import CONFIG
from tests import test_webhooks
from webhooks.sender import WebhookSender

config = test_webhooks.config
"""The webhook tests' settings: loopback targets allowed (the SSRF rule is tested with it off), fast retries."""

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(1)</script>'


async def send_what_is_due(dash) -> None:
    sender = WebhookSender(dash.api.db, dash.api.client.app[CONFIG].webhooks)
    try:
        await sender.run_until_idle()
    finally:
        await sender.close()


def pages(dash) -> str:
    return f"/projects/{dash.api.project_id}/webhooks"


async def add_endpoint(dash, url: str, events: str = "email.sent, signed-up") -> tuple[str, str]:
    """Add through the page's form; the endpoint's id and the secret shown once."""
    status, _ = await dash.owner.get(pages(dash))
    assert status == 200
    response = await dash.owner.post(pages(dash), {"url": url, "events": events, "enabled": "on"})
    html = await response.text()
    assert response.status == 201, html
    secret = re.search(r'data-copy="(whsec_[^"]+)"', html).group(1)
    endpoint_id = re.search(r'/webhooks/([0-9a-f-]{36})"', html).group(1)
    return endpoint_id, secret


async def test_add_send_test_and_read_the_delivery_log(dash, receiver):
    endpoint_id, secret = await add_endpoint(dash, receiver.url())
    receiver.secrets.append(secret)
    status, listed = await dash.owner.get_json(pages(dash))
    assert status == 200 and [w["id"] for w in listed["data"]["webhooks"]] == [endpoint_id]
    assert listed["data"]["webhooks"][0]["events"] == ["email.sent", "signed-up"]
    assert "secret" not in listed["data"]["webhooks"][0], "the secret is shown once, on the page after adding"
    status, html = await dash.owner.get(pages(dash) + f"/{endpoint_id}")
    assert status == 200 and "whsec_" not in html and ">Send test</button>" in html
    for page_html in (html, (await dash.owner.get(pages(dash)))[1]):
        tokens = re.findall(r'name="csrf" value="([^"]*)"', page_html)
        assert len(tokens) > 1 and set(tokens) == {dash.owner.csrf}, "every form carries the token a browser posts"

    response = await dash.owner.post(pages(dash) + f"/{endpoint_id}/test")
    assert response.status == 303 and response.headers["Location"] == pages(dash) + f"/{endpoint_id}"
    await send_what_is_due(dash)
    [got] = await receiver.wait_for(1)
    assert got.payload["type"] == "webhook.test" and got.verified == {secret: True}

    status, body = await dash.owner.get_json(pages(dash) + f"/{endpoint_id}")
    [delivery] = body["data"]["deliveries"]
    assert delivery["id"] == got.webhook_id and delivery["type"] == "webhook.test"
    assert (delivery["status"], delivery["attempts"], delivery["lastStatus"]) == ("DELIVERED", 1, 200)
    status, html = await dash.owner.get(pages(dash) + f"/{endpoint_id}")
    assert '<span class="badge ok">delivered</span>' in html and '<td class="num">200</td>' in html


async def test_a_failed_reply_is_shown_escaped_and_a_resend_arrives(dash, receiver):
    async def hostile_reply(request):
        from aiohttp import web

        return web.Response(status=500, text=f"broken {HOSTILE}")

    receiver.replies = [hostile_reply]
    endpoint_id, secret = await add_endpoint(dash, receiver.url())
    receiver.secrets.append(secret)
    dash.api.client.app[CONFIG].webhooks.give_up_after_seconds = 0  # the first failure is final
    status, _ = await dash.owner.get(pages(dash) + f"/{endpoint_id}")
    assert (await dash.owner.post(pages(dash) + f"/{endpoint_id}/test")).status == 303
    await send_what_is_due(dash)
    await receiver.wait_for(1)

    status, body = await dash.owner.get_json(pages(dash) + f"/{endpoint_id}")
    [failed] = body["data"]["deliveries"]
    assert (failed["status"], failed["lastStatus"]) == ("FAILED", 500)
    assert failed["reply"].startswith("gave up after 1 attempts: HTTP 500: broken \"><img src=x")
    status, html = await dash.owner.get(pages(dash) + f"/{endpoint_id}")
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert "broken &#34;&gt;&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html

    response = await dash.owner.post(pages(dash) + f"/{endpoint_id}/deliveries/{failed['id']}/resend")
    assert response.status == 303
    await send_what_is_due(dash)
    first, second = await receiver.wait_for(2)
    assert second.payload == first.payload and second.webhook_id != first.webhook_id
    assert second.verified == {secret: True}
    status, body = await dash.owner.get_json(pages(dash) + f"/{endpoint_id}")
    assert [(d["id"], d["status"]) for d in body["data"]["deliveries"]] == [
        (second.webhook_id, "DELIVERED"), (failed["id"], "FAILED")], "newest first"
    status, body = await dash.owner.get_json(pages(dash) + f"/{endpoint_id}?status=FAILED")
    assert [d["id"] for d in body["data"]["deliveries"]] == [failed["id"]]


async def test_the_delivery_log_pages_by_cursor(dash, receiver):
    endpoint_id, _ = await add_endpoint(dash, receiver.url())
    await dash.owner.get(pages(dash) + f"/{endpoint_id}")
    for _ in range(53):
        status, _ = await dash.owner.post_json(pages(dash) + f"/{endpoint_id}/test", {})
        assert status == 202
    status, first = await dash.owner.get_json(pages(dash) + f"/{endpoint_id}")
    assert len(first["data"]["deliveries"]) == 50 and first["data"]["nextCursor"]
    status, html = await dash.owner.get(pages(dash) + f"/{endpoint_id}")
    assert f'href="?cursor={first["data"]["nextCursor"]}">Older deliveries</a>' in html
    status, rest = await dash.owner.get_json(pages(dash) + f"/{endpoint_id}?cursor={first['data']['nextCursor']}")
    assert len(rest["data"]["deliveries"]) == 3 and rest["data"]["nextCursor"] is None
    ids = [d["id"] for d in first["data"]["deliveries"] + rest["data"]["deliveries"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 53


async def test_enable_disable_rotate_and_delete(dash, receiver):
    endpoint_id, secret = await add_endpoint(dash, receiver.url())
    one = pages(dash) + f"/{endpoint_id}"
    await dash.owner.get(one)
    response = await dash.owner.post(one + "/disable")
    assert response.status == 303
    status, html = await dash.owner.get(one)
    assert '<span class="badge bad">disabled</span>' in html and ">Enable</button>" in html
    assert ">Send test</button>" not in html
    status, body = await dash.owner.post_json(one + "/test", {})
    assert status == 409 and body["error"]["message"] == f"Webhook {endpoint_id} is disabled"
    assert (await dash.owner.post(one + "/enable")).status == 303
    status, body = await dash.owner.get_json(one)
    assert body["data"]["enabled"] is True

    await dash.owner.get(one)
    response = await dash.owner.post(one + "/rotate-secret")
    html = await response.text()
    assert response.status == 200 and "New signing secret" in html
    rotated = re.search(r'data-copy="(whsec_[^"]+)"', html).group(1)
    assert rotated != secret
    receiver.secrets += [secret, rotated]
    await dash.owner.post(one + "/test")
    await send_what_is_due(dash)
    [got] = await receiver.wait_for(1)
    assert got.verified == {secret: True, rotated: True}, "the old secret signs too for 24 hours"

    response = await dash.owner.post(one + "/delete")
    assert response.status == 303 and response.headers["Location"] == pages(dash)
    assert (await dash.owner.get(one))[0] == 404
    status, body = await dash.api.call("GET", f"/webhooks/{endpoint_id}")
    assert status == 404


async def test_bad_input_is_422_and_nothing_is_stored(dash, receiver):
    await dash.owner.get(pages(dash))
    cases = [
        ({"url": "ftp://example.com/x", "events": "signed-up"}, "url", "Expected an http:// or https:// URL"),
        ({"url": "http://127.0.0.1:1/" + "a" * 3000, "events": "signed-up"}, "url", "At most 2048 characters"),
        ({"url": receiver.url(), "events": "email.delivered"}, "events.0", "'email.delivered' is not an event"),
        ({"url": receiver.url(), "events": ""}, "events", "List at least one event name"),
        ({"url": receiver.url(), "events": "x " * 6000}, "events", "At most 50 event names"),
    ]
    for form, field, message in cases:
        status, body = await dash.owner.post_json(pages(dash), form)
        assert status == 422, (form, body)
        assert any(e["field"] == field and e["message"].startswith(message) for e in body["data"]["errors"]), body
        response = await dash.owner.post(pages(dash), form)
        html = await response.text()
        assert response.status == 422 and "The endpoint was not added" in html
    dash.api.client.app[CONFIG].webhooks.allow_private_targets = False
    status, body = await dash.owner.post_json(pages(dash), {"url": "http://127.0.0.1:9/x", "events": "*"})
    assert status == 422 and body["data"]["errors"][0]["code"] == "private_target", body
    status, body = await dash.api.call("GET", "/webhooks")
    assert body["data"]["total"] == 0, "nothing was stored"

    for query in ("?cursor=1%27%20OR%201=1", "?cursor=" + "f" * 5000):
        status, body = await dash.owner.get_json(pages(dash) + query)
        assert status == 422 and body["error"]["errors"][0]["field"] == "cursor"
    endpoint = (await dash.api.call("POST", "/webhooks", json={"url": "http://example.com/h", "events": ["*"]}))[1]
    status, body = await dash.owner.get_json(pages(dash) + f"/{endpoint['data']['id']}?status=<script>")
    assert status == 422 and body["error"]["errors"][0]["field"] == "status"
    status, html = await dash.owner.get(pages(dash) + f"/{endpoint['data']['id']}?status=<script>")
    assert status == 422 and "<script>" not in html.split("<body>")[1]
    assert (await dash.owner.get(pages(dash) + "/" + "0" * 36))[0] == 404
    other_project, other_key, _ = await dash.api.new_project()
    theirs = (await dash.api.call("POST", "/webhooks", key=other_key, json={"url": "http://example.com/h",
                                                                          "events": ["*"]}))[1]["data"]["id"]
    assert (await dash.owner.get(pages(dash) + f"/{theirs}"))[0] == 404, "another project's endpoint"
    status, body = await dash.owner.post_json(pages(dash) + f"/{endpoint['data']['id']}/deliveries/{'0' * 36}/resend",
                                              {})
    assert status == 404 and body["error"]["message"] == f"Delivery {'0' * 36} not found"


async def test_hostile_urls_and_event_names_are_escaped(dash, receiver):
    url = receiver.url("/hook?q=" + HOSTILE.replace(" ", "%20"))
    status, body = await dash.api.call("POST", "/webhooks", json={"url": url, "events": [HOSTILE]})
    assert status == 201, body
    for path in (pages(dash), pages(dash) + f"/{body['data']['id']}"):
        status, html = await dash.owner.get(path)
        assert status == 200 and "<script>alert(1)" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_a_viewer_reads_only_and_an_editor_may_not_delete(dash, receiver):
    endpoint_id, _ = await add_endpoint(dash, receiver.url())
    one = pages(dash) + f"/{endpoint_id}"
    await dash.owner.get(one)
    await dash.owner.post(one + "/test")
    status, body = await dash.owner.get_json(one)
    delivery_id = body["data"]["deliveries"][0]["id"]

    viewer = await dash.browser("viewer@example.com", "viewer")
    status, html = await viewer.get(pages(dash))
    assert status == 200 and "Add an endpoint" not in html and endpoint_id in html
    status, html = await viewer.get(one)
    assert status == 200 and ">Send test</button>" not in html and ">Resend</button>" not in html
    assert ">Delete</summary>" not in html and ">Disable</button>" not in html
    for action in ("", f"/{endpoint_id}/test", f"/{endpoint_id}/disable", f"/{endpoint_id}/delete",
                   f"/{endpoint_id}/rotate-secret", f"/{endpoint_id}/deliveries/{delivery_id}/resend"):
        response = await viewer.post(pages(dash) + action, {"url": receiver.url(), "events": "*"})
        assert response.status == 403, action
        status, body = await viewer.post_json(pages(dash) + action, {"url": receiver.url(), "events": "*"})
        assert status == 403 and body["error"]["message"].startswith("This needs the ")

    editor = await dash.browser("editor@example.com", "editor")
    status, html = await editor.get(one)
    assert ">Send test</button>" in html and ">Delete</summary>" not in html
    assert (await editor.post(one + "/delete")).status == 403
    assert (await editor.post(one + "/test")).status == 303
    status, body = await dash.api.call("GET", f"/webhooks/{endpoint_id}/deliveries")
    assert body["data"]["total"] == 2, "the editor's test was queued; nothing else changed"
    assert (await dash.api.call("GET", f"/webhooks/{endpoint_id}"))[0] == 200

    outsider = await dash.browser()
    response = await outsider.client.get(pages(dash), allow_redirects=False)
    assert response.status == 302 and response.headers["Location"].startswith("/login?next=")
