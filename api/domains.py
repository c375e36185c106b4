"""Sending domains: add (DKIM key + records to publish), list, get, verify, delete."""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import StringConstraints, WithJsonSchema

from api.context import CONFIG, DB, ON_QUEUED
from api.envelope import success
from api.routing import Route, caller
from api.schemas import DomainOut, DomainPage
from api.serialize import page_json
from api.validation import PAGE_QUERY, Body, page_params, read_body
from core.config import Config
from delivery.ses import ses_identity_verified
from pipeline import domains as rules
from storage import domains as domain_store
from storage.models import Domain


class AddDomainBody(Body):
    domain: Annotated[str, StringConstraints(min_length=1, max_length=rules.MAX_DOMAIN_LENGTH),
                      WithJsonSchema({"type": "string", "minLength": 1, "maxLength": rules.MAX_DOMAIN_LENGTH,
                                      "pattern": f"^{rules.DOMAIN_NAME}$"})]
    returnPath: Annotated[str | None, StringConstraints(min_length=1, max_length=rules.MAX_DOMAIN_LENGTH),
                          WithJsonSchema({"type": ["string", "null"], "minLength": 1,
                                          "maxLength": rules.MAX_DOMAIN_LENGTH,
                                          "pattern": f"^{rules.DOMAIN_NAME}$"})] = None
    """The MAIL FROM subdomain (e.g. bounces.example.com): bounces come back to VERP addresses on it."""


def shown(domain: Domain, config: Config, held_emails: int = 0) -> dict[str, Any]:
    return rules.domain_json(domain, config.delivery.transport, rules.inbound_host(config), held_emails)


async def add_domain(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    body = await read_body(request, AddDomainBody)
    domain = await rules.add_new_domain(request.app[DB], caller(request).project_id, body.domain,
                                        config.delivery.dkim_selector, config.api.max_domains_per_project,
                                        body.returnPath)
    return success(shown(domain, config))


async def list_domains(request: web.Request) -> web.Response:
    limit, cursor = page_params(request)
    project_id = caller(request).project_id

    def read(session):
        page = domain_store.page_domains(session, project_id, limit, cursor)
        return page, rules.held_counts(session, page.items)

    page, held = await request.app[DB].read(read)
    config = request.app[CONFIG]
    return success(page_json(page, lambda domain: shown(domain, config, held.get(domain.id, 0))))


async def get_domain(request: web.Request) -> web.Response:
    project_id = caller(request).project_id

    def read(session):
        domain = rules.require_domain(session, project_id, request.match_info["id"])
        return domain, rules.held_counts(session, [domain]).get(domain.id, 0)

    domain, held = await request.app[DB].read(read)
    return success(shown(domain, request.app[CONFIG], held))


async def delete_domain(request: web.Request) -> web.Response:
    project_id, id_or_name = caller(request).project_id, request.match_info["id"]
    domain = await request.app[DB].write(lambda s: rules.delete_domain(s, project_id, id_or_name))
    return success(shown(domain, request.app[CONFIG]))


async def verify_domain(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    db = request.app[DB]
    domain = await db.read(rules.require_domain, caller(request).project_id, request.match_info["id"])
    check = await rules.verify(domain, config, ses_identity_verified)

    def save(session):
        saved = rules.save_check(session, domain.id, check)
        return saved, rules.held_counts(session, [saved]).get(saved.id, 0)

    saved, held = await db.write(save)
    _wake(request)
    return success(shown(saved, config, held))


def _wake(request: web.Request) -> None:
    """A verify may have released held mail: the dispatcher looks now."""
    for wake in request.app[ON_QUEUED]:
        wake()


ROUTES = [
    Route("POST", "/domains", add_domain, "Add a sending domain", body=AddDomainBody, tag="Domains", status=201,
          response=DomainOut, errors=frozenset({409})),
    Route("GET", "/domains", list_domains, "List sending domains, newest first", query=PAGE_QUERY, tag="Domains",
          response=DomainPage, legacy="items"),
    Route("GET", "/domains/{id}", get_domain, "Get a domain and the DNS records to publish", tag="Domains",
          response=DomainOut),
    Route("POST", "/domains/{id}/verify", verify_domain, "Check the domain's DNS records", tag="Domains",
          response=DomainOut),
    Route("DELETE", "/domains/{id}", delete_domain, "Delete a domain (409 while emails from it are queued)",
          tag="Domains", response=DomainOut, errors=frozenset({409})),
]
