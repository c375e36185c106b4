"""Campaign pages: the list, a draft made step by step (content, audience, sender, then test, schedule or send
now), a live progress bar while it sends, and after it its stats with charts and its recipients.

Every change goes through the rules the API uses (`pipeline.marketing.campaigns`); the progress fragment
costs one query however large the campaign (`storage.campaigns.campaign_progress`), at most one per
campaign per PROGRESS_SECONDS in a process however many browsers poll it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy.orm import Session

from dashboard.context import CONFIG, DB, LINKS, ON_QUEUED
from dashboard.routing import Answer, Ctx, Page, form_of, wants_json
from pipeline import accounts
from pipeline.cache import TtlCache
from pipeline.compose import is_safe_header_value
from pipeline.errors import FieldError, NotFound, ValidationFailed
from pipeline.marketing import campaigns as rules
from pipeline.marketing.campaigns import MAX_LIST_RECIPIENTS, CampaignFields
from storage import campaigns as store
from storage import segments as segment_store
from storage import templates as template_store
from storage.models import Campaign, CampaignStatus, EmailStatus, Project, Role, iso
from storage.pagination import is_valid_cursor

PAGE_SIZE = 50
CHOICES = 200
"""Templates and segments offered in a draft's pickers (the newest)."""
MAX_NAME = 200
MAX_SUBJECT = 998
MAX_BODY = 5_000_000
MAX_TEST_ADDRESSES = 10
MAX_SCHEDULE_DAYS = 366
RECIPIENT_SPLIT = re.compile(r"[\s,;]+")
LIVE = (CampaignStatus.SCHEDULED, CampaignStatus.SENDING)
PROGRESS_SECONDS = 1.0
"""How long a campaign's counted progress is shown again: the poll interval. The count is one index range
scan, but of every email of the campaign (30 ms of CPU at 100,000 on SQLite), and each browser on the page
polls it every second."""
_PROGRESS: TtlCache[tuple[str, str], store.Progress] = TtlCache(PROGRESS_SECONDS, 10_000)
OUTCOMES = ("delivered", "opened", "clicked", "bounced", "complained", "unsubscribed")


def campaign_json(campaign: Campaign) -> dict[str, Any]:
    return {"id": campaign.id, "name": campaign.name, "subject": campaign.subject, "body": campaign.body,
            "style": campaign.style, "template": campaign.template_id, "from": campaign.from_email,
            "fromName": campaign.from_name, "reply": campaign.reply_to, "audience": campaign.audience,
            "segment": campaign.segment_id, "recipients": list(campaign.recipients or []),
            "status": campaign.status, "scheduledAt": campaign.scheduled_at, "startedAt": campaign.started_at,
            "finishedAt": campaign.finished_at, "recipientCount": campaign.recipient_count,
            "createdAt": campaign.created_at, "updatedAt": campaign.updated_at}


def _cursor(ctx: Ctx) -> str | None:
    cursor = ctx.request.query.get("cursor")
    if cursor is not None and not is_valid_cursor(cursor):
        raise ValidationFailed([FieldError("cursor", "Not a cursor this page gave", "invalid_string")])
    return cursor


def _campaign_id(ctx: Ctx) -> str:
    return ctx.request.match_info["campaign"][:64]


def _text(fields: dict[str, str], name: str, limit: int, errors: list[FieldError], header: bool = False) -> str:
    value = fields.get(name, "")
    if len(value) > limit:
        errors.append(FieldError(name, f"At most {limit} characters", "too_big"))
    elif "\x00" in value or header and not is_safe_header_value(value):
        errors.append(FieldError(name, "Must not contain line breaks or control characters", "invalid_header_value"))
    return value


def _email_or_none(fields: dict[str, str], name: str, errors: list[FieldError]) -> str | None:
    value = fields.get(name, "").strip()
    if not value:
        return None
    try:
        return accounts.valid_email(value, name)
    except ValidationFailed as exc:
        errors += exc.errors
        return None


def campaign_fields(fields: dict[str, str]) -> CampaignFields:
    """A draft form (or JSON object of strings) as the rules' fields, bounded; ValidationFailed naming
    each bad field."""
    errors: list[FieldError] = []
    name = _text(fields, "name", MAX_NAME, errors, header=True).strip()
    subject = _text(fields, "subject", MAX_SUBJECT, errors, header=True)
    body = _text(fields, "body", MAX_BODY, errors)
    style = fields.get("style", "HTML")
    if style not in ("PLUNK", "HTML"):
        errors.append(FieldError("style", "PLUNK or HTML", "invalid_enum_value"))
    template = _text(fields, "template", 64, errors).strip() or None
    from_name = _text(fields, "fromName", 200, errors, header=True).strip() or None
    audience = fields.get("audience", "ALL")
    segment, recipients = None, None
    if audience == "SEGMENT":
        segment = _text(fields, "segment", 64, errors).strip() or None
    elif audience == "LIST":
        raw = fields.get("recipients", "")
        recipients = [r for r in RECIPIENT_SPLIT.split(raw[:MAX_LIST_RECIPIENTS * 330]) if r]
        if len(recipients) > MAX_LIST_RECIPIENTS or len(raw) > MAX_LIST_RECIPIENTS * 330:
            errors.append(FieldError("recipients", f"At most {MAX_LIST_RECIPIENTS} recipients", "too_big"))
        elif any(len(r) > 320 or "\x00" in r for r in recipients):
            errors.append(FieldError("recipients", "Each recipient is a contact id or an email of at most 320 "
                                                   "characters", "invalid_string"))
    elif audience != "ALL":
        errors.append(FieldError("audience", "ALL, SEGMENT or LIST", "invalid_enum_value"))
    result = CampaignFields(name=name, subject=subject, body=body, style=style, template_id=template,
                            from_email=_email_or_none(fields, "from", errors), from_name=from_name,
                            reply_to=_email_or_none(fields, "reply", errors), recipients=recipients or None,
                            segment_id=segment, audience=audience)
    if audience == "LIST" and not recipients and not errors:
        errors.append(FieldError("recipients", "Name at least one contact (an email or id per line)", "too_small"))
    if errors:
        raise ValidationFailed(errors)
    return result


async def _choices(ctx: Ctx) -> dict[str, Any]:
    """The templates and segments a draft may pick (the newest CHOICES of each)."""
    def read(session) -> dict[str, Any]:
        templates = template_store.list_templates(session, ctx.project_id, CHOICES, None).items
        segments = segment_store.list_segments(session, ctx.project_id, CHOICES, None).items
        return {"templates": [{"id": t.id, "name": t.name} for t in templates],
                "segments": [{"id": s.id, "name": s.name} for s in segments]}
    return await ctx.request.app[DB].read(read)


async def campaign_list(ctx: Ctx) -> Answer:
    page = await ctx.request.app[DB].read(store.campaign_page, ctx.project_id, PAGE_SIZE, _cursor(ctx))
    items = [{"id": row.id, "name": row.name, "subject": row.subject, "status": row.status,
              "recipientCount": row.recipient_count, "scheduledAt": row.scheduled_at, "createdAt": row.created_at}
             for row in page.items]
    return Answer("campaigns.html", {"campaigns": items, "nextCursor": page.next_cursor})


async def new_campaign_form(ctx: Ctx) -> Answer:
    return Answer("campaign_new.html", {"values": {"style": "HTML", "audience": "ALL"}, "errors": []},
                  extra=await _choices(ctx))


async def create_campaign(ctx: Ctx) -> Answer:
    fields = await form_of(ctx.request)
    try:
        values = campaign_fields(fields)
        campaign = await ctx.request.app[DB].write(lambda s: campaign_json(
            rules.create_campaign(s, ctx.project_id, values)))
    except ValidationFailed as exc:
        if wants_json(ctx.request):
            raise
        return Answer("campaign_new.html", {"values": fields, "errors": [e.as_dict() for e in exc.errors],
                                            "message": exc.message}, status=422, extra=await _choices(ctx))
    return Answer(redirect=f"/projects/{ctx.project_id}/campaigns/{campaign['id']}", flash="Draft saved",
                  data=campaign, status=201)


def _percent(part: int, whole: int) -> int:
    return min(100, round(100 * part / whole)) if whole else 0


def counted_progress(session: Session, project_id: str, campaign_id: str,
                     status: str | None = None) -> store.Progress | None:
    """The campaign's progress as counted within the last PROGRESS_SECONDS (here, or now); counted again
    when the campaign's `status`, when given, is not the one counted."""
    progress = _PROGRESS.get((project_id, campaign_id))
    if progress is None or status is not None and progress.status != status:
        progress = store.campaign_progress(session, project_id, campaign_id)
        if progress is not None:
            _PROGRESS.put((project_id, campaign_id), progress)
    return progress


def progress_json(progress: store.Progress) -> dict[str, Any]:
    counts = progress.counts
    done = counts["sent"] + counts["failed"] + counts["cancelled"]
    return {"status": progress.status, "recipients": progress.recipients, **counts,
            "percent": _percent(done, progress.recipients), "live": progress.status in LIVE}


async def campaign_page(ctx: Ctx) -> Answer:
    campaign_id = _campaign_id(ctx)

    def read(session) -> dict[str, Any]:
        campaign = rules.require_campaign(session, ctx.project_id, campaign_id)
        data: dict[str, Any] = {"campaign": campaign_json(campaign), "reach": None, "progress": None,
                                "stats": None, "timeline": [], "links": [], **_names(session, campaign)}
        if campaign.status in rules.EDITABLE:
            data["reach"] = rules.reach(session, campaign)
        if campaign.status != CampaignStatus.DRAFT:
            progress = counted_progress(session, ctx.project_id, campaign_id, campaign.status)
            data["progress"] = progress_json(progress) if progress else None
        if campaign.status in (CampaignStatus.SENT, CampaignStatus.CANCELLED):
            data["stats"] = {"recipients": campaign.recipient_count, **store.campaign_stats(session, campaign.id)}
            data["timeline"] = [{"hour": hour, **counts}
                                for hour, counts in store.campaign_timeline(session, campaign.id).items()]
            data["links"] = [{"url": url, "clicks": clicks} for url, clicks in store.top_links(session, campaign.id)]
        return data

    data = await ctx.request.app[DB].read(read)
    extra = await _choices(ctx) if data["campaign"]["status"] in rules.EDITABLE else {}
    extra["charts"] = charts(data["timeline"], data["stats"])
    return Answer("campaign.html", {**data, "values": _form_values(data["campaign"]), "errors": []}, extra=extra)


def _names(session, campaign: Campaign) -> dict[str, str | None]:
    """The names of the campaign's segment and template (each a primary-key read), for the page to link."""
    segment = segment_store.get_segment(session, campaign.project_id, campaign.segment_id) \
        if campaign.segment_id else None
    template = template_store.get_template(session, campaign.project_id, campaign.template_id) \
        if campaign.template_id else None
    return {"segmentName": segment.name if segment else None, "templateName": template.name if template else None}


def _form_values(campaign: dict[str, Any]) -> dict[str, str]:
    """A stored campaign as its edit form's fields."""
    return {"name": campaign["name"] or "", "subject": campaign["subject"] or "", "body": campaign["body"] or "",
            "style": campaign["style"] or "HTML", "template": campaign["template"] or "",
            "from": campaign["from"] or "", "fromName": campaign["fromName"] or "", "reply": campaign["reply"] or "",
            "audience": campaign["audience"] or "ALL", "segment": campaign["segment"] or "",
            "recipients": "\n".join(campaign["recipients"])}


async def progress_fragment(ctx: Ctx) -> Answer:
    """The progress bar alone: what the campaign page polls every second while the campaign sends."""
    progress = _PROGRESS.get((ctx.project_id, _campaign_id(ctx)))
    if progress is None:
        progress = await ctx.request.app[DB].read(counted_progress, ctx.project_id, _campaign_id(ctx))
    if progress is None:
        raise NotFound("No such campaign")
    return Answer("campaign_progress.html", {"progress": progress_json(progress),
                                             "campaignId": _campaign_id(ctx)}, extra={"fragment": True})


async def edit_campaign(ctx: Ctx) -> Answer | web.StreamResponse:
    campaign_id = _campaign_id(ctx)
    fields = await form_of(ctx.request)
    try:
        values = campaign_fields(fields)
        campaign = await ctx.request.app[DB].write(lambda s: campaign_json(
            rules.update_campaign(s, ctx.project_id, campaign_id, values)))
    except ValidationFailed as exc:
        if wants_json(ctx.request):
            raise
        answer = await campaign_page(ctx)
        answer.data.update({"values": fields, "errors": [e.as_dict() for e in exc.errors], "message": exc.message})
        answer.status = 422
        return answer
    return Answer(redirect=f"/projects/{ctx.project_id}/campaigns/{campaign_id}", flash="Draft saved", data=campaign)


def _wake(ctx: Ctx) -> None:
    for wake in ctx.request.app[ON_QUEUED]:
        wake()


def _test_addresses(fields: dict[str, str]) -> list[str]:
    raw = fields.get("emails", "")[:MAX_TEST_ADDRESSES * 330]
    given = [value for value in RECIPIENT_SPLIT.split(raw) if value]
    if len(given) > MAX_TEST_ADDRESSES:
        raise ValidationFailed([FieldError("emails", f"At most {MAX_TEST_ADDRESSES} addresses", "too_big")])
    return [accounts.valid_email(value, "emails") for value in given]


async def test_campaign(ctx: Ctx) -> Answer:
    """Test copies now, to the addresses given (or to you, the signed-in user)."""
    assert ctx.visit is not None
    campaign_id = _campaign_id(ctx)
    addresses = _test_addresses(await form_of(ctx.request)) or [ctx.visit.user.email]
    app = ctx.request.app
    links, max_bytes = app[LINKS], app[CONFIG].smtp.max_message_bytes
    queued = await app[DB].write(lambda s: rules.send_test(s, s.get_one(Project, ctx.project_id), campaign_id,
                                                           addresses, links, max_bytes))
    _wake(ctx)
    return Answer(redirect=f"/projects/{ctx.project_id}/campaigns/{campaign_id}",
                  flash=f"Test sent to {', '.join(addresses)}",
                  data={"emails": [{"email": q.email, "emailId": q.email_id} for q in queued]})


def _send_time(fields: dict[str, str]) -> datetime:
    """Now, or the `scheduledAt` given (a date-time-local field is read as UTC; a zone may be given)."""
    if fields.get("when", "now") == "now":
        return datetime.now(UTC)
    raw = fields.get("scheduledAt", "").strip()[:40]
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        raise ValidationFailed([FieldError("scheduledAt", "A date and time, e.g. 2030-01-31T09:00",
                                           "invalid_date")]) from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    if at > datetime.now(UTC) + timedelta(days=MAX_SCHEDULE_DAYS):
        raise ValidationFailed([FieldError("scheduledAt", f"At most {MAX_SCHEDULE_DAYS} days ahead", "too_big")])
    return max(at, datetime.now(UTC))


async def send_campaign(ctx: Ctx) -> Answer:
    campaign_id = _campaign_id(ctx)
    at = _send_time(await form_of(ctx.request))
    app = ctx.request.app
    links, max_bytes = app[LINKS], app[CONFIG].smtp.max_message_bytes
    campaign = await app[DB].write(lambda s: campaign_json(rules.schedule_campaign(
        s, s.get_one(Project, ctx.project_id), campaign_id, at, links, max_bytes)))
    _PROGRESS.discard((ctx.project_id, campaign_id))
    _wake(ctx)
    return Answer(redirect=f"/projects/{ctx.project_id}/campaigns/{campaign_id}",
                  flash=f"Scheduled for {iso(at)}" if at > datetime.now(UTC) + timedelta(minutes=1) else "Sending",
                  data=campaign)


async def cancel_campaign(ctx: Ctx) -> Answer:
    campaign_id = _campaign_id(ctx)
    campaign = await rules.cancel(ctx.request.app[DB], ctx.project_id, campaign_id, campaign_json)
    _PROGRESS.discard((ctx.project_id, campaign_id))
    return Answer(redirect=f"/projects/{ctx.project_id}/campaigns/{campaign_id}", flash="Campaign cancelled",
                  data=campaign)


async def resume_campaign(ctx: Ctx) -> Answer:
    campaign_id = _campaign_id(ctx)
    campaign = await rules.resume(ctx.request.app[DB], ctx.project_id, campaign_id, campaign_json)
    _PROGRESS.discard((ctx.project_id, campaign_id))
    _wake(ctx)
    return Answer(redirect=f"/projects/{ctx.project_id}/campaigns/{campaign_id}", flash="Campaign resumed",
                  data=campaign)


async def delete_campaign(ctx: Ctx) -> Answer:
    campaign_id = _campaign_id(ctx)
    await ctx.request.app[DB].write(lambda s: rules.delete_campaign(s, ctx.project_id, campaign_id))
    return Answer(redirect=f"/projects/{ctx.project_id}/campaigns", flash="Campaign deleted",
                  data={"deleted": campaign_id})


async def recipients(ctx: Ctx) -> Answer:
    campaign_id = _campaign_id(ctx)
    status = ctx.request.query.get("status") or None
    if status is not None and status not in EmailStatus.__members__:
        raise ValidationFailed([FieldError("status", f"One of {', '.join(EmailStatus)}", "invalid_enum_value")])
    cursor = _cursor(ctx)

    def read(session) -> dict[str, Any]:
        campaign = rules.require_campaign(session, ctx.project_id, campaign_id)
        page = store.campaign_recipients(session, campaign.id, status, PAGE_SIZE, cursor)
        return {"campaign": {"id": campaign.id, "name": campaign.name, "status": campaign.status},
                "recipients": [{"emailId": row.id, "email": row.recipient, "contactId": row.contact_id,
                                "status": row.status, "sentAt": row.sent_at, "error": row.error}
                               for row in page.items],
                "status": status, "nextCursor": page.next_cursor}

    return Answer("campaign_recipients.html", await ctx.request.app[DB].read(read),
                  extra={"statuses": list(EmailStatus)})


# ---------------------------------------------------------------------------------------------------
# Charts: geometry for server-rendered SVG (no script draws them).

CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 640, 220, 36
MAX_HOURS = 96
"""The timeline chart shows the last MAX_HOURS hours with activity."""


def charts(timeline: list[dict[str, Any]], stats: dict[str, int] | None) -> dict[str, Any]:
    """Bars of sends per hour with lines of opens and clicks, and bars of the outcomes."""
    shown = timeline[-MAX_HOURS:]
    top = max([max(h["sent"], h["opened"], h["clicked"]) for h in shown] or [0]) or 1
    plot_w, plot_h = CHART_WIDTH - 2 * CHART_PAD, CHART_HEIGHT - 2 * CHART_PAD
    step = plot_w / max(len(shown), 1)

    def y(value: int) -> float:
        return round(CHART_PAD + plot_h - plot_h * value / top, 1)

    bars = [{"x": round(CHART_PAD + i * step + step * 0.15, 1), "y": y(h["sent"]), "w": round(step * 0.7, 1),
             "h": round(CHART_PAD + plot_h - y(h["sent"]), 1), "label": f"{h['hour']}:00 UTC: {h['sent']} sent"}
            for i, h in enumerate(shown)]

    def line(key: str) -> list[dict[str, float]]:
        return [{"x": round(CHART_PAD + i * step + step / 2, 1), "y": y(h[key])} for i, h in enumerate(shown)]

    outcomes = [(name, (stats or {}).get(name, 0)) for name in OUTCOMES]
    most = max([count for _, count in outcomes] or [0]) or 1
    rows = [{"name": name, "count": count, "y": 10 + i * 30, "w": round(420 * count / most, 1)}
            for i, (name, count) in enumerate(outcomes)]
    return {"width": CHART_WIDTH, "height": CHART_HEIGHT, "pad": CHART_PAD, "top": top, "bars": bars,
            "opens": line("opened"), "clicks": line("clicked"), "first": shown[0]["hour"] if shown else "",
            "last": shown[-1]["hour"] if shown else "", "outcomes": rows, "hours": shown}


ROUTES = [
    Page("GET", "/projects/{project}/campaigns", campaign_list),
    Page("GET", "/projects/{project}/campaigns/new", new_campaign_form, role=Role.EDITOR),
    Page("POST", "/projects/{project}/campaigns", create_campaign, role=Role.EDITOR),
    Page("GET", "/projects/{project}/campaigns/{campaign}", campaign_page),
    Page("GET", "/projects/{project}/campaigns/{campaign}/progress", progress_fragment),
    Page("GET", "/projects/{project}/campaigns/{campaign}/recipients", recipients),
    Page("POST", "/projects/{project}/campaigns/{campaign}/edit", edit_campaign, role=Role.EDITOR),
    Page("POST", "/projects/{project}/campaigns/{campaign}/test", test_campaign, role=Role.EDITOR),
    Page("POST", "/projects/{project}/campaigns/{campaign}/send", send_campaign, role=Role.EDITOR),
    Page("POST", "/projects/{project}/campaigns/{campaign}/cancel", cancel_campaign, role=Role.EDITOR),
    Page("POST", "/projects/{project}/campaigns/{campaign}/resume", resume_campaign, role=Role.EDITOR),
    Page("POST", "/projects/{project}/campaigns/{campaign}/delete", delete_campaign, role=Role.EDITOR),
]
