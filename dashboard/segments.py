"""Segments: the list, and the condition builder (a form per condition, groups all/any/not) beside the JSON
view of the same tree, the live member count and first members (htmx, debounced: the API's count query),
membership tracking, and the entries and exits of the last days.

The form and the tree are one another's image (`pipeline.marketing.segment_form`); the builder's buttons
(add a condition to a group, remove one, apply the JSON) post the form and get it back changed, so the
builder works without JavaScript."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from dashboard.context import DB
from dashboard.routing import Answer, Ctx, Page, form_of, live_fragment
from pipeline.cache import TtlCache
from pipeline.errors import FieldError, ValidationFailed
from pipeline.marketing import segment_form
from pipeline.marketing import segments as rules
from pipeline.marketing.segment_form import FormNode
from storage import contacts as contact_store
from storage import events as event_store
from storage import segments as segment_store
from storage.models import Role, utcnow
from storage.pagination import is_valid_cursor

PAGE_SIZE = 50
FIRST_MEMBERS = 10
KEY_SAMPLE = 500
"""Contacts whose data keys the builder offers (the newest)."""
NAME_SAMPLE = 1000
"""Events whose names the builder offers (the newest)."""
SAMPLES_SECONDS = 60.0
_SAMPLES: TtlCache[str, tuple[list[str], list[str]]] = TtlCache(SAMPLES_SECONDS)
"""The data keys and event names a project's builder offers, read again once a minute per process (two bounded
reads that cost the segment page as much as the rest of it)."""
MOVES_DAYS = 7
MOVES_SHOWN = 10
MAX_JSON = 256 * 1024
"""Characters of a condition posted as JSON."""
TRUE = ("on", "true", "1")


def segment_json(segment: Any) -> dict[str, Any]:
    return {"id": segment.id, "name": segment.name, "slug": segment.slug, "condition": segment.condition,
            "trackMembership": segment.track_membership, "createdAt": segment.created_at,
            "updatedAt": segment.updated_at}


async def list_segments(ctx: Ctx) -> Answer:
    cursor = ctx.request.query.get("cursor", "")
    if cursor and not is_valid_cursor(cursor):
        raise ValidationFailed([FieldError("cursor", "Not a cursor of this list", "invalid_cursor")])
    page = await ctx.request.app[DB].read(segment_store.list_segments, ctx.project_id, PAGE_SIZE, cursor or None)
    return Answer("segments.html", {"segments": [segment_json(s) for s in page.items],
                                    "nextCursor": page.next_cursor})


def _rows(nodes: list[FormNode]) -> list[dict[str, Any]]:
    return [{"depth": node.depth, "kind": node.kind, **node.values} for node in nodes]


async def _builder(ctx: Ctx, segment: Any, nodes: list[FormNode], *, name: str, track: bool,
                   condition_text: str | None = None, errors: list[FieldError] | None = None, problem: str = "",
                   status: int = 200) -> Answer:
    if condition_text is None:
        try:
            condition_text = json.dumps(segment_form.nodes_to_tree(nodes), indent=2, ensure_ascii=False)
        except ValidationFailed:
            condition_text = ""

    samples = _SAMPLES.get(ctx.project_id)

    def read(session) -> tuple[tuple[list[str], list[str]], Any]:
        offered = samples or (contact_store.data_keys(session, ctx.project_id, KEY_SAMPLE),
                              event_store.recent_event_names(session, ctx.project_id, NAME_SAMPLE))
        return offered, _moves(session, ctx.project_id, segment) if segment else None

    (keys, names), moves = await ctx.request.app[DB].read(read)
    _SAMPLES.put(ctx.project_id, (keys, names))
    found = {"moves": moves, "names": names}
    return Answer("segment_edit.html", {
        "segment": segment_json(segment) if segment else None, "name": name, "trackMembership": track,
        "rows": _rows(nodes), "conditionJson": condition_text, "dataKeys": keys, "eventNames": found["names"],
        "moves": found["moves"], "errors": [e.as_dict() for e in errors or []], "problem": problem},
        status=status, extra={"form": segment_form})


def _moves(session, project_id: str, segment: Any) -> dict[str, Any]:
    """Entries and exits of the last MOVES_DAYS days: counts and the newest, from the name indexes."""
    now = utcnow()
    edges = [now - timedelta(days=MOVES_DAYS), now + timedelta(seconds=1)]
    moves: dict[str, Any] = {"days": MOVES_DAYS}
    for kind in ("entry", "exit"):
        name = f"segment.{segment.slug}.{kind}"
        page = event_store.list_events(session, project_id, MOVES_SHOWN, None, name, count=False)
        emails = contact_store.addresses_by_id(session, project_id,
                                               sorted({e.contact_id for e in page.items if e.contact_id}))
        moves[kind] = {"name": name, "count": event_store.event_buckets(session, project_id, name, edges)[0],
                       "latest": [{"contactId": e.contact_id, "email": emails.get(e.contact_id, ("", False))[0],
                                   "at": e.created_at} for e in page.items if e.contact_id]}
    return moves


async def new_segment(ctx: Ctx) -> Answer:
    return await _builder(ctx, None, [FormNode(0, "all")], name="", track=False)


async def _segment(ctx: Ctx) -> Any:
    return await ctx.request.app[DB].read(rules.require_segment, ctx.project_id,
                                          ctx.request.match_info["segment"][:64])


async def show_segment(ctx: Ctx) -> Answer:
    segment = await _segment(ctx)
    return await _builder(ctx, segment, segment_form.tree_to_nodes(segment.condition), name=segment.name,
                          track=segment.track_membership)


def posted_condition(fields: dict[str, str]) -> dict[str, Any]:
    """The tree a save posts: the builder's rows, or (a script, or no rows) the `condition` JSON."""
    if "nodes" in fields:
        tree = segment_form.fields_to_tree(fields)
    else:
        tree = _json_condition(fields.get("condition", ""))
    rules.validate_condition(tree)
    return tree


def _json_condition(text: str) -> Any:
    if len(text) > MAX_JSON:
        raise ValidationFailed([FieldError("condition", f"At most {MAX_JSON} characters", "too_big")])
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValidationFailed([FieldError("condition", f"Not JSON: {exc}", "invalid_json")]) from None
    except RecursionError:
        raise ValidationFailed([FieldError("condition", f"Nested deeper than {rules.MAX_DEPTH} levels",
                                           "too_deep")]) from None


async def _save(ctx: Ctx, segment: Any) -> Answer:
    """Create (segment None) or update; or, for a builder button (`action`), show the form changed."""
    fields = await form_of(ctx.request)
    name = fields.get("name", "").strip()
    track = fields.get("trackMembership", "") in TRUE
    action = fields.get("action", "")
    try:
        nodes = segment_form.fields_to_nodes(fields)
    except ValidationFailed as exc:
        return await _builder(ctx, segment, [FormNode(0, "all")], name=name, track=track, errors=exc.errors,
                              problem=exc.message, status=422)
    try:
        if action == "json":
            tree = _json_condition(fields.get("condition", ""))
            rules.validate_condition(tree)
            return await _builder(ctx, segment, segment_form.tree_to_nodes(tree), name=name, track=track)
        if action:
            return await _builder(ctx, segment, segment_form.edit(nodes, action), name=name, track=track)
        tree = posted_condition(fields)
        if not 1 <= len(name) <= rules.MAX_NAME:
            raise ValidationFailed([FieldError("name", f"1 to {rules.MAX_NAME} characters", "invalid_string")])
        if segment is None:
            saved = await ctx.request.app[DB].write(lambda s: rules.create_segment(s, ctx.project_id, name, tree,
                                                                                  track))
        else:
            saved = await ctx.request.app[DB].write(lambda s: rules.update_segment(s, ctx.project_id, segment.id,
                                                                                  name, tree, track))
    except ValidationFailed as exc:
        return await _builder(ctx, segment, nodes, name=name, track=track, errors=exc.errors,
                              condition_text=fields.get("condition") if action == "json" else None,
                              problem=exc.message, status=422)
    return Answer(redirect=f"/projects/{ctx.project_id}/segments/{saved.id}",
                  flash="Segment created" if segment is None else "Segment saved", data=segment_json(saved),
                  status=201 if segment is None else 200)


async def create_segment(ctx: Ctx) -> Answer:
    return await _save(ctx, None)


async def save_segment(ctx: Ctx) -> Answer:
    return await _save(ctx, await _segment(ctx))


async def delete_segment(ctx: Ctx) -> Answer:
    segment_id = ctx.request.match_info["segment"][:64]
    deleted = await ctx.request.app[DB].write(lambda s: rules.delete_segment(s, ctx.project_id, segment_id))
    return Answer(redirect=f"/projects/{ctx.project_id}/segments", flash=f"Segment {deleted.name} deleted",
                  data={"deleted": deleted.id})


async def preview_segment(ctx: Ctx) -> Answer:
    """How many contacts the posted condition matches (the API's count query) and the newest of them."""
    request = ctx.request
    fields = await form_of(request)
    live = live_fragment(request)
    template = "segment_preview.html" if live else "segment_preview_page.html"
    try:
        tree = posted_condition(fields)
    except ValidationFailed as exc:
        return Answer(template, {"problem": exc.message, "errors": [e.as_dict() for e in exc.errors]},
                      status=200 if live else 422)

    def read(session) -> tuple[int, list[Any]]:
        now = utcnow()
        count = segment_store.count_matching(session, ctx.project_id, tree, now)
        page = segment_store.list_matching(session, ctx.project_id, tree, now, FIRST_MEMBERS, None, count=False)
        return count, page.items

    count, members = await request.app[DB].read(read)
    return Answer(template, {"problem": "", "errors": [], "count": count, "condition": tree,
                             "members": [{"id": c.id, "email": c.email, "subscribed": c.subscribed}
                                         for c in members]})


ROUTES = [
    Page("GET", "/projects/{project}/segments", list_segments),
    Page("POST", "/projects/{project}/segments", create_segment, role=Role.EDITOR),
    Page("GET", "/projects/{project}/segments/new", new_segment, role=Role.EDITOR),
    Page("POST", "/projects/{project}/segments/preview", preview_segment),
    Page("GET", "/projects/{project}/segments/{segment}", show_segment),
    Page("POST", "/projects/{project}/segments/{segment}", save_segment, role=Role.EDITOR),
    Page("POST", "/projects/{project}/segments/{segment}/delete", delete_segment, role=Role.EDITOR),
]
