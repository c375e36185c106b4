"""A project's sending domains: the list with the add form, and a domain's page with the records to
publish (as `GET /domains/{id}` gives them), each record's last check, "Verify now" and delete, and the
inbound routes on the domain (and its subdomains) with forms to add and delete one (no JavaScript)."""

from __future__ import annotations

from typing import Any

from core.config import Config
from dashboard.context import CONFIG, DB
from dashboard.routing import Answer, Ctx, Page, form_of, wants_json
from delivery.ses import ses_identity_verified
from pipeline import domains as rules
from pipeline import inbound_routes as route_rules
from pipeline.errors import Conflict, ValidationFailed
from storage import domains as domain_store
from storage import inbound as inbound_store
from storage.models import Domain, Role
from storage.pagination import is_valid_cursor

PAGE_SIZE = 50
MAX_PATTERN_LENGTH = 320
PURPOSES = {"dkim": "DKIM (required)", "spf": "SPF (required)", "dmarc": "DMARC (advised)",
            "return_path_mx": "Return path MX (bounces come back)", "return_path_spf": "Return path SPF"}
CHECKED_AS = {"return_path_mx": "returnPath", "return_path_spf": "returnPath"}
"""The last check's key for a record whose result is not stored under its purpose (both return-path records)."""


def shown(domain: Domain, config: Config) -> dict[str, Any]:
    """The API's JSON of the domain, each record with its result in the last check."""
    data = rules.domain_json(domain, config.delivery.transport, rules.inbound_host(config))
    check = data["lastCheck"]
    for record in data["records"]:
        record["label"] = PURPOSES.get(record["purpose"], record["purpose"])
        result = check.get(CHECKED_AS.get(record["purpose"], record["purpose"]))
        record["lastResult"] = result if isinstance(result, bool) else None
    return data


async def domain_list(ctx: Ctx, status: int = 200, **more: Any) -> Answer:
    request = ctx.request
    cursor = request.query.get("cursor")
    notice = None
    if cursor is not None and not is_valid_cursor(cursor):
        cursor, notice = None, "That page link is not valid: showing the first page."
    page = await request.app[DB].read(domain_store.page_domains, ctx.project_id, PAGE_SIZE, cursor)
    config = request.app[CONFIG]
    return Answer("domains.html", {"domains": [shown(d, config) for d in page.items], "total": page.total,
                                   "nextCursor": page.next_cursor, "notice": notice, **more}, status=status)


async def domains_page(ctx: Ctx) -> Answer:
    return await domain_list(ctx)


async def add_domain(ctx: Ctx) -> Answer:
    """The rule of `POST /domains`; a refused name re-shows the form with the reason (422)."""
    config = ctx.request.app[CONFIG]
    fields = await form_of(ctx.request)
    name = fields.get("domain", "")
    try:
        domain = await rules.add_new_domain(ctx.request.app[DB], ctx.project_id, name[:rules.MAX_DOMAIN_LENGTH + 1],
                                            config.delivery.dkim_selector, config.api.max_domains_per_project)
    except ValidationFailed as exc:
        if wants_json(ctx.request):
            raise  # a script gets the error answer
        return await domain_list(ctx, 422, errors=[e.as_dict() for e in exc.errors], message=exc.message,
                                 newDomain=name[:rules.MAX_DOMAIN_LENGTH + 10])
    return Answer(redirect=f"/projects/{ctx.project_id}/domains/{domain.id}", status=201,
                  flash=f"{domain.name} added: publish its records, then verify",
                  data=shown(domain, config))


async def domain_page(ctx: Ctx, status: int = 200, **more: Any) -> Answer:
    db = ctx.request.app[DB]
    domain = await db.read(rules.require_domain, ctx.project_id,
                           ctx.request.match_info["domain"][:rules.MAX_DOMAIN_LENGTH])
    routes = await db.read(inbound_store.routes_of_domain, domain.id)
    return Answer("domain.html", {**shown(domain, ctx.request.app[CONFIG]),
                                  "routes": [route_rules.route_json(r) for r in routes], **more}, status=status)


async def add_route(ctx: Ctx) -> Answer:
    """The rule of `POST /inbound/routes`; a refused pattern re-shows the page with the reason (422, or 409
    when it is already routed)."""
    config, db = ctx.request.app[CONFIG], ctx.request.app[DB]
    await db.read(rules.require_domain, ctx.project_id, ctx.request.match_info["domain"][:rules.MAX_DOMAIN_LENGTH])
    pattern = (await form_of(ctx.request)).get("pattern", "")[:MAX_PATTERN_LENGTH + 1]
    try:
        route = await db.write(lambda s: route_rules.add_route(s, ctx.project_id, pattern,
                                                               config.routes.max_per_project), alone=True)
    except (ValidationFailed, Conflict) as exc:
        if wants_json(ctx.request):
            raise
        errors = [e.as_dict() for e in getattr(exc, "errors", [])] or [
            {"field": "pattern", "message": exc.message, "code": "conflict"}]
        return await domain_page(ctx, exc.status, errors=errors, message=exc.message,
                                 newPattern=pattern[:MAX_PATTERN_LENGTH])
    return Answer(redirect=f"/projects/{ctx.project_id}/domains/{route.domain_id}", status=201,
                  flash=f"Mail to {route.pattern} now becomes email.received", data=route_rules.route_json(route))


async def delete_route(ctx: Ctx) -> Answer:
    route_id = ctx.request.match_info["route"][:64]
    route = await ctx.request.app[DB].write(lambda s: route_rules.delete_route(s, ctx.project_id, route_id))
    return Answer(redirect=f"/projects/{ctx.project_id}/domains/{ctx.request.match_info['domain'][:64]}",
                  flash=f"Route {route.pattern} deleted", data={**route_rules.route_json(route), "deleted": True})


async def verify_domain(ctx: Ctx) -> Answer:
    """Verify now: the DNS check (or SES's identity check) the API's verify makes, stored with its time."""
    config, db = ctx.request.app[CONFIG], ctx.request.app[DB]
    domain = await db.read(rules.require_domain, ctx.project_id,
                           ctx.request.match_info["domain"][:rules.MAX_DOMAIN_LENGTH])
    check = await rules.verify(domain, config, ses_identity_verified)
    domain = await db.write(lambda s: rules.save_check(s, domain.id, check))
    flash = f"{domain.name} is verified" if domain.verified else f"{domain.name} is not verified yet"
    return Answer(redirect=f"/projects/{ctx.project_id}/domains/{domain.id}", flash=flash,
                  data=shown(domain, config))


async def delete_domain(ctx: Ctx) -> Answer:
    id_or_name = ctx.request.match_info["domain"][:rules.MAX_DOMAIN_LENGTH]
    domain = await ctx.request.app[DB].write(lambda s: rules.delete_domain(s, ctx.project_id, id_or_name))
    return Answer(redirect=f"/projects/{ctx.project_id}/domains", flash=f"{domain.name} deleted",
                  data={"id": domain.id, "domain": domain.name, "deleted": True})


ROUTES = [
    Page("GET", "/projects/{project}/domains", domains_page),
    Page("POST", "/projects/{project}/domains", add_domain, role=Role.ADMIN),
    Page("GET", "/projects/{project}/domains/{domain}", domain_page),
    Page("POST", "/projects/{project}/domains/{domain}/verify", verify_domain, role=Role.ADMIN),
    Page("POST", "/projects/{project}/domains/{domain}/delete", delete_domain, role=Role.ADMIN),
    Page("POST", "/projects/{project}/domains/{domain}/routes", add_route, role=Role.ADMIN),
    Page("POST", "/projects/{project}/domains/{domain}/routes/{route}/delete", delete_route, role=Role.ADMIN),
]
