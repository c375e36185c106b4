"""Open and click tracking through the real app, database and dispatcher: which mail is tracked (marketing by
default, transactional when asked or when the project says so, never through SES), the rewritten message
(pixel, redirects, everything else as written, DKIM valid), the pixel and the redirect over HTTP (events,
first/repeat, no open redirect), campaign stats, and the settings API with its bad input."""

from __future__ import annotations

import asyncio
import base64
import email
import logging
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

from api.context import LINKS, TRACKING
from core.config import Config
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from marketing.fanout import CampaignFanOut
from pipeline.deferred import DeferredComposer
from pipeline.submit import Submission, submit
from pipeline.tracking.links import MessageTracker
from storage import emails as email_store
from storage import events as event_store
from storage.models import Template, new_id
from tests.test_campaigns import add_contacts, create, stats
from tests.test_delivery import dispatch_all, dns_for, settings
from tests.test_relay_e2e import smtp_send

PUBLIC_URL = Config().server.public_url
OFFER = "https://shop.example.org/offer?id=7&ref=mail"
BODY = (f'<p>Hello {{{{name ?? there}}}}: <a href="{OFFER.replace("&", "&amp;")}">the offer</a>, '
        '<a href="mailto:help@example.com">write to us</a>, <a href="#top">top</a>, '
        '<a href="http://shop.example.org/plain">plain http</a>.</p>')
GIF_HEADER = b"GIF89a\x01\x00\x01\x00"


def tracking_dispatcher(api, folder: Path, transport=None) -> Dispatcher:
    """The dispatcher as the delivery process wires it: deferred composition and the tracking step."""
    app = api.client.app
    return Dispatcher(api.db, transport or FileTransport(folder), TokenBucket(0), settings(),
                      compose_deferred=DeferredComposer(api.db.read, app[LINKS]),
                      track=MessageTracker(app[TRACKING]))


async def deliver(api, folder: Path) -> None:
    fanout = CampaignFanOut(api.db, api.client.app[LINKS], lambda: None)
    await fanout.run_once()
    await dispatch_all(tracking_dispatcher(api, folder), rounds=50)
    await fanout.run_once()


def delivered(folder: Path) -> dict[str, tuple[bytes, EmailMessage]]:
    """Each delivered message by its To address: (its bytes, parsed)."""
    found = {}
    for path in folder.glob("*.eml"):
        raw = path.read_bytes()
        message = email.message_from_bytes(raw, policy=policy.default)
        found[str(message["To"])] = (raw, message)
    return found


def html_of(message: EmailMessage) -> str:
    return message.get_body(("html",)).get_content()


def pixels(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]*/t/o/[^"]*)"', html)


def hrefs(html: str) -> list[str]:
    return re.findall(r'href="([^"]*)"', html)


def path_of(url: str) -> str:
    assert url.startswith(PUBLIC_URL + "/t/"), url
    return url[len(PUBLIC_URL):]


async def send(api, **payload) -> list[dict]:
    payload = {"to": "ann@example.org", "subject": "Hello", "body": BODY, **payload}
    status, body = await api.call("POST", "/v1/send", json=payload)
    assert status == 200, body
    return body["data"]["emails"]


async def emails_by_recipient(api) -> dict[str, object]:
    return {row.recipient: row for row in await api.db.read(email_store.list_emails, api.project_id)}


async def events_named(api, name: str) -> list:
    page = await api.db.read(event_store.list_events, api.project_id, 100, None, name)
    return sorted(page.items, key=lambda event: event.id)


async def sent_campaign(api, folder: Path, contacts: int = 2) -> tuple[dict, dict[str, tuple[bytes, EmailMessage]]]:
    await add_contacts(api, contacts)
    created = await create(api, body=BODY, style="PLUNK")
    status, body = await api.call("POST", f"/campaigns/{created['id']}/send", json={})
    assert status == 200, body
    await deliver(api, folder)
    return created, delivered(folder)


async def test_campaign_mail_carries_the_pixel_and_redirects_and_its_dkim_signature_verifies(api, sender, tmp_path):
    created, messages = await sent_campaign(api, tmp_path / "out")
    assert sorted(messages) == ["reader0@example.org", "reader1@example.org"]
    rows = await emails_by_recipient(api)
    signer = api.client.app[TRACKING]
    for address, (raw, message) in messages.items():
        row = rows[address]
        assert row.track_opens and row.track_clicks, "marketing mail is tracked by default"
        assert dkim.verify(raw, dnsfunc=dns_for(sender)), "signed after the rewrite"
        html = html_of(message)
        assert pixels(html) == [signer.open_url(row.id)]
        links = hrefs(html)
        assert signer.click_url(row.id, OFFER) in links and OFFER not in html.replace("&amp;", "&")
        assert signer.click_url(row.id, "http://shop.example.org/plain") in links
        assert "mailto:help@example.com" in links and "#top" in links, "mailto and anchors stay as written"
        own_pages = [link for link in links if link.startswith(f"{PUBLIC_URL}/unsubscribe/")
                     or link.startswith(f"{PUBLIC_URL}/preferences/")]
        assert own_pages, "the footer's unsubscribe and preferences links stay plunkd's own"
        assert str(message["List-Unsubscribe"]).startswith(f"<{PUBLIC_URL}/unsubscribe/")
        text = message.get_body(("plain",)).get_content()
        assert OFFER in text and "/t/" not in text, "the text part is as composed"
        assert html.index(pixels(html)[0]) < html.lower().rindex("</body>")


async def test_transactional_mail_is_untracked_unless_the_send_asks(api, sender, tmp_path):
    plain = await send(api, to="plain@example.org")
    opens = await send(api, to="opens@example.org", tracking={"opens": True})
    clicks = await send(api, to="clicks@example.org", tracking={"clicks": True, "opens": None})
    folder = tmp_path / "out"
    await dispatch_all(tracking_dispatcher(api, folder))
    messages = delivered(folder)
    signer = api.client.app[TRACKING]

    html = html_of(messages["plain@example.org"][1])
    assert pixels(html) == [] and "/t/c/" not in html and OFFER.replace("&", "&amp;") in html

    html = html_of(messages["opens@example.org"][1])
    assert pixels(html) == [signer.open_url(opens[0]["email"])] and "/t/c/" not in html

    html = html_of(messages["clicks@example.org"][1])
    assert pixels(html) == [] and signer.click_url(clicks[0]["email"], OFFER) in hrefs(html)
    for raw, _ in messages.values():
        assert dkim.verify(raw, dnsfunc=dns_for(sender))
    rows = await emails_by_recipient(api)
    assert (rows["plain@example.org"].track_opens, rows["plain@example.org"].track_clicks) == (False, False)
    assert plain[0]["email"] == rows["plain@example.org"].id


async def test_templates_follow_their_type_and_the_project_settings(api, sender, tmp_path):
    def add_templates(session):
        made = {}
        for kind in ("MARKETING", "TRANSACTIONAL"):
            template = Template(project_id=api.project_id, name=kind, subject="T", body=BODY, type=kind, style="HTML")
            session.add(template)
            session.flush()
            made[kind] = template.id
        return made

    templates = await api.db.write(add_templates)
    await send(api, to="marketing@example.org", template=templates["MARKETING"], subscribed=True)
    await send(api, to="receipt@example.org", template=templates["TRANSACTIONAL"])
    await send(api, to="opt-out@example.org", template=templates["MARKETING"], subscribed=True,
               tracking={"opens": False, "clicks": False})
    status, body = await api.call("PATCH", "/settings/tracking", json={"marketing": {"opens": False},
                                                                       "transactional": {"clicks": True}})
    assert status == 200 and body["data"] == {"marketing": {"opens": False, "clicks": True},
                                              "transactional": {"opens": False, "clicks": True}}
    await send(api, to="marketing2@example.org", template=templates["MARKETING"], subscribed=True)
    await send(api, to="receipt2@example.org", template=templates["TRANSACTIONAL"])
    folder = tmp_path / "out"
    await dispatch_all(tracking_dispatcher(api, folder))
    seen = {address: (bool(pixels(html_of(message))), "/t/c/" in html_of(message))
            for address, (_, message) in delivered(folder).items()}
    assert seen == {"marketing@example.org": (True, True), "receipt@example.org": (False, False),
                    "opt-out@example.org": (False, False),
                    "marketing2@example.org": (False, True), "receipt2@example.org": (False, True)}


async def test_ses_transport_never_gets_tracked_mail(api, sender, moto_server, monkeypatch):
    """SES tracks opens and clicks itself (configuration set events): the dispatcher leaves the message alone."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    from core.config import SesConfig
    from delivery.ses import SesTransport, ses_identity_verified

    ses_settings = SesConfig(region="us-east-1", endpoint_url=moto_server.url)
    assert await ses_identity_verified(ses_settings, "example.com") is True
    await send(api, tracking={"opens": True, "clicks": True})
    transport = SesTransport(ses_settings)
    requests = []
    (await transport._sesv2()).meta.events.register(
        "provide-client-params.sesv2.SendEmail", lambda params, **_: requests.append(dict(params)))
    await dispatch_all(tracking_dispatcher(api, Path(), transport=transport))
    await transport.close()
    [request] = requests
    raw = request["Content"]["Raw"]["Data"]
    html = html_of(email.message_from_bytes(raw, policy=policy.default))
    assert pixels(html) == [] and "/t/c/" not in html and OFFER.replace("&", "&amp;") in html
    assert (await emails_by_recipient(api))["ann@example.org"].status == "SENT"


async def test_opening_records_email_open_once_per_request_first_only_the_first_time(api, sender, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    created, messages = await sent_campaign(api, tmp_path / "out", contacts=1)
    raw, message = messages["reader0@example.org"]
    [pixel_url] = pixels(html_of(message))
    row = (await emails_by_recipient(api))["reader0@example.org"]
    for _ in range(3):
        response = await api.client.get(path_of(pixel_url))
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/gif"
        assert response.headers["Cache-Control"] == "no-store"
        body = await response.read()
        assert body.startswith(GIF_HEADER) and len(body) == 43
    head = await api.client.head(path_of(pixel_url))
    assert head.status == 200, "HEAD answers like GET but records nothing"
    opens = await events_named(api, "email.open")
    assert [event.data["first"] for event in opens] == [True, False, False]
    assert {(event.email_id, event.contact_id) for event in opens} == {(row.id, row.contact_id)}
    assert opens[0].data["campaignId"] == created["id"]
    token = pixel_url.rsplit("/", 1)[1]
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("plunkd")]
    assert all(token not in line for line in ours), "the token never reaches a log"
    assert any("/t/o/<token>" in line for line in ours)
    assert ours.count(f"email {row.id}: opened (first)") == 1


async def test_clicking_redirects_to_the_original_url_and_records_email_click(api, sender, tmp_path):
    _, messages = await sent_campaign(api, tmp_path / "out", contacts=1)
    _, message = messages["reader0@example.org"]
    row = (await emails_by_recipient(api))["reader0@example.org"]
    signer = api.client.app[TRACKING]
    redirect = signer.click_url(row.id, OFFER)
    assert redirect in hrefs(html_of(message))
    for _ in range(2):
        response = await api.client.get(path_of(redirect), allow_redirects=False)
        assert response.status == 302
        assert response.headers["Location"] == OFFER
        assert response.headers["Referrer-Policy"] == "no-referrer" and response.headers["Cache-Control"] == "no-store"
    head = await api.client.head(path_of(redirect), allow_redirects=False)
    assert head.status == 302 and head.headers["Location"] == OFFER
    clicks = await events_named(api, "email.click")
    assert [(event.data["url"], event.data["first"]) for event in clicks] == [(OFFER, True), (OFFER, False)]
    assert {(event.email_id, event.contact_id) for event in clicks} == {(row.id, row.contact_id)}
    other = signer.click_url(row.id, "http://shop.example.org/plain")
    response = await api.client.get(path_of(other), allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "http://shop.example.org/plain"
    assert [event.data["first"] for event in await events_named(api, "email.click")] == [True, False, False]


BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def spare_bit_flipped(last: str) -> str:
    """The last character of 16 bytes in base64url carries 2 bits; another with the same 2 decodes alike."""
    return BASE64URL[BASE64URL.index(last) ^ 1]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_forged_foreign_and_hostile_click_tokens_are_404_and_record_nothing(api, sender, tmp_path):
    created, messages = await sent_campaign(api, tmp_path / "out", contacts=2)
    rows = await emails_by_recipient(api)
    first, second = rows["reader0@example.org"], rows["reader1@example.org"]
    signer = api.client.app[TRACKING]
    token = signer.click_url(first.id, OFFER).rsplit("/", 1)[1]
    payload, signature = token.split(".")
    forged = {
        "tampered payload": f"{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{signature}",
        "tampered signature": f"{payload}.{signature[:9]}{'A' if signature[9] != 'A' else 'B'}{signature[10:]}",
        "the signature's spare bits changed": f"{payload}.{signature[:-1]}{spare_bit_flipped(signature[-1])}",
        "padded": f"{payload}.{signature}==",
        "another email's URL": f"{_b64(f'c:{second.id}:{OFFER}'.encode())}.{signature}",
        "a URL not in the email": f"{_b64(f'c:{first.id}:https://evil.example/'.encode())}.{signature}",
        "a javascript: URL": f"{_b64(f'c:{first.id}:javascript:alert(1)'.encode())}.{signature}",
        # made with the server's own key (as a bug could): refused all the same, the scheme is checked too
        "a signed javascript: URL": signer._tokens.make(f"c:{first.id}:javascript:alert(document.cookie)".encode()),
        "a signed data: URL": signer._tokens.make(f"c:{first.id}:data:text/html,<script>x</script>".encode()),
        "an unknown email": signer.click_url(new_id(), OFFER).rsplit("/", 1)[1],
        "an open token": signer.open_url(first.id).rsplit("/", 1)[1],
        "an unsubscribe token": api.client.app[LINKS].token(first.contact_id),
        "no token": "",
        "garbage": "%3Cscript%3E.x",
        "oversized": "A" * 5000 + "." + signature,
    }
    for case, bad in forged.items():
        response = await api.client.get(f"/t/c/{bad}", allow_redirects=False)
        assert response.status == 404, case
        assert "Location" not in response.headers, case
        assert response.headers["Content-Type"] == "text/html; charset=utf-8", case
        assert "This link is not valid or has expired" in await response.text(), case
    assert await events_named(api, "email.click") == []
    response = await api.client.get(f"/t/o/{forged['tampered signature']}")
    assert response.status == 404 and (await response.read()).startswith(GIF_HEADER), "still an image"
    response = await api.client.get(f"/t/o/{signer.open_url(new_id()).rsplit('/', 1)[1]}")
    assert response.status == 404
    assert await events_named(api, "email.open") == []
    response = await api.client.post(f"/t/c/{token}", data=b"x")
    assert response.status == 405 and response.headers["Allow"] == "GET, HEAD"
    assert await events_named(api, "email.click") == []
    assert created["id"]


async def test_campaign_stats_count_opened_and_clicked_emails(api, sender, tmp_path):
    created, messages = await sent_campaign(api, tmp_path / "out", contacts=3)
    html = {address: html_of(message) for address, (_, message) in messages.items()}
    for address in ("reader0@example.org", "reader1@example.org", "reader0@example.org"):
        assert (await api.client.get(path_of(pixels(html[address])[0]))).status == 200
    clicked = next(link for link in hrefs(html["reader2@example.org"]) if "/t/c/" in link)
    assert (await api.client.get(path_of(clicked), allow_redirects=False)).status == 302
    counts = await stats(api, created["id"])
    assert (counts["sent"], counts["opened"], counts["clicked"]) == (3, 2, 1)


SMTP_MESSAGE = (
    b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Your order\r\n"
    b"X-Order: 7\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    b"This is a multi-part message.\r\n"
    b"--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"See https://shop.example.org/order/7\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"<html><body><p>Caf=E9: <a href=3D\"https://shop.example.org/order/7?a=3D1&amp;b=3D2\">your o=\r\n"
    b"rder</a></p></body></html>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b'Content-Type: text/html; charset=utf-8; name="invoice.html"\r\n'
    b'Content-Disposition: attachment; filename="invoice.html"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(b'<a href="https://shop.example.org/invoice">invoice</a>').replace(b"\n", b"\r\n")
    + b"--outer--\r\n"
)


async def test_smtp_mail_is_untracked_by_default_and_rewritten_exactly_when_the_project_asks(relay, tmp_path):
    api = relay.api
    assert await asyncio.to_thread(smtp_send, relay, SMTP_MESSAGE, ["ann@example.org"]) == {}
    status, body = await api.call("PATCH", "/settings/tracking", json={"transactional": {"opens": True,
                                                                                         "clicks": True}})
    assert status == 200, body
    assert await asyncio.to_thread(smtp_send, relay, SMTP_MESSAGE.replace(b"ann@", b"bob@"), ["bob@example.org"]) == {}
    folder = tmp_path / "out"
    await dispatch_all(tracking_dispatcher(api, folder))
    messages = delivered(folder)
    untouched, _ = messages["ann@example.org"]
    assert untouched.endswith(SMTP_MESSAGE), "sent as written (only DKIM-Signature, Message-ID, Date added)"

    raw, message = messages["bob@example.org"]
    assert dkim.verify(raw, dnsfunc=dns_for(relay.domain))
    row = (await emails_by_recipient(api))["bob@example.org"]
    signer = api.client.app[TRACKING]
    html_part = next(part for part in message.walk() if part.get_content_type() == "text/html"
                     and part.get_content_disposition() != "attachment")
    assert html_part.get_content_charset() == "iso-8859-1" and html_part["Content-Transfer-Encoding"] == \
        "quoted-printable"
    html = html_part.get_content()
    target = "https://shop.example.org/order/7?a=1&b=2"
    assert html.startswith("<html><body><p>Café: <a href=")
    assert hrefs(html) == [signer.click_url(row.id, target)]
    assert pixels(html) == [signer.open_url(row.id)]
    original = SMTP_MESSAGE.replace(b"ann@", b"bob@")
    head, html_and_rest = original.split(b"Content-Type: text/html; charset=iso-8859-1", 1)
    attachment = b"--inner--\r\n" + html_and_rest.split(b"--inner--\r\n", 1)[1]
    assert raw.endswith(attachment), "the attached HTML file, the closing lines and the epilogue are untouched"
    assert head in raw, "headers, preamble and the text part are untouched"
    response = await api.client.get(path_of(signer.click_url(row.id, target)), allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == target


def relayed(body: bytes, content_type: bytes = b"text/html; charset=utf-8", extra: bytes = b"") -> bytes:
    return (b"From: hello@example.com\r\nTo: ann@example.org\r\nSubject: Odd\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: " + content_type + b"\r\n" + extra + b"\r\n" + body)


async def relayed_with_tracking_on(api, tmp_path, message: bytes) -> bytes:
    """The project tracks transactional mail; `message` is submitted as SMTP mail to ann@example.org and
    delivered through the file transport: the delivered bytes."""
    await api.call("PATCH", "/settings/tracking", json={"transactional": {"opens": True, "clicks": True}})
    await api.db.write(lambda s: submit(s, Submission(api.project_id, "smtp", "hello@example.com",
                                                      ["ann@example.org"], raw=message)))
    folder = tmp_path / "out"
    await dispatch_all(tracking_dispatcher(api, folder))
    [path] = folder.glob("*.eml")
    return path.read_bytes()


@pytest.mark.parametrize(("case", "message", "why"), [
    ("signed", relayed(b"--s\r\nContent-Type: text/html\r\n\r\n<a href=\"https://x.example/\">x</a>\r\n--s\r\n"
                       b"Content-Type: application/pkcs7-signature\r\n\r\nMIIB\r\n--s--\r\n",
                       b'multipart/signed; protocol="application/pkcs7-signature"; boundary="s"'),
     "multipart/signed cannot be changed without breaking it"),
    ("no closing boundary", relayed(b"--b\r\nContent-Type: text/html\r\n\r\n<a href=\"https://x.example/\">x</a>\r\n",
                                    b'multipart/alternative; boundary="b"'),
     "a multipart body without its closing boundary line"),
    ("unknown charset", relayed(b'<a href="https://x.example/">x</a>', b"text/html; charset=x-made-up"),
     "charset 'x-made-up' cannot be used"),
    ("broken base64", relayed(b"<<<not base64>>>", extra=b"Content-Transfer-Encoding: base64\r\n"),
     "base64 does not decode"),
    ("two content types", relayed(b'<a href="https://x.example/">x</a>', extra=b"Content-Type: text/plain\r\n"),
     "more than one Content-Type header"),
    # the email package reads a part's parameters in quadratic time: tracking this one took 15 s at dispatch
    ("a part's overlong Content-Type", relayed(b'--b\r\nContent-Type: text/html; a="' + b";" * 160_000
                                              + b'\r\n\r\n<a href="https://x.example/">x</a>\r\n--b--\r\n',
                                              b'multipart/alternative; boundary="b"'),
     "a Content-Type, -Disposition or -Transfer-Encoding field is over 2000 bytes"),
])
async def test_messages_that_cannot_be_changed_safely_go_out_untouched(api, sender, tmp_path, caplog, case, message,
                                                                      why):
    caplog.set_level(logging.INFO)
    raw = await relayed_with_tracking_on(api, tmp_path, message)
    assert raw.endswith(message), case
    assert dkim.verify(raw, dnsfunc=dns_for(sender)), case
    row = (await emails_by_recipient(api))["ann@example.org"]
    assert row.status == "SENT"
    warnings = [r.getMessage() for r in caplog.records if r.name == "plunkd.tracking"]
    assert len(warnings) == 1 and warnings[0].startswith(f"email {row.id}: sent without tracking: "), warnings
    assert why in warnings[0], warnings


@pytest.mark.parametrize("encoding", ["7bit", "8bit", "base64", "lf-only"])
async def test_single_part_html_in_other_encodings_is_tracked(api, sender, tmp_path, encoding):
    markup = '<p>Grüße, <a href="https://x.example/a">a</a></p>' + "x" * 990 * (encoding == "8bit")
    encoded = markup.encode() if encoding != "base64" else base64.encodebytes(markup.encode()).replace(b"\n", b"\r\n")
    message = relayed(encoded, extra=b"Content-Transfer-Encoding: " + (b"7bit" if encoding == "lf-only" else
                                                                          encoding.encode()) + b"\r\n")
    if encoding == "lf-only":
        message = message.replace(b"\r\n", b"\n")
    raw = await relayed_with_tracking_on(api, tmp_path, message)
    parsed = email.message_from_bytes(raw, policy=policy.default)
    row = (await emails_by_recipient(api))["ann@example.org"]
    signer = api.client.app[TRACKING]
    html = parsed.get_content()
    assert html.startswith("<p>Grüße, <a href=") and "x" * 990 * (encoding == "8bit") in html
    assert hrefs(html) == [signer.click_url(row.id, "https://x.example/a")]
    assert pixels(html) == [signer.open_url(row.id)]
    if encoding == "8bit":
        assert parsed["Content-Transfer-Encoding"] == "quoted-printable", "a line over 998 octets is re-encoded"
        assert len(parsed.get_all("Content-Transfer-Encoding")) == 1
    else:
        assert parsed["Content-Transfer-Encoding"] == ("7bit" if encoding == "lf-only" else encoding)
    if encoding != "lf-only":
        assert dkim.verify(raw, dnsfunc=dns_for(sender))


async def test_tracking_settings_api_and_its_bad_input(api):
    defaults = {"marketing": {"opens": True, "clicks": True}, "transactional": {"opens": False, "clicks": False}}
    for path in ("/settings/tracking", "/v1/settings/tracking"):
        status, body = await api.call("GET", path)
        assert status == 200 and body["data"] == defaults
    status, body = await api.call("GET", "/api/v1/settings/tracking")
    assert status == 200 and body == {"success": True, **defaults}
    status, body = await api.call("PATCH", "/settings/tracking", json={"transactional": {"opens": True}})
    assert status == 200 and body["data"]["transactional"] == {"opens": True, "clicks": False}
    status, body = await api.call("PATCH", "/settings/tracking", json={"marketing": None, "unknown": 1})
    assert status == 200 and body["data"]["transactional"] == {"opens": True, "clicks": False}
    other_id, other_sk, _ = await api.new_project()
    status, body = await api.call("GET", "/settings/tracking", key=other_sk)
    assert body["data"] == defaults, "settings are per project"

    for payload, field, code in [({"marketing": {"opens": "yes"}}, "marketing.opens", "invalid_type"),
                                 ({"marketing": {"opens": 1}}, "marketing.opens", "invalid_type"),
                                 ({"transactional": True}, "transactional", "invalid_type"),
                                 ([], "body", "invalid_type")]:
        status, body = await api.call("PATCH", "/settings/tracking", json=payload)
        assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", payload
        assert (field, code) in [(e["field"], e["code"]) for e in body["error"]["errors"]], body
    status, body = await api.call("PATCH", "/settings/tracking", data=b"{nope",
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST"
    status, body = await api.call("PATCH", "/settings/tracking", json={"marketing": {"opens": False},
                                                                       "padding": "x" * 16_000_000})
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    for method in ("GET", "PATCH"):
        response = await api.client.request(method, "/settings/tracking", json={})
        assert response.status == 401 and (await response.json())["error"]["code"] == "UNAUTHORIZED"
        status, body = await api.call(method, "/settings/tracking", key=api.pk, json={})
        assert status == 403 and body["error"]["code"] == "FORBIDDEN"
    status, body = await api.call("GET", "/settings/tracking")
    assert body["data"] == {"marketing": {"opens": True, "clicks": True},
                            "transactional": {"opens": True, "clicks": False}}, "refused requests changed nothing"


@pytest.mark.parametrize(("tracking", "field"), [
    (True, "tracking"), ("opens", "tracking"), ({"opens": "yes"}, "tracking.opens"),
    ({"clicks": 0}, "tracking.clicks")])
async def test_send_with_a_malformed_tracking_field_is_422(api, sender, tracking, field):
    status, body = await api.call("POST", "/v1/send", json={"to": "ann@example.org", "subject": "x", "body": "<p>x</p>",
                                                             "tracking": tracking})
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", body
    assert field in [e["field"] for e in body["error"]["errors"]], body
    assert await emails_by_recipient(api) == {}


async def test_workflow_sends_follow_the_template_type_and_clicks_trigger_workflows(api, sender, tmp_path):
    from tests.test_workflows_engine import make_template, make_workflow, runs_of, scheduler_for, track_event

    marketing = await make_template(api, "MARKETING", body=BODY)
    receipt = await make_template(api, "TRANSACTIONAL", body=BODY)
    await make_workflow(api, [{"id": "news", "type": "send", "template": marketing, "next": "receipt"},
                              {"id": "receipt", "type": "send", "template": receipt}], ["signed-up"])
    follow_up = await make_workflow(api, [{"id": "end", "type": "exit"}], ["email.click"])
    await track_event(api, "ann@example.org", "signed-up")
    await scheduler_for(api).run_until_idle()
    folder = tmp_path / "out"
    await dispatch_all(tracking_dispatcher(api, folder))
    by_template = {}
    for path in folder.glob("*.eml"):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        by_template["marketing" if "/unsubscribe/" in html_of(message) else "receipt"] = html_of(message)
    assert sorted(by_template) == ["marketing", "receipt"]
    assert len(pixels(by_template["marketing"])) == 1 and pixels(by_template["receipt"]) == []
    assert "/t/c/" not in by_template["receipt"]
    link = next(link for link in hrefs(by_template["marketing"]) if "/t/c/" in link)
    assert await runs_of(api, follow_up) == []
    response = await api.client.get(path_of(link), allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == OFFER
    assert len(await runs_of(api, follow_up)) == 1, "email.click starts the workflows it triggers"


async def test_concurrent_opens_record_one_first_open(api, sender, tmp_path):
    _, messages = await sent_campaign(api, tmp_path / "out", contacts=1)
    [pixel_url] = pixels(html_of(messages["reader0@example.org"][1]))
    responses = await asyncio.gather(*(api.client.get(path_of(pixel_url)) for _ in range(12)))
    assert [response.status for response in responses] == [200] * 12
    opens = await events_named(api, "email.open")
    assert len(opens) == 12 and sum(event.data["first"] for event in opens) == 1
    assert next(event for event in opens if event.data["first"]).id == opens[0].id, "the earliest is the first"


async def test_smtp_transport_delivers_tracked_mail_to_the_smarthost(api, sender, sink):
    from core.config import SmarthostConfig
    from delivery.transports import SmtpTransport

    [sent] = await send(api, tracking={"opens": True, "clicks": True})
    transport = SmtpTransport(SmarthostConfig(host="127.0.0.1", port=sink.port, timeout_seconds=5))
    await dispatch_all(tracking_dispatcher(api, Path(), transport=transport))
    await transport.close()
    [received] = sink.messages
    assert dkim.verify(received.original_content, dnsfunc=dns_for(sender))
    html = html_of(email.message_from_bytes(received.original_content, policy=policy.default))
    signer = api.client.app[TRACKING]
    assert pixels(html) == [signer.open_url(sent["email"])]
    assert signer.click_url(sent["email"], OFFER) in hrefs(html)
