"""Dashboard: a project's sending domains, over real HTTP, a real database and the test DNS server on
loopback: add one, see the records to publish (the same as `GET /domains/{id}` gives), publish them,
"Verify now", see each record's result with its time; delete; the roles; bad and hostile input."""

from __future__ import annotations

import re

from markupsafe import escape

from dashboard.context import CONFIG

HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>']


def domains_path(project_id: str) -> str:
    return f"/projects/{project_id}/domains"


async def add(browser, project_id: str, name: str):
    await browser.get(domains_path(project_id))
    return await browser.post(domains_path(project_id), {"domain": name})


async def test_add_publish_verify_now_and_see_each_record(dash, dns_config, dns_server):
    api = dash.api
    response = await add(dash.owner, api.project_id, "Mail.Example.COM.")
    assert response.status == 303
    page_path = response.headers["Location"]
    domain_id = page_path.rsplit("/", 1)[1]
    assert page_path == f"{domains_path(api.project_id)}/{domain_id}"
    status, page = await dash.owner.get(page_path)
    assert status == 200 and "<h1>mail.example.com</h1>" in page and "not verified" in page
    status, body = await api.call("GET", f"/domains/{domain_id}")
    records = body["data"]["records"]
    assert [r["purpose"] for r in records] == ["dkim", "spf", "dmarc"]
    for record in records:
        assert f'data-copy="{escape(record["name"])}"' in page and f'data-copy="{escape(record["value"])}"' in page
    assert page.count("not checked") == 3 and "Verify now" in page

    response = await dash.owner.post(f"{page_path}/verify")
    assert response.status == 303 and response.headers["Location"] == page_path
    _, page = await dash.owner.get(page_path)
    assert "mail.example.com is not verified yet" in page and page.count("badge bad") == 3

    dns_server.publish([r for r in records if r["purpose"] != "dmarc"])
    response = await dash.owner.post(f"{page_path}/verify")
    assert response.status == 303
    _, page = await dash.owner.get(page_path)
    assert "mail.example.com is verified" in page and '<span class="badge ok">verified</span>' in page
    rows = {purpose: row for purpose, row in re.findall(r"<tr><th scope=\"row\">(\w+) \(.*?\)</th>(.*?)</tr>",
                                                        page, re.S)}
    assert "found" in rows["DKIM"] and "found" in rows["SPF"] and "missing" in rows["DMARC"]
    assert all("<time datetime=" in row for row in rows.values())
    status, body = await dash.owner.get_json(page_path)
    check = body["data"]["lastCheck"]
    assert status == 200 and body["data"]["verified"] is True
    assert (check["dkim"], check["spf"], check["dmarc"], check["method"]) == (True, True, False, "dns")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", check["checkedAt"])
    _, listed = await dash.owner.get(domains_path(api.project_id))
    assert f'href="{page_path}">mail.example.com</a>' in listed and "badge ok" in listed
    status, body = await api.call("POST", "/v1/send", json={"from": "news@mail.example.com", "to": "a@example.org",
                                                            "subject": "s", "body": "b"})
    assert status == 200, body


async def test_verify_now_as_json(dash, dns_config, dns_server):
    api = dash.api
    await dash.owner.get(domains_path(api.project_id))
    status, body = await dash.owner.post_json(domains_path(api.project_id), {"domain": "example.net"})
    assert status == 201 and body["data"]["domain"] == "example.net"
    dns_server.publish(body["data"]["records"])
    status, body = await dash.owner.post_json(f"{domains_path(api.project_id)}/{body['data']['id']}/verify", {})
    assert status == 200 and body["data"]["verified"] is True and body["data"]["lastCheck"]["dkim"] is True


async def test_bad_and_hostile_domains_are_422_on_the_form_and_nothing_is_stored(dash):
    api = dash.api
    for name in ["", "not a domain", "a" * 300 + ".com", "x" * 100_000, "example.com\n", *HOSTILE]:
        response = await add(dash.owner, api.project_id, name)
        assert response.status == 422, name[:30]
        page = await response.text()
        assert 'id="domain-error"' in page and 'id="domain-name"' in page
        if name in HOSTILE:
            assert name not in page and str(escape(name)) in page
    status, body = await dash.owner.post_json(domains_path(api.project_id), {"domain": "not a domain"})
    assert status == 422 and body["error"]["errors"][0]["field"] == "domain"
    _, body = await api.call("GET", "/domains")
    assert body["data"]["total"] == 0


async def test_the_api_rules_apply_duplicate_409_and_the_cap_422(dash):
    api = dash.api
    assert (await add(dash.owner, api.project_id, "example.com")).status == 303
    response = await add(dash.owner, api.project_id, "EXAMPLE.com")
    assert response.status == 409 and "already added" in await response.text()
    api.client.app[CONFIG].api.max_domains_per_project = 1
    response = await add(dash.owner, api.project_id, "example.org")
    assert response.status == 422 and "at most 1 domain" in await response.text()


async def test_delete_with_confirmation(dash):
    api = dash.api
    response = await add(dash.owner, api.project_id, "example.com")
    page_path = response.headers["Location"]
    status, page = await dash.owner.get(page_path)
    assert "<summary class=\"button danger\">Delete domain</summary>" in page
    response = await dash.owner.post(f"{page_path}/delete")
    assert response.status == 303 and response.headers["Location"] == domains_path(api.project_id)
    _, listed = await dash.owner.get(domains_path(api.project_id))
    assert "example.com deleted" in listed and "No domain yet." in listed
    status, _ = await api.call("GET", f"/domains/{page_path.rsplit('/', 1)[1]}")
    assert status == 404
    status, _ = await dash.owner.get(page_path)
    assert status == 404


async def test_a_viewer_sees_domains_and_no_button_and_may_change_nothing(dash, dns_config, dns_server):
    api = dash.api
    response = await add(dash.owner, api.project_id, "example.com")
    page_path = response.headers["Location"]
    for role in ("viewer", "editor"):
        member = await dash.browser(f"{role}@example.com", role)
        status, page = await member.get(page_path)
        assert status == 200 and "plunkd._domainkey.example.com" in page
        assert "Verify now" not in page and "Delete domain" not in page
        status, listed = await member.get(domains_path(api.project_id))
        assert status == 200 and "example.com" in listed and "Add domain" not in listed
        for path, form in ((domains_path(api.project_id), {"domain": "example.org"}),
                           (f"{page_path}/verify", {}), (f"{page_path}/delete", {})):
            assert (await member.post(path, form)).status == 403, (role, path)
    _, body = await api.call("GET", "/domains")
    assert [d["domain"] for d in body["data"]["items"]] == ["example.com"]
    assert body["data"]["items"][0]["lastCheck"] == {}


async def test_bad_page_links_and_unknown_domains(dash):
    api = dash.api
    status, page = await dash.owner.get(f"{domains_path(api.project_id)}?cursor=%3Cscript%3E")
    assert status == 200 and "That page link is not valid" in page and "<script>" not in page
    status, page = await dash.owner.get(f"{domains_path(api.project_id)}/nope.example.com")
    assert status == 404
    status, _ = await dash.owner.get(f"{domains_path(api.project_id)}/{'x' * 5000}")
    assert status == 404
