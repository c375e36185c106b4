"""Segments: a named filter over a project's contacts, written as a condition tree.

The grammar (checked by `validate_condition`; compiled to SQL by `storage.segments.condition_clause`):

    group  {"all": [cond, ...]}   every child matches (an empty list matches every contact)
           {"any": [cond, ...]}   some child matches (an empty list matches none)
           {"not": cond}
    field  {"field": F, "op": OP, "value": V}
           email                  equals, notEquals, contains, notContains     V text (compared lower-cased)
           subscribed             equals, notEquals                            V true / false
           createdAt, updatedAt   before, after                                V ISO 8601 date or date-time
           data.<key>             equals, notEquals                            V text, number or true/false
                                  contains, notContains                        V text
                                  exists, notExists                            no value
                                  greaterThan, lessThan                        V number
                                  before, after                                V ISO 8601 date or date-time
    event  {"event": NAME, "op": "did", "atLeast": N (1-1000000, default 1), "withinDays": D (optional)}
           {"event": NAME, "op": "didNot", "withinDays": D (optional)}
           D: 1-36500 days back from now, or null (any time)

Membership tracking: a segment with `track_membership` keeps its members in `segment_members`; whenever a
contact's data or subscription changes or it tracks an event (`pipeline.events.refresh_segment_membership`),
the segments are evaluated for that one contact and an entry or exit records `segment.<slug>.entry` / `.exit`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.cache import TtlCache
from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from storage import segments as store
from storage.models import utcnow
from storage.segments import SegmentRecord, TrackedSegment, parse_instant

MAX_DEPTH = 10
"""Nodes on the path from the root to a leaf, the root included."""
MAX_NODES = 200
MAX_TEXT = 1000
MAX_EVENT_NAME = 200
MAX_DATA_KEY = 200
MAX_AT_LEAST = 1_000_000
MAX_WITHIN_DAYS = 36_500
MAX_NUMBER = 1e300
MAX_NAME = 200
MAX_SLUG = 100

GROUPS = ("all", "any", "not")
TEXT_OPS = ("equals", "notEquals", "contains", "notContains")
MATCH_OPS = ("equals", "notEquals")
PRESENCE_OPS = ("exists", "notExists")
NUMBER_OPS = ("greaterThan", "lessThan")
DATE_OPS = ("before", "after")
FIELD_OPS = (*TEXT_OPS, *PRESENCE_OPS, *NUMBER_OPS, *DATE_OPS)
EVENT_OPS = ("did", "didNot")
OPERATORS = (*FIELD_OPS, *EVENT_OPS)
TIMESTAMP_FIELDS = ("createdAt", "updatedAt")
FIELDS = ("email", "subscribed", *TIMESTAMP_FIELDS)
"""Plus `data.<key>`."""

# What each operator takes as its value, per kind of field. None: no value.
_OPERANDS: dict[str, dict[str, str | None]] = {
    "email": {op: "text" for op in TEXT_OPS},
    "subscribed": {op: "boolean" for op in MATCH_OPS},
    "timestamp": {op: "date" for op in DATE_OPS},
    "data": {"equals": "scalar", "notEquals": "scalar", "contains": "text", "notContains": "text",
             "exists": None, "notExists": None, "greaterThan": "number", "lessThan": "number",
             "before": "date", "after": "date"},
}
_VALUE_WORDS = {"text": "a string", "boolean": "true or false", "date": "an ISO 8601 date or date-time string",
                "number": "a number", "scalar": "a string, a number, true or false"}
SHAPES = ("A condition is a group ({\"all\": [...]}, {\"any\": [...]}, {\"not\": {...}}), a field test "
          "({\"field\", \"op\", \"value\"}) or an event test ({\"event\", \"op\", \"atLeast\"?, \"withinDays\"?})")


# ---------------------------------------------------------------------------------------------------
# Validation.

def field_kind(field: str) -> str | None:
    if field == "email" or field == "subscribed":
        return field
    if field in TIMESTAMP_FIELDS:
        return "timestamp"
    if field.startswith("data.") and len(field) > len("data."):
        return "data"
    return None


class _Checker:
    def __init__(self) -> None:
        self.errors: list[FieldError] = []
        self.nodes = 0

    def fail(self, path: str, message: str, code: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(FieldError(path, message, code))

    def node(self, node: Any, path: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes == MAX_NODES + 1:
            self.fail(path, f"A condition may hold at most {MAX_NODES} nodes", "too_many_nodes")
        if self.nodes > MAX_NODES:
            return
        if depth > MAX_DEPTH:
            self.fail(path, f"Conditions may be nested at most {MAX_DEPTH} levels deep", "too_deep")
            return
        if not isinstance(node, dict):
            self.fail(path, "Expected a condition object", "invalid_type")
            return
        kinds = [key for key in (*GROUPS, "field", "event") if key in node]
        if not kinds:
            self.fail(path, SHAPES, "invalid_condition")
            return
        kind = kinds[0]
        if kind in ("all", "any"):
            self.keys(node, path, {kind})
            children = node[kind]
            if not isinstance(children, list):
                self.fail(f"{path}.{kind}", "Expected a list of conditions", "invalid_type")
                return
            for i, child in enumerate(children):
                self.node(child, f"{path}.{kind}.{i}", depth + 1)
        elif kind == "not":
            self.keys(node, path, {"not"})
            self.node(node["not"], f"{path}.not", depth + 1)
        elif kind == "field":
            self.field(node, path)
        else:
            self.event(node, path)

    def keys(self, node: dict[str, Any], path: str, allowed: set[str]) -> None:
        for key in node:
            if key not in allowed:
                self.fail(f"{path}.{key}", f"Unknown key '{key}' here; expected only {', '.join(sorted(allowed))}",
                          "unknown_key")

    def operator(self, node: dict[str, Any], path: str, allowed: tuple[str, ...], subject: str) -> str | None:
        """The node's op if it is one of `allowed`, else None (after recording why)."""
        if "op" not in node:
            self.fail(f"{path}.op", "Required", "required")
            return None
        op = node["op"]
        if not isinstance(op, str):
            self.fail(f"{path}.op", "Expected a string", "invalid_type")
        elif op not in OPERATORS:
            self.fail(f"{path}.op", f"Unknown operator '{op}'; operators are {', '.join(OPERATORS)}",
                      "unknown_operator")
        elif op not in allowed:
            self.fail(f"{path}.op", f"Operator '{op}' does not apply to {subject}; use one of {', '.join(allowed)}",
                      "invalid_operator")
        else:
            return op
        return None

    def field(self, node: dict[str, Any], path: str) -> None:
        field = node["field"]
        kind = None
        if not isinstance(field, str):
            self.fail(f"{path}.field", "Expected a string", "invalid_type")
        elif (kind := field_kind(field)) is None:
            self.fail(f"{path}.field", f"Unknown field '{field}'; fields are {', '.join(FIELDS)} and data.<key>",
                      "unknown_field")
        elif kind == "data" and len(field) - len("data.") > MAX_DATA_KEY:
            self.fail(f"{path}.field", f"Data keys are at most {MAX_DATA_KEY} characters", "too_big")
            kind = None
        allowed_keys = {"field", "op", "value"}
        if kind is None:
            self.operator(node, path, FIELD_OPS, "a field")
            self.keys(node, path, allowed_keys)
            return
        operands = _OPERANDS[kind]
        op = self.operator(node, path, tuple(operands), f"field '{field}'")
        if op is None:
            self.keys(node, path, allowed_keys)
            return
        operand = operands[op]
        if operand is None:
            allowed_keys.discard("value")
        self.keys(node, path, allowed_keys)
        if operand is not None:
            if "value" not in node:
                self.fail(f"{path}.value", "Required", "required")
            else:
                self.value(node["value"], f"{path}.value", operand)

    def value(self, value: Any, path: str, operand: str) -> None:
        expected = _VALUE_WORDS[operand]
        if operand == "boolean" or (operand == "scalar" and isinstance(value, bool)):
            if not isinstance(value, bool):
                self.fail(path, f"Expected {expected}", "invalid_type")
        elif operand == "number" or (operand == "scalar" and isinstance(value, int | float)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                self.fail(path, f"Expected {expected}", "invalid_type")
            elif not _finite_within(value, MAX_NUMBER):
                self.fail(path, f"Numbers must be finite and at most {MAX_NUMBER:g} in size", "too_big")
        elif not isinstance(value, str):
            self.fail(path, f"Expected {expected}", "invalid_type")
        elif operand == "date":
            try:
                parse_instant(value)
            except ValueError:
                self.fail(path, "Expected an ISO 8601 date (2024-03-01) or date-time with offset "
                                "(2024-03-01T10:00:00Z)", "invalid_date")
        else:
            self.text(value, path, MAX_TEXT)

    def text(self, value: str, path: str, limit: int) -> None:
        if len(value) > limit:
            self.fail(path, f"At most {limit} characters", "too_big")
        elif "\x00" in value:
            self.fail(path, "Text may not contain NUL", "invalid_string")

    def event(self, node: dict[str, Any], path: str) -> None:
        name = node["event"]
        if not isinstance(name, str):
            self.fail(f"{path}.event", "Expected an event name", "invalid_type")
        elif not name.strip():
            self.fail(f"{path}.event", "Event names are not blank", "too_small")
        else:
            self.text(name, f"{path}.event", MAX_EVENT_NAME)
        op = self.operator(node, path, EVENT_OPS, "an event")
        allowed_keys = {"event", "op", "withinDays"} | ({"atLeast"} if op != "didNot" else set())
        self.keys(node, path, allowed_keys)
        if "atLeast" in allowed_keys and "atLeast" in node:
            self.count(node["atLeast"], f"{path}.atLeast", MAX_AT_LEAST)
        if node.get("withinDays") is not None:
            self.count(node["withinDays"], f"{path}.withinDays", MAX_WITHIN_DAYS)

    def count(self, value: Any, path: str, limit: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(value, float) and not value.is_integer()):
            self.fail(path, "Expected a whole number", "invalid_type")
        elif value < 1:
            self.fail(path, "At least 1", "too_small")
        elif value > limit:
            self.fail(path, f"At most {limit}", "too_big")


def _finite_within(value: int | float, limit: float) -> bool:
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and abs(number) <= limit


def validate_condition(tree: Any, path: str = "condition") -> None:
    """Raise ValidationFailed naming each problem by its path in the tree (`condition.all.1.op`), with
    codes: invalid_type, invalid_condition (none of the shapes), unknown_key, required, unknown_field,
    unknown_operator, invalid_operator (known, but not for this field or for events), invalid_date,
    invalid_string, too_small, too_big, too_deep (more than MAX_DEPTH levels), too_many_nodes."""
    checker = _Checker()
    checker.node(tree, path, 1)
    if checker.errors:
        raise ValidationFailed(checker.errors, "Invalid segment condition",
                               "Fix the condition at each path listed in errors.")


def event_names(tree: Any) -> set[str]:
    """The event names a (validated) condition tests."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("event"), str):
            names.add(node["event"].strip())
        for key in ("all", "any"):
            if isinstance(node.get(key), list):
                stack.extend(node[key])
        if "not" in node:
            stack.append(node["not"])
    return names


# ---------------------------------------------------------------------------------------------------
# Segments.

def slugify(name: str) -> str:
    """Lower-case letters and digits of the name (accents dropped) joined by '-', at most MAX_SLUG
    characters; 'segment' when the name has none. Never holds a dot (it names `segment.<slug>.entry`)."""
    text = "".join(_ascii_fold(c) for c in name.lower())
    slug = re.sub(r"[\W_]+", "-", text).strip("-")[:MAX_SLUG].strip("-")
    return slug or "segment"


def _ascii_fold(char: str) -> str:
    """'é' → 'e', 'ﬁ' → 'fi'; a character with no ASCII base stays as it is ('ザ' keeps its mark)."""
    base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    return base if base.isascii() else char


def _slug_conflict(slug: str) -> Conflict:
    return Conflict(f"A segment with the slug '{slug}' already exists in this project",
                    "Segment slugs come from their names; pick a different name.")


def require_segment(session: Session, project_id: str, segment_id: str) -> SegmentRecord:
    segment = store.get_segment(session, project_id, segment_id)
    if segment is None:
        raise NotFound(f"Segment {segment_id} not found", "Check the segment id; it must belong to this project.")
    return segment


def create_segment(session: Session, project_id: str, name: str, condition: dict[str, Any],
                   track_membership: bool = False) -> SegmentRecord:
    """409 when the slug of `name` is taken. With tracking on, the current members are recorded at once
    (one INSERT ... SELECT), without entry events: only later changes are entries and exits."""
    validate_condition(condition)
    slug = slugify(name)
    if store.slug_taken(session, project_id, slug):
        raise _slug_conflict(slug)
    try:
        with session.begin_nested():
            segment = store.insert_segment(session, project_id, name, slug, condition, track_membership)
    except IntegrityError:
        raise _slug_conflict(slug) from None
    if track_membership:
        store.snapshot_members(session, segment.id, project_id, condition, utcnow())
    _written(session, project_id)
    return segment


def update_segment(session: Session, project_id: str, segment_id: str, name: str | None = None,
                   condition: dict[str, Any] | None = None, track_membership: bool | None = None) -> SegmentRecord:
    """Change what is given. A new name brings a new slug (409 when taken). Turning tracking on, or
    changing the condition of a tracked segment, re-snapshots its members without events; turning it
    off forgets them."""
    segment = require_segment(session, project_id, segment_id)
    values: dict[str, Any] = {}
    if name is not None and name != segment.name:
        values["name"] = name
        slug = slugify(name)
        if slug != segment.slug:
            if store.slug_taken(session, project_id, slug, other_than=segment.id):
                raise _slug_conflict(slug)
            values["slug"] = slug
    if condition is not None:
        validate_condition(condition)
        if condition != segment.condition:
            values["condition"] = condition
    if track_membership is not None and track_membership != segment.track_membership:
        values["track_membership"] = track_membership
    if not values:
        return segment
    try:
        with session.begin_nested():
            store.update_segment(session, segment.id, **values)
    except IntegrityError:
        raise _slug_conflict(values.get("slug", segment.slug)) from None
    tracking = values.get("track_membership", segment.track_membership)
    if tracking and ("condition" in values or "track_membership" in values):
        store.snapshot_members(session, segment.id, project_id, values.get("condition", segment.condition),
                               utcnow())
    elif not tracking and segment.track_membership:
        store.clear_members(session, segment.id)
    _written(session, project_id)
    return require_segment(session, project_id, segment_id)


def delete_segment(session: Session, project_id: str, segment_id: str) -> SegmentRecord:
    """409 while a campaign that is not finished uses the segment as its audience; a sent or cancelled
    campaign keeps a snapshot of it instead (`segmentSnapshot`)."""
    segment = require_segment(session, project_id, segment_id)
    conflict = Conflict(f"Segment {segment_id} is the audience of a campaign that is not finished",
                        "Delete the campaign or give it another audience first.")
    if store.segment_in_use(session, segment.id):
        raise conflict
    try:
        with session.begin_nested():
            store.keep_snapshots(session, segment)
            store.delete_segment(session, segment.id)
    except IntegrityError:
        raise conflict from None
    _written(session, project_id)
    return segment


def check_event_deletable(session: Session, project_id: str, name: str) -> None:
    """SPEC §3: events whose name a segment's condition tests are not deleted (409 naming the segments)."""
    users = sorted(seg_name for seg_name, condition in store.segment_conditions(session, project_id)
                   if name in event_names(condition))
    if users:
        shown = ", ".join(f"'{n}'" for n in users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise Conflict(f"Events named '{name}' are used by segment {shown}",
                       "Remove the event from those segments' conditions (or delete the segments) first.")


# ---------------------------------------------------------------------------------------------------
# Membership tracking.

TRACKED_TTL = 5.0
"""Seconds a process keeps a project's tracked segments. A segment written in this process is forgotten
at once (and again at its commit); one written by another process is seen within TRACKED_TTL."""


class _TrackedCache(TtlCache[str, tuple[TrackedSegment, ...]]):
    def discard(self, project_id: str) -> None:
        self._entries.pop(project_id, None)


_TRACKED = _TrackedCache(TRACKED_TTL)
_WRITTEN = "plunkd.segments_written"


def _written(session: Session, project_id: str) -> None:
    """A segment of the project changed in this transaction: forget its tracked segments now, and once
    more when the transaction ends (a concurrent reader may have cached the old ones meanwhile)."""
    _TRACKED.discard(project_id)
    session.info.setdefault(_WRITTEN, set()).add(project_id)


@event.listens_for(Session, "after_commit")
def _forget_after_commit(session: Session) -> None:
    for project_id in session.info.pop(_WRITTEN, ()):
        _TRACKED.discard(project_id)


@event.listens_for(Session, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous: Any) -> None:
    if not previous.nested:
        for project_id in session.info.pop(_WRITTEN, ()):
            _TRACKED.discard(project_id)


def tracked_segments(session: Session, project_id: str) -> tuple[TrackedSegment, ...]:
    """The project's segments with tracking on, from the cache when fresh. A transaction that wrote a
    segment reads them from the database and caches nothing (it may yet roll back)."""
    cached = _TRACKED.get(project_id)
    if cached is not None:
        return cached
    found = store.tracked_segments(session, project_id)
    if _WRITTEN not in session.info:
        _TRACKED.put(project_id, found)
    return found


@dataclass(frozen=True)
class MembershipMove:
    """A contact entering or leaving a tracked segment."""

    segment_id: str
    event_name: str
    """`segment.<slug>.entry` or `segment.<slug>.exit`."""


def membership_moves(session: Session, project_id: str, contact_id: str) -> list[MembershipMove]:
    """Re-evaluate the project's tracked segments for this one contact (one statement for all of them),
    write each change of membership and return it (`pipeline.events.refresh_segment_membership` records the
    events). Nothing but a cache lookup when the project tracks no segment."""
    segments = tracked_segments(session, project_id)
    if not segments:
        return []
    now = utcnow()
    moves = []
    states = store.membership_states(session, contact_id, segments, now)
    for segment, (matches, member) in zip(segments, states, strict=False):
        if matches and not member:
            if store.add_member(session, segment.id, contact_id, now):
                moves.append(MembershipMove(segment.id, f"segment.{segment.slug}.entry"))
        elif member and not matches:
            if store.remove_member(session, segment.id, contact_id):
                moves.append(MembershipMove(segment.id, f"segment.{segment.slug}.exit"))
    return moves
