"""Dashboard: project settings and API keys, over real HTTP, a real database and the real SMTP relay.
A key made in the dashboard is shown once; a key rotated or revoked there stops working at once for the
API (401) and SMTP AUTH (535) of the same app."""

from __future__ import annotations

import asyncio
import re
import smtplib
import time

import pytest
from sqlalchemy import text, update

from api.context import DB
from pipeline.projects import create_project, rotate_keys
from plunkd.app import create_app
from storage.db import Database
from storage.models import Project
from storage.projects import find_project_by_key, key_digest, key_hint
from tests.dashboard_kit import Browser, make_user

SECRET_KEY = re.compile(r"sk_[0-9a-f]{64}")
HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>']
ESCAPED = ['&lt;script&gt;alert(1)&lt;/script&gt;', '&#34;&gt;&lt;img src=x onerror=alert(1)&gt;']


def keys_path(project_id: str) -> str:
    return f"/projects/{project_id}/keys"


async def secret_keys(browser, project_id: str) -> dict:
    status, body = await browser.get_json(keys_path(project_id))
    assert status == 200, body
    return body["data"]


async def smtp_auth(port: int, context, key: str) -> int:
    def run() -> int:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) as client:
            try:
                return client.login("plunk", key)[0]
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code

    return await asyncio.to_thread(run)


async def test_the_keys_page_shows_the_public_key_in_full_and_secret_keys_by_hint(dash):
    api = dash.api
    status, page = await dash.owner.get(keys_path(api.project_id))
    assert status == 200
    assert "<h1>API keys</h1>" in page and api.pk in page
    assert api.sk not in page and key_hint(api.sk) in page and "default" in page
    data = await secret_keys(dash.owner, api.project_id)
    assert data["publicKey"] == api.pk
    assert [(k["name"], k["hint"]) for k in data["secretKeys"]] == [("default", key_hint(api.sk))]
    assert data["revokedKeys"] == [] and api.sk not in str(data)


async def test_a_created_key_is_shown_once_and_sends(dash, sender):
    api = dash.api
    await dash.owner.get(keys_path(api.project_id))
    response = await dash.owner.post(keys_path(api.project_id), {"name": "billing service"})
    assert response.status == 201
    page = await response.text()
    shown = SECRET_KEY.findall(page)
    assert len(set(shown)) == 1 and "Copy the key now" in page and 'data-copy="' + shown[0] in page
    new_key = shown[0]
    _, listing = await dash.owner.get(keys_path(api.project_id))
    assert new_key not in listing and key_hint(new_key) in listing and "billing service" in listing
    assert new_key not in str(await secret_keys(dash.owner, api.project_id))
    status, body = await api.call("POST", "/v1/send", key=new_key,
                                  json={"to": "ann@example.org", "subject": "hi", "body": "hello"})
    assert status == 200, body
    status, _ = await api.call("GET", "/domains")
    assert status == 200, "the default key keeps working beside the new one"


async def test_a_created_key_as_json_is_in_that_answer_only(dash):
    api = dash.api
    await dash.owner.get(keys_path(api.project_id))
    status, body = await dash.owner.post_json(keys_path(api.project_id), {"name": "ci"})
    assert status == 201 and SECRET_KEY.fullmatch(body["data"]["secretKey"]) and body["data"]["name"] == "ci"
    status, _ = await api.call("GET", "/domains", key=body["data"]["secretKey"])
    assert status == 200


async def test_rotating_a_key_shows_the_new_value_once_and_the_old_stops_at_once(dash):
    api = dash.api
    status, _ = await api.call("GET", "/domains")
    assert status == 200, "the old key is in the key cache now"
    key_id = (await secret_keys(dash.owner, api.project_id))["secretKeys"][0]["id"]
    await dash.owner.get(keys_path(api.project_id))
    response = await dash.owner.post(f"{keys_path(api.project_id)}/{key_id}/rotate")
    assert response.status == 200
    new_key = SECRET_KEY.findall(await response.text())[0]
    status, body = await api.call("GET", "/domains")
    assert status == 401, body
    status, _ = await api.call("GET", "/domains", key=new_key)
    assert status == 200
    _, listing = await dash.owner.get(keys_path(api.project_id))
    assert new_key not in listing and key_hint(new_key) in listing


async def test_a_key_revoked_in_the_dashboard_is_refused_by_the_api_and_smtp_at_once(relay):
    api = relay.api
    await make_user(api.db, "owner@example.com", instance_owner=True)
    owner = Browser(api.client)
    assert (await owner.sign_in("owner@example.com")).status == 303
    assert await smtp_auth(relay.tls_port, relay.client_tls, api.sk) == 235
    send = {"to": "ann@example.org", "subject": "hi", "body": "hello"}
    status, body = await api.call("POST", "/v1/send", json=send)
    assert status == 200, body
    key_id = (await secret_keys(owner, api.project_id))["secretKeys"][0]["id"]
    await owner.get(keys_path(api.project_id))
    response = await owner.post(f"{keys_path(api.project_id)}/{key_id}/revoke")
    assert response.status == 303 and response.headers["Location"] == keys_path(api.project_id)
    status, body = await api.call("POST", "/v1/send", json=send)
    assert status == 401, body
    assert await smtp_auth(relay.tls_port, relay.client_tls, api.sk) == 535
    status, page = await owner.get(keys_path(api.project_id))
    assert "Secret key default revoked" in page and "No live secret key" in page
    data = await secret_keys(owner, api.project_id)
    assert data["secretKeys"] == [] and [k["name"] for k in data["revokedKeys"]] == ["default"]
    assert data["revokedKeys"][0]["revokedAt"].endswith("Z")
    response = await owner.post(f"{keys_path(api.project_id)}/{key_id}/revoke")
    assert response.status == 409, "a revoked key stays revoked"


async def test_a_viewer_sees_the_keys_and_no_button_and_may_change_nothing(dash):
    api = dash.api
    viewer = await dash.browser("v@example.com", "viewer")
    status, page = await viewer.get(keys_path(api.project_id))
    assert status == 200 and key_hint(api.sk) in page and "default" in page
    for button in ("Create key", "Revoke", "Rotate"):
        assert button not in page
    key_id = (await secret_keys(viewer, api.project_id))["secretKeys"][0]["id"]
    base = keys_path(api.project_id)
    for path in (base, f"{base}/{key_id}/rotate", f"{base}/{key_id}/revoke", f"{base}/public-key/rotate",
                 f"/projects/{api.project_id}/settings"):
        response = await viewer.post(path, {"name": "mine", "fromEmail": "a@example.com"})
        assert response.status == 403, path
    status, _ = await api.call("GET", "/domains")
    assert status == 200, "the key still works"
    assert len((await secret_keys(dash.owner, api.project_id))["secretKeys"]) == 1
    editor = await dash.browser("e@example.com", "editor")
    await editor.get(keys_path(api.project_id))
    assert (await editor.post(base, {"name": "mine"})).status == 403


async def test_hostile_key_names_come_back_escaped(dash):
    base = keys_path(dash.api.project_id)
    for name in HOSTILE:
        await dash.owner.get(base)
        response = await dash.owner.post(base, {"name": name})
        assert response.status == 201
        assert name not in await response.text()
    _, page = await dash.owner.get(base)
    for raw, escaped in zip(HOSTILE, ESCAPED, strict=True):
        assert raw not in page and escaped in page


async def test_bad_key_names_are_422_on_the_form_and_nothing_is_stored(dash):
    base = keys_path(dash.api.project_id)
    for name in ("", "   ", "x" * 101, "tab\there", "a" * 100_000):
        await dash.owner.get(base)
        response = await dash.owner.post(base, {"name": name})
        assert response.status == 422, name[:20]
        page = await response.text()
        assert "1 to 100 characters" in page and 'id="key-name"' in page
        assert not SECRET_KEY.search(page)
    await dash.owner.get(base)
    assert (await dash.owner.post(base, {"name": "default"})).status == 409
    status, body = await dash.owner.post_json(base, {"name": "x" * 101})
    assert status == 422 and body["error"]["errors"][0]["field"] == "name"
    assert len((await secret_keys(dash.owner, dash.api.project_id))["secretKeys"]) == 1


async def test_a_project_made_before_public_keys_were_kept_shows_the_hint_until_rotated(dash):
    api = dash.api
    await api.db.write(lambda s: s.execute(update(Project).where(Project.id == api.project_id).values(public_key=None)))
    status, page = await dash.owner.get(keys_path(api.project_id))
    assert status == 200 and api.pk not in page and key_hint(api.pk) in page and "rotate it to see it" in page
    status, _ = await api.call("POST", "/v1/track", key=api.pk, json={"email": "a@b.co", "event": "x"})
    assert status == 200
    response = await dash.owner.post(f"{keys_path(api.project_id)}/public-key/rotate")
    assert response.status == 303
    data = await secret_keys(dash.owner, api.project_id)
    new_public = data["publicKey"]
    assert new_public.startswith("pk_") and new_public != api.pk
    _, page = await dash.owner.get(keys_path(api.project_id))
    assert new_public in page
    status, _ = await api.call("POST", "/v1/track", key=api.pk, json={"email": "a@b.co", "event": "x"})
    assert status == 401
    status, _ = await api.call("POST", "/v1/track", key=new_public, json={"email": "a@b.co", "event": "x"})
    assert status == 200


async def test_keys_rotate_of_the_cli_rotates_the_default_key_and_keeps_the_others(dash):
    api = dash.api
    await dash.owner.get(keys_path(api.project_id))
    status, body = await dash.owner.post_json(keys_path(api.project_id), {"name": "ci"})
    other = body["data"]["secretKey"]
    issued = await api.db.write(lambda s: rotate_keys(s, api.project_id))
    assert await api.db.read(find_project_by_key, api.sk) is None
    assert await api.db.read(find_project_by_key, api.pk) is None
    assert (await api.db.read(find_project_by_key, issued.secret_key))[1] == "secret"
    assert (await api.db.read(find_project_by_key, issued.public_key))[1] == "public"
    assert (await api.db.read(find_project_by_key, other))[1] == "secret"
    assert (await secret_keys(dash.owner, api.project_id))["publicKey"] == issued.public_key


async def test_migration_0013_keeps_each_projects_key_as_default(empty_database_url):
    """A project made before named keys: its one secret key still works after the upgrade, as "default"."""
    from storage.db import _upgrade_to_head

    key = "sk_" + "ab" * 32
    db = Database(empty_database_url, 2)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(lambda sync_conn: _upgrade_to_head(sync_conn, "0012"))
            await conn.execute(text("INSERT INTO projects VALUES ('p', 'shop', :sd, :pd, :sh, 'pk_…0000', "
                                    "'e@x.y', '', CURRENT_TIMESTAMP)"),
                               {"sd": key_digest(key), "pd": key_digest("pk_x"), "sh": key_hint(key)})
        await db.migrate()
        found = await db.read(find_project_by_key, key)
        async with db.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT project_id, name, hint, revoked_at FROM api_keys"))).all()
    finally:
        await db.dispose()
    assert found is not None and found[0].id == "p" and found[1] == "secret" and found[0].public_key is None
    assert [tuple(row) for row in rows] == [("p", "default", key_hint(key), None)]


async def test_project_settings_rename_and_sender_defaults(dash):
    api = dash.api
    overview = f"/projects/{api.project_id}"
    status, page = await dash.owner.get(overview)
    assert status == 200 and "Save settings" in page
    response = await dash.owner.post(f"{overview}/settings", {"name": HOSTILE[0], "fromEmail": "News@Example.com",
                                                              "fromName": HOSTILE[1]})
    assert response.status == 303 and response.headers["Location"] == overview
    status, page = await dash.owner.get(overview)
    assert "Project settings saved" in page
    for raw, escaped in zip(HOSTILE, ESCAPED, strict=True):
        assert raw not in page and escaped in page
    status, body = await dash.owner.get_json(overview)
    assert (body["data"]["name"], body["data"]["fromEmail"], body["data"]["fromName"]) == (
        HOSTILE[0], "news@example.com", HOSTILE[1])
    status, body = await dash.owner.post_json(f"{overview}/settings", {"name": "shop", "fromEmail": "a@example.com",
                                                                       "fromName": "Shop"})
    assert status == 200 and body["data"]["name"] == "shop"


async def test_bad_project_settings_are_422_on_the_form_and_nothing_changes(dash):
    api = dash.api
    overview = f"/projects/{api.project_id}"
    for fields, field in (({"name": "", "fromEmail": "a@example.com"}, "name"),
                          ({"name": "x" * 201, "fromEmail": "a@example.com"}, "name"),
                          ({"name": "ok", "fromEmail": "not an address"}, "fromEmail"),
                          ({"name": "ok", "fromEmail": "a@example.com\r\nBcc: b@example.com"}, "fromEmail"),
                          ({"name": "ok", "fromEmail": "a@example.com", "fromName": "x\r\nBcc: b"}, "fromName")):
        await dash.owner.get(overview)
        response = await dash.owner.post(f"{overview}/settings", fields)
        assert response.status == 422, fields
        assert f'id="{field}-error"' in await response.text()
    status, body = await dash.owner.post_json(f"{overview}/settings", {"name": "ok", "fromEmail": "nope"})
    assert status == 422 and body["error"]["errors"][0]["field"] == "fromEmail"
    _, body = await dash.owner.get_json(overview)
    assert (body["data"]["name"], body["data"]["fromEmail"]) == ("test", "hello@example.com")
    viewer = await dash.browser("v@example.com", "viewer")
    _, page = await viewer.get(overview)
    assert "Save settings" not in page and 'name="fromEmail"' not in page


@pytest.mark.postgres_only
async def test_a_key_revoked_in_one_nodes_dashboard_stops_on_the_other_within_a_second(aiohttp_client, config):
    """Two nodes on one PostgreSQL database: the revoke's NOTIFY makes the other node forget the key (its
    cache would keep it for 5 s)."""
    first = await aiohttp_client(create_app(config))
    second = await aiohttp_client(create_app(config))
    issued = await first.app[DB].write(lambda s: create_project(s, "shared", "hello@example.com", "Shared"))
    await make_user(second.app[DB], "owner@example.com", instance_owner=True)
    owner = Browser(second)
    assert (await owner.sign_in("owner@example.com")).status == 303

    async def domains_status(client) -> int:
        reply = await client.get("/domains", headers={"Authorization": f"Bearer {issued.secret_key}"})
        await reply.read()
        return reply.status

    assert await domains_status(first) == 200 and await domains_status(second) == 200  # both cached it
    key_id = (await secret_keys(owner, issued.project.id))["secretKeys"][0]["id"]
    await owner.get(keys_path(issued.project.id))
    response = await owner.post(f"{keys_path(issued.project.id)}/{key_id}/revoke")
    assert response.status == 303
    assert await domains_status(second) == 401, "this node forgot it at once"
    revoked = time.monotonic()
    while await domains_status(first) != 401:
        assert time.monotonic() - revoked < 1.0, "the revoked key still works on the other node after 1 s"
        await asyncio.sleep(0.02)
