"""The signed-link pages through the real app: GET never changes anything, POST (the confirm button and
RFC 8058 one-click) does, once; campaign attribution; every bad link a 404 page; HTML, escaped, with
the security headers, and never the token in a log."""

from __future__ import annotations

import logging
import re

import aiohttp
import pytest

from api.context import LINKS
from pipeline.links import LinkSigner
from pipeline.projects import create_project
from storage import contacts as contact_store
from storage import events as event_store
from storage.models import Content, Email, new_id, utcnow

NOT_VALID = "This link is not valid or has expired"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CSP_PARTS = ("default-src 'none'", "style-src 'unsafe-inline'", "form-action 'self'", "frame-ancestors 'none'")
KINDS = ("unsubscribe", "subscribe", "preferences")


async def new_contact(api, email: str = "ann@example.org", subscribed: bool = True, project_id: str | None = None):
    project = project_id or api.project_id
    return await api.db.write(lambda s: contact_store.insert_contact(s, project, email, subscribed, {}))


def token_for(api, contact_id: str, campaign_id: str | None = None) -> str:
    return api.client.app[LINKS].token(contact_id, campaign_id)


async def page(api, method: str, path: str, **kwargs) -> tuple[aiohttp.ClientResponse, str]:
    response = await api.client.request(method, path, **kwargs)
    return response, await response.text()


async def one_click(api, token: str, kind: str = "unsubscribe", multipart: bool = False):
    if multipart:  # as some providers send it
        body = (b'--b0undary\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
                b"One-Click\r\n--b0undary--\r\n")
        return await page(api, "POST", f"/{kind}/{token}", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    return await page(api, "POST", f"/{kind}/{token}", data="List-Unsubscribe=One-Click",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})


async def state(api, contact_id: str, project_id: str | None = None) -> bool:
    contact = await api.db.read(contact_store.get_contact, project_id or api.project_id, contact_id)
    assert contact is not None
    return contact.subscribed


async def events(api, contact_id: str, name: str, project_id: str | None = None):
    found = await api.db.read(event_store.list_events, project_id or api.project_id, 100, None, name, contact_id)
    return found.items


def assert_html_page(response: aiohttp.ClientResponse, status: int) -> None:
    assert response.status == status
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    csp = response.headers.get("Content-Security-Policy", "")
    for part in CSP_PARTS:
        assert part in csp, (part, csp)
    assert "X-Request-Id" in response.headers


def forms(body: str) -> list[tuple[str, str]]:
    """(action, button label) of every form on a page."""
    return re.findall(r'<form method="post" action="([^"]*)">.*?<button[^>]*>([^<]*)</button>', body, re.S)


async def test_get_pages_show_the_address_and_a_button_but_change_nothing(api):
    contact = await new_contact(api)
    token = token_for(api, contact.id)
    for _ in range(3):  # a link scanner fetching every URL, more than once
        for kind in KINDS:
            response, body = await page(api, "GET", f"/{kind}/{token}")
            assert_html_page(response, 200)
            assert "ann@example.org" in body
        response, body = await page(api, "HEAD", f"/unsubscribe/{token}")
        assert response.status == 200 and body == ""
    _, body = await page(api, "GET", f"/unsubscribe/{token}")
    assert forms(body) == [(f"../unsubscribe/{token}", "Unsubscribe")]
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in body
    assert "<script" not in body
    assert await state(api, contact.id) is True
    assert await events(api, contact.id, "contact.unsubscribed") == []


@pytest.mark.parametrize("multipart", [False, True], ids=["urlencoded", "multipart"])
async def test_one_click_post_unsubscribes_once(api, multipart, caplog):
    caplog.set_level(logging.INFO)
    contact = await new_contact(api)
    token = token_for(api, contact.id)
    response, body = await one_click(api, token, multipart=multipart)
    assert_html_page(response, 200)
    assert "You are unsubscribed" in body and "ann@example.org" in body
    assert forms(body) == [(f"../subscribe/{token}", "Resubscribe")]
    assert await state(api, contact.id) is False
    recorded = await events(api, contact.id, "contact.unsubscribed")
    assert len(recorded) == 1 and recorded[0].data == {} and recorded[0].email_id is None

    again, body = await one_click(api, token, multipart=multipart)
    assert_html_page(again, 200)
    assert "You are unsubscribed" in body
    assert len(await events(api, contact.id, "contact.unsubscribed")) == 1, "a repeated POST records nothing"

    changes = [r.getMessage() for r in caplog.records if r.name == "plunkd.pages"]
    assert changes == [f"contact {contact.id} unsubscribed through a signed link"]
    # (aiohttp.access is the test server's; plunkd serve turns it off)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("plunkd")]
    assert ours and all(token not in line for line in ours), "the token never reaches a log"
    assert any("/unsubscribe/<token>" in r.getMessage() for r in caplog.records if r.name == "plunkd.api")


async def test_the_confirm_button_body_and_an_empty_body_work_too(api):
    first, second = await new_contact(api, "a@example.org"), await new_contact(api, "b@example.org")
    response, _ = await page(api, "POST", f"/unsubscribe/{token_for(api, first.id)}",
                             data={"List-Unsubscribe": "One-Click"})
    assert response.status == 200 and await state(api, first.id) is False
    response, _ = await page(api, "POST", f"/unsubscribe/{token_for(api, second.id)}")
    assert response.status == 200 and await state(api, second.id) is False


async def test_subscribe_page_and_post(api):
    contact = await new_contact(api, subscribed=False)
    token = token_for(api, contact.id)
    response, body = await page(api, "GET", f"/subscribe/{token}")
    assert_html_page(response, 200)
    assert forms(body) == [(f"../subscribe/{token}", "Subscribe")]
    assert await state(api, contact.id) is False

    response, body = await page(api, "POST", f"/subscribe/{token}", data={"confirm": "1"})
    assert_html_page(response, 200)
    assert "You are subscribed" in body
    assert forms(body) == [(f"../unsubscribe/{token}", "Unsubscribe")]
    assert await state(api, contact.id) is True
    assert len(await events(api, contact.id, "contact.subscribed")) == 1
    await page(api, "POST", f"/subscribe/{token}")
    assert len(await events(api, contact.id, "contact.subscribed")) == 1

    # the GET of an already subscribed contact offers the other way
    _, body = await page(api, "GET", f"/subscribe/{token}")
    assert "You are subscribed" in body and forms(body) == [(f"../unsubscribe/{token}", "Unsubscribe")]


async def test_preferences_reflect_the_state_and_flip_it(api):
    contact = await new_contact(api)
    token = token_for(api, contact.id)
    response, body = await page(api, "GET", f"/preferences/{token}")
    assert_html_page(response, 200)
    assert "ann@example.org" in body and ">Subscribed<" in body
    assert forms(body) == [(f"../unsubscribe/{token}", "Unsubscribe")]

    await one_click(api, token)
    _, body = await page(api, "GET", f"/preferences/{token}")
    assert ">Unsubscribed<" in body
    assert forms(body) == [(f"../subscribe/{token}", "Subscribe")]

    await page(api, "POST", f"/subscribe/{token}")
    _, body = await page(api, "GET", f"/preferences/{token}")
    assert ">Subscribed<" in body
    assert len(await events(api, contact.id, "contact.unsubscribed")) == 1
    assert len(await events(api, contact.id, "contact.subscribed")) == 1


async def insert_campaign_email(api, contact, campaign_id: str) -> str:
    """An email row of a campaign's live send, as the campaign fan-out writes it."""
    email_id = new_id()

    def write(session):
        content_id = new_id()
        session.connection().execute(Content.__table__.insert(), {
            "id": content_id, "project_id": api.project_id, "raw": b"Subject: campaign\r\n\r\nHi\r\n",
            "deferred": False, "created_at": utcnow()})
        session.connection().execute(Email.__table__.insert(), {
            "id": email_id, "project_id": api.project_id, "contact_id": contact.id, "content_id": content_id,
            "campaign_id": campaign_id, "recipient": contact.email, "sender": "hello@example.com",
            "subject": "campaign", "source": "api", "status": "SENT", "created_at": utcnow()})

    await api.db.write(write)
    return email_id


async def test_a_campaign_link_attributes_the_unsubscribe_to_the_campaign_and_its_email(api):
    contact = await new_contact(api)
    other = await new_contact(api, "other@example.org")
    campaign_id = new_id()
    email_id = await insert_campaign_email(api, contact, campaign_id)
    await insert_campaign_email(api, other, campaign_id)
    await insert_campaign_email(api, contact, new_id())  # the same contact in another campaign

    response, _ = await one_click(api, token_for(api, contact.id, campaign_id))
    assert response.status == 200
    recorded = await events(api, contact.id, "contact.unsubscribed")
    assert len(recorded) == 1
    assert recorded[0].data == {"campaignId": campaign_id}
    assert recorded[0].email_id == email_id

    # resubscribing from the same mail is attributed the same way
    await page(api, "POST", f"/subscribe/{token_for(api, contact.id, campaign_id)}")
    resubscribed = await events(api, contact.id, "contact.subscribed")
    assert [(e.data, e.email_id) for e in resubscribed] == [({"campaignId": campaign_id}, email_id)]


async def test_a_campaign_link_whose_email_row_is_gone_still_names_the_campaign(api):
    contact = await new_contact(api)
    campaign_id = new_id()
    await one_click(api, token_for(api, contact.id, campaign_id))
    recorded = await events(api, contact.id, "contact.unsubscribed")
    assert [(e.data, e.email_id) for e in recorded] == [({"campaignId": campaign_id}, None)]


async def test_bad_links_are_a_404_page(api):
    contact = await new_contact(api)
    gone = await new_contact(api, "gone@example.org")
    token = token_for(api, contact.id)
    payload, signature = token.split(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]  # the first character's 6 bits all count
    foreign = LinkSigner(b"another-secret-of-at-least-32-characters", "http://x").token(contact.id)
    gone_token = token_for(api, gone.id)
    await api.db.write(lambda s: contact_store.delete_contact(s, api.project_id, gone.id))
    bad = {
        "forged signature": f"{payload}.{flipped}",
        "another secret": foreign,
        "truncated": token[:-5],
        "payload only": payload,
        "two dots": f"{token}.x",
        "not base64": "%%%%.%%%%",
        "non-ascii": "caf%C3%A9.x",
        "8 KB": "A" * 4000 + "." + "B" * 4000,
        "deleted contact": gone_token,
        "empty": "",
        "with a slash": f"{payload}/{signature}",
    }
    for what, bad_token in bad.items():
        for kind in KINDS:
            for method in ("GET", "POST"):
                if kind == "preferences" and method == "POST":
                    continue
                response, body = await page(api, method, f"/{kind}/{bad_token}")
                assert response.status == 404, (what, kind, method, response.status)
                assert_html_page(response, 404)
                assert NOT_VALID in body, (what, kind, method)
    assert await state(api, contact.id) is True
    assert await events(api, contact.id, "contact.unsubscribed") == []


async def test_a_10_kb_token_is_refused_before_the_app_without_json_or_5xx(api):
    """aiohttp refuses a request line over 8190 bytes itself (400) before routing; below that, the page's
    404 (see above). Neither is JSON, neither is a server error."""
    response, body = await page(api, "GET", "/unsubscribe/" + "A" * 10240)
    assert 400 <= response.status < 500
    assert "application/json" not in response.headers.get("Content-Type", "")
    assert '"success"' not in body


async def test_other_methods_are_a_405_page_with_allow(api):
    contact = await new_contact(api)
    token = token_for(api, contact.id)
    for kind, allowed in (("unsubscribe", "GET, HEAD, POST"), ("subscribe", "GET, HEAD, POST"),
                          ("preferences", "GET, HEAD")):
        methods = ["PUT", "DELETE", "PATCH", "OPTIONS"] + (["POST"] if kind == "preferences" else [])
        for method in methods:
            response, _ = await page(api, method, f"/{kind}/{token}")
            assert_html_page(response, 405)
            assert response.headers["Allow"] == allowed
    assert await state(api, contact.id) is True


async def test_a_large_body_is_a_413_page_and_changes_nothing(api):
    contact = await new_contact(api)
    token = token_for(api, contact.id)
    response, body = await page(api, "POST", f"/unsubscribe/{token}", data="x=" + "y" * 5000,
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_html_page(response, 413)

    async def chunked():
        for _ in range(10):
            yield b"z" * 1000

    response, _ = await page(api, "POST", f"/unsubscribe/{token}", data=chunked())
    assert_html_page(response, 413)
    assert await state(api, contact.id) is True


async def test_everything_on_a_page_is_escaped(api):
    hostile_name = "<img src=x onerror=alert(1)>"
    issued = await api.db.write(lambda s: create_project(s, "hostile", "hello@example.com", hostile_name))
    address = '"<script>alert(1)</script>"@example.com'
    contact = await new_contact(api, address, project_id=issued.project.id)
    token = token_for(api, contact.id)
    for method, kind in (("GET", "unsubscribe"), ("GET", "subscribe"), ("GET", "preferences"),
                         ("POST", "unsubscribe"), ("POST", "subscribe")):
        response, body = await page(api, method, f"/{kind}/{token}")
        assert_html_page(response, 200)
        assert "<script" not in body and "<img" not in body
        assert "&quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;@example.com" in body
        assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert len(await events(api, contact.id, "contact.unsubscribed", issued.project.id)) == 1


async def test_pages_are_not_in_the_openapi_document(api):
    response = await api.client.get("/openapi.json")
    paths = (await response.json())["paths"]
    assert not [p for p in paths if p.startswith(("/unsubscribe", "/subscribe", "/preferences"))]
    assert "/contacts/unsubscribe" in paths
