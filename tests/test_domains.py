"""Domains: DKIM key + records, DNS verification against a DNS server the test controls."""

from __future__ import annotations

import pytest

from tests.conftest import add_verified_domain


async def test_add_returns_records_and_verify_by_dns(api, dns_config, dns_server):
    status, body = await api.call("POST", "/domains", json={"domain": "Mail.Example.COM."})
    assert status == 201
    domain = body["data"]
    assert domain["domain"] == "mail.example.com" and domain["verified"] is False
    by_purpose = {r["purpose"]: r for r in domain["records"]}
    assert by_purpose["dkim"]["name"] == "plunkd._domainkey.mail.example.com"
    assert by_purpose["dkim"]["value"].startswith("v=DKIM1; k=rsa; p=MII")
    assert by_purpose["spf"]["value"].startswith("v=spf1")
    assert by_purpose["dmarc"]["name"] == "_dmarc.mail.example.com"

    status, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert status == 200 and body["data"]["verified"] is False
    assert body["data"]["lastCheck"]["dkim"] is False

    dns_server.publish([by_purpose["spf"]])
    wrong_key = "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwrong"
    dns_server.records[by_purpose["dkim"]["name"]] = [wrong_key]
    _, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert body["data"]["verified"] is False, "another key in DNS does not verify"

    dns_server.records[by_purpose["dkim"]["name"]] = [by_purpose["dkim"]["value"]]
    _, body = await api.call("POST", f"/domains/{domain['id']}/verify")
    assert body["data"]["verified"] is True and body["data"]["lastCheck"]["dkim"] is True
    assert body["data"]["lastCheck"]["dmarc"] is False, "DMARC is advised, not required"
    _, listed = await api.call("GET", "/v1/domains")
    assert [d["domain"] for d in listed["data"]] == ["mail.example.com"]


async def test_duplicate_and_bad_domains(api):
    status, _ = await api.call("POST", "/domains", json={"domain": "example.org"})
    assert status == 201
    status, body = await api.call("POST", "/domains", json={"domain": "EXAMPLE.org"})
    assert status == 409
    for bad in ["", "localhost", "exa mple.com", "-bad.com", "a" * 300 + ".com", "x@y.com"]:
        status, body = await api.call("POST", "/domains", json={"domain": bad})
        assert status == 422, bad
    status, _ = await api.call("POST", "/domains", json={"domain": 5})
    assert status == 422


async def test_other_projects_domain_is_404(api, dns_config, dns_server):
    domain = await add_verified_domain(api, dns_server)
    _, other_sk, _ = await api.new_project()
    for method, path in (("GET", f"/domains/{domain['id']}"), ("POST", f"/domains/{domain['id']}/verify")):
        status, _ = await api.call(method, path, key=other_sk)
        assert status == 404


@pytest.mark.parametrize("key_kind", ["pk", None])
async def test_domains_need_secret_key(api, key_kind):
    headers = {"Authorization": f"Bearer {api.pk}"} if key_kind else {}
    resp = await api.client.post("/domains", json={"domain": "example.net"}, headers=headers)
    assert resp.status == (403 if key_kind else 401)
