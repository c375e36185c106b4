"""Campaign rules: create and edit drafts, schedule, fan out, cancel, test sends, and composing each
recipient's message when the dispatcher sends it.

A campaign's emails share one deferred content (`pipeline.deferred`): the message spec as it was when
the fan-out started, composed for each recipient when the dispatcher sends it, so queueing 100,000
recipients writes two small rows each and no MIME, and a contact who unsubscribes mid-campaign gets
nothing more.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from core.metrics import EMAILS_ACCEPTED, count_at_commit
from pipeline import reputation
from pipeline.compose import MessageSpec, as_text, bulk_feedback_id, byte_length, lookup
from pipeline.deferred import insert_spec
from pipeline.domains import require_verified_sender
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.links import LinkSigner
from pipeline.marketing.templates import template_spec
from pipeline.submit import Queued, Submission, envelope_sender_for, submit
from pipeline.tracking.links import tracking_for
from storage import campaigns as store
from storage import contacts as contact_store
from storage import reputation as reputation_store
from storage import segments as segment_store
from storage import templates as template_store
from storage.db import Database, commit_without_flush_wait
from storage.models import Campaign, CampaignStatus, Project, utcnow

log = logging.getLogger("plunkd.campaigns")
T = TypeVar("T")
EDITABLE = frozenset({CampaignStatus.DRAFT, CampaignStatus.SCHEDULED})
MAX_LIST_RECIPIENTS = 10_000
EMPTY_RECIPIENTS = ("recipients must name at least one contact; to send to every subscribed contact, leave "
                    "recipients out and give audience ALL")
EXPANSION = 32
"""A composed message is at most this many times what its subject and body render to: quoted-printable
triples an octet at worst, HTML mail carries a text part beside it, and a PLUNK text body is escaped
and gets a tag per line break before both."""
LAYOUT_BYTES = 64 * 1024
"""Room for the headers, the MIME around the parts and the PLUNK layout."""
VALUE_FLOOR = 512
"""What a variable filled by plunkd (plunk_email, the unsubscribe links) renders to at most."""
SAMPLE_CONTACT = {"plunk_id": "00000000-0000-7000-8000-000000000000", "plunk_email": "x" * 64 + "@" + "x" * 255}
"""A contact as long as a contact gets, for composing a campaign's message before it is sent."""


@dataclass
class CampaignFields:
    """What a create or an update gives; None: not given (an update keeps the stored value)."""

    name: str | None = None
    subject: str | None = None
    body: str | None = None
    style: str | None = None
    template_id: str | None = None
    from_email: str | None = None
    from_name: str | None = None
    reply_to: str | None = None
    recipients: list[str] | None = None
    segment_id: str | None = None
    audience: str | None = None

    def changes(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if value is not None}


def require_campaign(session: Session, project_id: str, campaign_id: str, for_update: bool = False) -> Campaign:
    campaign = store.get_campaign(session, project_id, campaign_id, for_update)
    if campaign is None:
        raise NotFound(f"Campaign {campaign_id} not found", "Check the campaign id; it must belong to this project.")
    return campaign


def _audience_kind(values: dict[str, Any]) -> str:
    """ALL, SEGMENT or LIST from what was given; conflicting choices are a validation error. Every
    subscribed contact is an audience only when asked for by name (`audience: "ALL"`): no recipients,
    like an empty list, never means "everyone" (seeds 001-002 make `recipients` required)."""
    kind = values.get("audience")
    if values.get("recipients") == []:
        raise ValidationFailed([FieldError("recipients", EMPTY_RECIPIENTS, "too_small")])
    has_list, has_segment = bool(values.get("recipients")), values.get("segment_id") is not None
    if has_list and has_segment:
        raise ValidationFailed([FieldError("segment", "Give recipients or a segment, not both",
                                           "conflicting_audience")])
    implied = "LIST" if has_list else "SEGMENT" if has_segment else None
    if kind is not None and implied is not None and kind != implied:
        raise ValidationFailed([FieldError("audience", f"audience {kind} does not go with "
                                           f"{'recipients' if has_list else 'segment'}", "conflicting_audience")])
    kind = kind or implied
    if kind is None:
        raise ValidationFailed([FieldError("recipients", "Required: give recipients (contact ids or emails), a "
                                           "segment, or audience ALL for every subscribed contact", "required")])
    if kind == "SEGMENT" and not has_segment:
        raise ValidationFailed([FieldError("segment", "audience SEGMENT needs a segment id", "required")])
    if kind == "LIST" and not has_list:
        raise ValidationFailed([FieldError("recipients", "audience LIST needs recipients", "required")])
    return kind


def _check_references(session: Session, project_id: str, values: dict[str, Any]) -> None:
    """The template, segment and listed recipients must exist in the project (422 naming each)."""
    errors = []
    if values.get("template_id") and template_store.get_template(session, project_id, values["template_id"]) is None:
        errors.append(FieldError("template", f"Template {values['template_id']} not found", "unknown_template"))
    if values.get("segment_id") and segment_store.get_segment(session, project_id, values["segment_id"]) is None:
        errors.append(FieldError("segment", f"Segment {values['segment_id']} not found", "unknown_segment"))
    recipients = values.get("recipients") or []
    if recipients:
        ids = [r for r in recipients if "@" not in r]
        emails = [r.lower() for r in recipients if "@" in r]
        found_ids, found_emails = store.known_recipients(session, project_id, ids, emails)
        for index, value in enumerate(recipients):
            if (value.lower() not in found_emails) if "@" in value else (value not in found_ids):
                errors.append(FieldError(f"recipients.{index}", f"{value} is not a contact of this project",
                                         "unknown_recipient"))
                if len(errors) >= 20:
                    break
    if errors:
        raise ValidationFailed(errors, suggestion="Create the contacts, template or segment first, or drop them.")


def _content_given(values: dict[str, Any]) -> None:
    if not values.get("template_id") and (not values.get("subject") or values.get("body") is None):
        raise ValidationFailed([FieldError("subject", "Give subject and body, or a template", "required")])


def create_campaign(session: Session, project_id: str, fields: CampaignFields) -> Campaign:
    values = fields.changes()
    _content_given(values)
    values["audience"] = _audience_kind(values)
    values["recipients"] = _normalized(values.get("recipients") or [])
    _check_references(session, project_id, values)
    return store.insert_campaign(session, project_id, values)


def _normalized(recipients: list[str]) -> list[str]:
    return list(dict.fromkeys(r.lower() if "@" in r else r for r in recipients))


def update_campaign(session: Session, project_id: str, campaign_id: str, fields: CampaignFields) -> Campaign:
    campaign = require_campaign(session, project_id, campaign_id, for_update=True)
    if campaign.status not in EDITABLE:
        raise Conflict(f"Campaign {campaign_id} is {campaign.status} and can no longer be edited",
                       "Create a new campaign instead.")
    changes = fields.changes()
    if "recipients" in changes or "segment_id" in changes or "audience" in changes:
        audience = {"audience": changes.get("audience"), "recipients": changes.get("recipients"),
                    "segment_id": changes.get("segment_id")}
        if "recipients" in changes or changes.get("audience") == "ALL" or changes.get("segment_id"):
            changes["audience"] = _audience_kind(audience)
            changes["recipients"] = _normalized(changes.get("recipients") or [])
            changes["segment_id"] = changes.get("segment_id")
    merged = {"template_id": campaign.template_id, "subject": campaign.subject, "body": campaign.body, **changes}
    _content_given(merged)
    _check_references(session, project_id, changes)
    for name, value in changes.items():
        setattr(campaign, name, value)
    session.flush()
    return campaign


def delete_campaign(session: Session, project_id: str, campaign_id: str) -> Campaign:
    campaign = require_campaign(session, project_id, campaign_id, for_update=True)
    if campaign.status in (CampaignStatus.SENDING, CampaignStatus.PAUSED):
        raise Conflict(f"Campaign {campaign_id} is {campaign.status.lower()}",
                       "Cancel it first (POST /campaigns/:id/cancel).")
    store.delete_campaign(session, campaign)
    return campaign


def _audience(session: Session, campaign: Campaign) -> store.Audience:
    if campaign.audience == "SEGMENT":
        segment = segment_store.get_segment(session, campaign.project_id, campaign.segment_id or "")
        return store.Audience("SEGMENT", condition=segment.condition if segment is not None else {"any": []})
    if campaign.audience == "LIST":
        recipients = campaign.recipients or []
        return store.Audience("LIST", ids=tuple(r for r in recipients if "@" not in r),
                              emails=tuple(r for r in recipients if "@" in r))
    return store.Audience("ALL")


def message_spec(session: Session, campaign: Campaign, project: Project, links: LinkSigner) -> MessageSpec:
    """The campaign's message, always marketing mail: its own fields first, then its template's (see
    `template_spec`), then the project's sender. An empty subject or body means "the template's"."""
    template = template_store.get_template(session, project.id, campaign.template_id) if campaign.template_id else None
    if template is None:
        spec = MessageSpec(campaign.from_email or project.from_email, campaign.from_name or project.from_name,
                           campaign.subject, campaign.body, campaign.reply_to, style=campaign.style, links=links,
                           campaign_id=campaign.id)
    else:
        spec = template_spec(template, (project.from_email, project.from_name), links, marketing=True,
                             from_email=campaign.from_email, from_name=campaign.from_name,
                             reply_to=campaign.reply_to, subject=campaign.subject or None,
                             body=campaign.body or None, campaign_id=campaign.id)
        if campaign.body:
            spec.style = campaign.style
    spec.feedback_id = bulk_feedback_id(campaign.id, project.id, spec.from_email)
    return spec


def check_size(session: Session, project_id: str, spec: MessageSpec, max_bytes: int) -> None:
    """MessageTooLarge (422 naming subject or body) when the campaign's email would be larger than
    `max_bytes` for a contact of the project, so it is refused before anything is queued instead of
    failing recipient by recipient.

    Each variable renders to at most six times (HTML escaping) the largest contact data of the project,
    or to its default; when EXPANSION times the subject and body rendered so stays under the limit, that
    one aggregate query is all. Otherwise the message is composed once with, for each variable it uses,
    the largest value any contact of the project has for it (one pass over the contacts' data). A contact
    whose value is shorter but escapes or encodes to more can still go over: the dispatcher then fails
    that email alone, with the reason."""
    templates = (spec.template(spec.subject), spec.template(spec.body))
    value_bound = 6 * max(contact_store.largest_data_bytes(session, project_id), VALUE_FLOOR)
    rendered_bound = sum(template.literal_bytes + sum(count * max(value_bound, byte_length(use.default))
                                                      for use, count in template.uses.items())
                         for template in templates)
    if rendered_bound * EXPANSION + LAYOUT_BYTES <= max_bytes:
        return
    names = {use.name for template in templates for use in template.uses} - set(SAMPLE_CONTACT)
    largest: dict[str, tuple[int, str]] = {}
    for data in contact_store.all_data(session, project_id) if names else ():
        for name in names:
            value = lookup(data, name)
            if value is not None:
                text = as_text(value)
                size = byte_length(text)
                if size > largest.get(name, (-1, ""))[0]:
                    largest[name] = (size, text)
    variables = {**{name: text for name, (_, text) in largest.items()}, **SAMPLE_CONTACT}
    spec.build(SAMPLE_CONTACT["plunk_email"], variables, max_bytes)


def schedule_campaign(session: Session, project: Project, campaign_id: str, at: datetime,
                      links: LinkSigner, max_bytes: int | None = None) -> Campaign:
    """Live send: at `at` (now, or later), to every subscribed contact of the audience. With `max_bytes`
    (`smtp.max_message_bytes`), a campaign whose email would be larger is refused (`check_size`)."""
    campaign = require_campaign(session, project.id, campaign_id, for_update=True)
    if campaign.status not in EDITABLE:
        raise Conflict(f"Campaign {campaign_id} is {campaign.status}; only a draft or scheduled campaign can be sent",
                       "Create a new campaign to send again.")
    spec = message_spec(session, campaign, project, links)
    require_verified_sender(session, project.id, spec.from_email)
    if max_bytes is not None:
        check_size(session, project.id, spec, max_bytes)
    if store.count_audience(session, project.id, _audience(session, campaign), utcnow()) == 0:
        raise ValidationFailed([FieldError("recipients" if campaign.audience == "LIST" else "audience",
                                           "The audience has no subscribed contacts", "empty_audience")],
                               message="The campaign's audience is empty: no subscribed contact would receive it",
                               suggestion="Subscribe contacts, or pick another segment or list.")
    campaign.status = CampaignStatus.SCHEDULED
    campaign.scheduled_at = at
    session.flush()
    log.info("campaign %s: scheduled for %s", campaign.id, at.isoformat())
    return campaign


def cancel_campaign(session: Session, project_id: str, campaign_id: str) -> Campaign:
    """CANCELLED: no email of it goes out from now on (a dispatcher holding one cancels it when it sees the status).
    Its emails waiting in the outbox are taken out after this commits, a part at a time (`cancel`)."""
    campaign = require_campaign(session, project_id, campaign_id, for_update=True)
    if campaign.status not in (CampaignStatus.SCHEDULED, CampaignStatus.SENDING, CampaignStatus.PAUSED):
        raise Conflict(f"Campaign {campaign_id} is {campaign.status}; only a scheduled, sending or paused "
                       "campaign can be cancelled")
    campaign.status = CampaignStatus.CANCELLED
    campaign.finished_at = utcnow()
    session.flush()
    return campaign


async def cancel(db: Database, project_id: str, campaign_id: str, shown: Callable[[Campaign], T]) -> T:
    """`cancel_campaign` (what `shown` makes of the campaign, in its transaction, is returned), then its emails
    waiting in the outbox marked CANCELLED and taken out, a thousand per transaction: in the one transaction, a
    campaign's 100,000 held up every other write until it committed. Those a crash leaves behind are the
    dispatcher's to cancel as it claims them."""
    cancelled = await db.write(lambda s: shown(cancel_campaign(s, project_id, campaign_id)))
    withdrawn = await db.write_in_chunks(functools.partial(store.withdraw_queued, campaign_id=campaign_id))
    log.info("campaign %s: cancelled, %d queued emails withdrawn", campaign_id, withdrawn)
    return cancelled


def resume_campaign(session: Session, project_id: str, campaign_id: str) -> Campaign:
    """A campaign the reputation guard paused goes on where it stopped (SENDING; SCHEDULED when it had not
    started), and the project's workflow sends with it. Its parked emails are made due after this commits, a part
    at a time (`resume`)."""
    campaign = require_campaign(session, project_id, campaign_id, for_update=True)
    if campaign.status != CampaignStatus.PAUSED:
        raise Conflict(f"Campaign {campaign_id} is {campaign.status}; only a paused campaign can be resumed")
    campaign.status = CampaignStatus.SCHEDULED if campaign.content_id is None else CampaignStatus.SENDING
    reputation.lift_pause(session, project_id)
    session.flush()
    return campaign


async def resume(db: Database, project_id: str, campaign_id: str, shown: Callable[[Campaign], T]) -> T:
    """`resume_campaign` (what `shown` makes of the campaign, in its transaction, is returned), then its parked
    emails made due, a thousand per transaction (`release_parked_emails`)."""
    resumed = await db.write(lambda s: shown(resume_campaign(s, project_id, campaign_id)))
    released = await release_parked_emails(db, campaign_id)
    log.info("campaign %s: resumed by a user, %d parked emails released", campaign_id, released)
    return resumed


async def park_paused_emails(db: Database, campaign_id: str) -> int:
    """A paused campaign's emails waiting in the outbox parked, a thousand per transaction, after the pause
    committed (`reputation.pause_campaign`); returns how many. The fan-out loop runs it (`marketing.fanout`)."""
    walk = store.EmailWalk(campaign_id)
    await db.write_in_chunks(functools.partial(store.park_queued, walk=walk))
    return walk.changed


async def release_parked_emails(db: Database, campaign_id: str) -> int:
    """A campaign's emails parked for a pause made due, a thousand per transaction; returns how many. Those a crash
    leaves parked are released when the fan-out loop starts again (`marketing.fanout`)."""
    return await db.write_in_chunks(functools.partial(store.release_parked, campaign_id=campaign_id))


def send_test(session: Session, project: Project, campaign_id: str, addresses: list[str],
              links: LinkSigner, max_bytes: int | None = None) -> list[Queued]:
    """One copy to each address now (the project's sender when none is given), ahead of campaign mail;
    the campaign itself does not change, nor does the audience: a test copy is an email of no contact
    (`Submission.test_copy`). A copy larger than `max_bytes` is refused (MessageTooLarge)."""
    campaign = require_campaign(session, project.id, campaign_id)
    spec = message_spec(session, campaign, project, links)
    spec.campaign_id = None
    return submit(session, Submission(project.id, "campaign", spec.from_email, addresses or [project.from_email],
                                      compose=functools.partial(spec.build, limit=max_bytes), subject=spec.subject,
                                      size=len(spec.body),
                                      tracking=tracking_for(session, project.id, marketing=True), test_copy=True))


def start_fanout(session: Session, campaign_id: str, links: LinkSigner) -> Campaign | None:
    """SCHEDULED → SENDING, with the message spec fixed as the campaign's deferred content. A campaign
    already SENDING (a fan-out that died) is returned as it is; a cancelled one is None."""
    campaign = store.get_campaign_by_id(session, campaign_id)
    if campaign is None or campaign.status not in (CampaignStatus.SCHEDULED, CampaignStatus.SENDING):
        return None
    if campaign.status == CampaignStatus.SCHEDULED and reputation_store.marketing_paused(session, campaign.project_id):
        reputation.pause_campaign(session, campaign, {"reason": "the project's campaigns are paused (reputation)"})
        session.flush()
        return None
    if campaign.content_id is None:
        spec = message_spec(session, campaign, session.get_one(Project, campaign.project_id), links)
        campaign.content_id = insert_spec(session, campaign.project_id, spec)
        campaign.from_email = campaign.from_email or spec.from_email
        campaign.status = CampaignStatus.SENDING
        campaign.started_at = utcnow()
        session.flush()
        log.info("campaign %s: fan-out started", campaign.id)
    return campaign


def _fanning_out(session: Session, campaign_id: str, for_update: bool = False,
                 key_share: bool = False) -> Campaign | None:
    """The campaign if it is SENDING with its fan-out unfinished (locked as asked), else None."""
    campaign = store.get_campaign_by_id(session, campaign_id, for_update=for_update, key_share=key_share)
    if campaign is None or campaign.status != CampaignStatus.SENDING or campaign.fanout_done:
        return None
    return campaign


def _queue_as(session: Session, campaign: Campaign) -> dict[str, Any]:
    """What each recipient's email is queued with: the audience, sender, Return-Path and tracking choice."""
    tracking = tracking_for(session, campaign.project_id, marketing=True)
    sender = campaign.from_email or ""
    return {"audience": _audience(session, campaign), "sender": sender, "envelope_sender": envelope_sender_for(sender),
            "now": utcnow(), "track_opens": bool(tracking.opens), "track_clicks": bool(tracking.clicks)}


def fan_out_next(session: Session, campaign_id: str, chunk: int) -> tuple[int, bool]:
    """Queue the next chunk of a SENDING campaign after its cursor, holding its row; returns (queued, finished).
    SQLite's every chunk; on PostgreSQL the first and those while requests write (else `plan_fan_out`)."""
    campaign = _fanning_out(session, campaign_id, for_update=True)
    if campaign is None:
        return 0, True
    commit_without_flush_wait(session)
    queued = store.fan_out_chunk(session, campaign, chunk=chunk, **_queue_as(session, campaign))
    count_at_commit(session, EMAILS_ACCEPTED.labels("campaign"), queued)
    if campaign.fanout_done:
        log.info("campaign %s: fan-out done, %d recipients queued", campaign.id, campaign.recipient_count)
    return queued, campaign.fanout_done


@dataclass(frozen=True)
class FanOutPlan:
    """The next ranges of a fan-out run at once (PostgreSQL): each (after, upto], upto None to the end."""

    ranges: list[tuple[str | None, str | None]]
    cursor: str | None
    """The cursor once every range is committed."""
    last: bool
    """The last range runs to the end: once it is committed the fan-out is done."""


def plan_fan_out(session: Session, campaign_id: str, chunk: int, ranges: int) -> FanOutPlan | None:
    """The next `ranges` ranges of `chunk` recipients after the cursor; None if the campaign is not fanning out."""
    campaign = _fanning_out(session, campaign_id)
    if campaign is None:
        return None
    cursor = campaign.fanout_cursor
    bounds = store.audience_bounds(session, campaign.project_id, _audience(session, campaign), utcnow(), cursor,
                                   chunk, ranges)
    starts = [cursor, *bounds]
    spans: list[tuple[str | None, str | None]] = list(zip(starts[:-1], bounds, strict=True))
    last = len(bounds) < ranges
    if last:
        spans.append((starts[-1], None))
    return FanOutPlan(spans, starts[-1], last)


def fan_out_range(session: Session, campaign_id: str, after: str | None, upto: str | None) -> int:
    """Queue one range of a plan, in a transaction of its own beside the others. Returns how many were queued."""
    campaign = _fanning_out(session, campaign_id, key_share=True)
    if campaign is None:
        return 0
    commit_without_flush_wait(session)
    queued = store.fan_out_range(session, campaign, after=after, upto=upto, **_queue_as(session, campaign))
    count_at_commit(session, EMAILS_ACCEPTED.labels("campaign"), queued)
    return queued


def advance_fan_out(session: Session, campaign_id: str, plan: FanOutPlan) -> bool:
    """Every range of `plan` is committed: move the cursor past them, and after the last mark the fan-out done.
    A cursor another node moved further stays. Returns whether the fan-out is finished."""
    campaign = _fanning_out(session, campaign_id, for_update=True)
    if campaign is None:
        return True
    if plan.cursor is not None and (campaign.fanout_cursor is None or campaign.fanout_cursor < plan.cursor):
        campaign.fanout_cursor = plan.cursor
    if plan.last:
        campaign.fanout_done = True
        log.info("campaign %s: fan-out done, %d recipients queued", campaign.id, campaign.recipient_count)
    return campaign.fanout_done


def reach(session: Session, campaign: Campaign) -> int:
    """How many subscribed contacts the campaign's audience holds now (what a send would queue)."""
    return store.count_audience(session, campaign.project_id, _audience(session, campaign), utcnow())
