"""Segments: a named filter over a project's contacts, written as a condition tree.

The grammar (the models below, checked by `validate_condition`; compiled to SQL by `storage.segments.condition_clause`):

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
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

from pydantic import (
    BeforeValidator,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import CoreSchema, PydanticCustomError
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from typing_extensions import TypeAliasType

from pipeline.cache import TtlCache
from pipeline.errors import Conflict, NotFound, ValidationFailed
from pipeline.grammar import (
    LIMITS,
    NO_NUL,
    Atom,
    Boolean,
    Node,
    TaggedUnion,
    event_name,
    field_errors,
    problem,
    text_problem,
    whole_number,
)
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
MatchOp: TypeAlias = Literal["equals", "notEquals"]
ContainsOp: TypeAlias = Literal["contains", "notContains"]
TextOp: TypeAlias = Literal[MatchOp, ContainsOp]
PresenceOp: TypeAlias = Literal["exists", "notExists"]
NumberOp: TypeAlias = Literal["greaterThan", "lessThan"]
DateOp: TypeAlias = Literal["before", "after"]
TimestampField: TypeAlias = Literal["createdAt", "updatedAt"]
TEXT_OPS: tuple[str, ...] = get_args(TextOp)
MATCH_OPS: tuple[str, ...] = get_args(MatchOp)
CONTAINS_OPS: tuple[str, ...] = get_args(ContainsOp)
PRESENCE_OPS: tuple[str, ...] = get_args(PresenceOp)
NUMBER_OPS: tuple[str, ...] = get_args(NumberOp)
DATE_OPS: tuple[str, ...] = get_args(DateOp)
FIELD_OPS = (*TEXT_OPS, *PRESENCE_OPS, *NUMBER_OPS, *DATE_OPS)
EVENT_OPS = ("did", "didNot")
OPERATORS = (*FIELD_OPS, *EVENT_OPS)
TIMESTAMP_FIELDS: tuple[str, ...] = get_args(TimestampField)
FIELDS = ("email", "subscribed", *TIMESTAMP_FIELDS)
"""Plus `data.<key>`."""

# What each operator takes as its value, per kind of field. None: no value. The same Literals type the
# `op` of each test's model below.
_DATA_OPERANDS: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (MATCH_OPS, "scalar"), (CONTAINS_OPS, "text"), (PRESENCE_OPS, None), (NUMBER_OPS, "number"), (DATE_OPS, "date"))
_OPERANDS: dict[str, dict[str, str | None]] = {
    "email": {op: "text" for op in TEXT_OPS},
    "subscribed": {op: "boolean" for op in MATCH_OPS},
    "timestamp": {op: "date" for op in DATE_OPS},
    "data": {op: operand for ops, operand in _DATA_OPERANDS for op in ops},
}
_VALUE_WORDS = {"text": "a string", "boolean": "true or false", "date": "an ISO 8601 date or date-time string",
                "number": "a number", "scalar": "a string, a number, true or false"}
SHAPES = ("A condition is a group ({\"all\": [...]}, {\"any\": [...]}, {\"not\": {...}}), a field test "
          "({\"field\", \"op\", \"value\"}) or an event test ({\"event\", \"op\", \"atLeast\"?, \"withinDays\"?})")
MAX_ERRORS = 20


# ---------------------------------------------------------------------------------------------------
# The grammar: one pydantic model per shape of node (also /openapi.json's SegmentCondition).

def field_kind(field: str) -> str | None:
    if field == "email" or field == "subscribed":
        return field
    if field in TIMESTAMP_FIELDS:
        return "timestamp"
    if field.startswith("data.") and len(field) > len("data."):
        return "data"
    return None


def _finite_within(value: int | float, limit: float) -> bool:
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and abs(number) <= limit


def _expected(operand: str) -> PydanticCustomError:
    return problem("invalid_type", f"Expected {_VALUE_WORDS[operand]}")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("text")
    if (found := text_problem(value, MAX_TEXT)) is not None:
        raise found
    return value


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expected("number")
    if not _finite_within(value, MAX_NUMBER):
        raise problem("too_big", f"Numbers must be finite and at most {MAX_NUMBER:g} in size")
    return value


def _date(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("date")
    try:
        parse_instant(value)
    except ValueError:
        raise problem("invalid_date", "Expected an ISO 8601 date (2024-03-01) or date-time with offset "
                                      "(2024-03-01T10:00:00Z)") from None
    return value


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        return _text(value)
    raise _expected("scalar")


def _data_field(value: Any) -> str:
    if not isinstance(value, str):
        raise problem("invalid_type", "Expected a string")
    if field_kind(value) is None:
        raise problem("unknown_field", f"Unknown field '{value}'; fields are {', '.join(FIELDS)} and data.<key>")
    if field_kind(value) == "data" and len(value) - len("data.") > MAX_DATA_KEY:
        raise problem("too_big", f"Data keys are at most {MAX_DATA_KEY} characters")
    if "\x00" in value:
        raise problem("invalid_string", "Text may not contain NUL")
    return value


def _operator_problem(op: Any, allowed: tuple[str, ...], subject: str) -> PydanticCustomError | None:
    if not isinstance(op, str):
        return problem("invalid_type", "Expected a string")
    if op not in OPERATORS:
        return problem("unknown_operator", f"Unknown operator '{op}'; operators are {', '.join(OPERATORS)}")
    if op not in allowed:
        return problem("invalid_operator", f"Operator '{op}' does not apply to {subject}; use one of "
                                           f"{', '.join(allowed)}")
    return None


def _field_operator(op: Any, info: ValidationInfo) -> str:
    """The op of a field test whose field is unknown (checked against every field operator) or whose op
    does not apply to its (valid) field."""
    field = info.data.get("field")
    kind = field_kind(field) if isinstance(field, str) else None
    allowed, subject = (tuple(_OPERANDS[kind]), f"field '{field}'") if kind else (FIELD_OPS, "a field")
    if (found := _operator_problem(op, allowed, subject)) is not None:
        raise found
    return op


def _event_operator(op: Any) -> str:
    if (found := _operator_problem(op, EVENT_OPS, "an event")) is not None:
        raise found
    return op


def _conditions(value: Any) -> Any:
    if not isinstance(value, list):
        raise problem("invalid_type", "Expected a list of conditions")
    return value


_TEXT_SCHEMA = {"type": "string", "maxLength": MAX_TEXT, "pattern": NO_NUL}
_NUMBER_SCHEMA = {"type": "number", "minimum": -MAX_NUMBER, "maximum": MAX_NUMBER}
Text: TypeAlias = Annotated[str, Atom(_text, _TEXT_SCHEMA)]
Number: TypeAlias = Annotated[int | float, Atom(_number, _NUMBER_SCHEMA)]
DateValue: TypeAlias = Annotated[str, Atom(_date, {
    "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}],
    "description": "ISO 8601: a date (midnight UTC) or a date-time with its offset"})]
Scalar: TypeAlias = Annotated[str | int | float | bool, Atom(_scalar, {
    "anyOf": [_TEXT_SCHEMA, _NUMBER_SCHEMA, {"type": "boolean"}]})]
DataField: TypeAlias = Annotated[str, Atom(_data_field, {
    "type": "string", "pattern": f"^data\\.[^\\u0000]{{1,{MAX_DATA_KEY}}}$",
    "description": "data.<key>: a top-level key of the contact's data"})]
EventName: TypeAlias = Annotated[str, event_name(MAX_EVENT_NAME)]
AtLeast: TypeAlias = Annotated[int, whole_number(MAX_AT_LEAST, schema={"default": 1})]
WithinDays: TypeAlias = Annotated[int, whole_number(MAX_WITHIN_DAYS)]
Conditions: TypeAlias = Annotated[list["SegmentCondition"], BeforeValidator(_conditions)]


class SegmentAll(Node):
    """Every condition matches (an empty list matches every contact)."""

    TAG: ClassVar[str] = "<all>"
    all: Conditions


class SegmentAny(Node):
    """Some condition matches (an empty list matches none)."""

    TAG: ClassVar[str] = "<any>"
    any: Conditions


class SegmentNot(Node):
    TAG: ClassVar[str] = "<not>"
    not_: SegmentCondition = Field(alias="not")


class SegmentEmailTest(Node):
    """The contact's (lower-case) email; the value is compared lower-cased."""

    TAG: ClassVar[str] = "<email.text>"
    field: Literal["email"]
    op: TextOp
    value: Text


class SegmentSubscribedTest(Node):
    TAG: ClassVar[str] = "<subscribed.boolean>"
    field: Literal["subscribed"]
    op: MatchOp
    value: Boolean


class SegmentTimestampTest(Node):
    TAG: ClassVar[str] = "<timestamp.date>"
    field: TimestampField
    op: DateOp
    value: DateValue


class _DataTest(Node):
    field: DataField


class SegmentDataTextTest(_DataTest):
    """A string in the contact's data: exact, case-sensitive comparison."""

    TAG: ClassVar[str] = "<data.text>"
    op: ContainsOp
    value: Text


class SegmentDataMatchTest(_DataTest):
    """The value as stored: a string (case-sensitive), a number or true/false."""

    TAG: ClassVar[str] = "<data.scalar>"
    op: MatchOp
    value: Scalar


class SegmentDataPresenceTest(_DataTest):
    """The key holds a value other than null."""

    TAG: ClassVar[str] = "<data.None>"
    op: PresenceOp


class SegmentDataNumberTest(_DataTest):
    TAG: ClassVar[str] = "<data.number>"
    op: NumberOp
    value: Number


class SegmentDataDateTest(_DataTest):
    """A date stored as text in the data, compared as text with the value in UTC
    (`YYYY-MM-DDTHH:MM:SS.mmmZ`, JavaScript's toISOString)."""

    TAG: ClassVar[str] = "<data.date>"
    op: DateOp
    value: DateValue


class SegmentEventDid(Node):
    """The contact has at least `atLeast` events of this name (in the last `withinDays` days)."""

    TAG: ClassVar[str] = "<event.did>"
    event: EventName
    op: Literal["did"]
    atLeast: AtLeast = 1
    withinDays: WithinDays | None = None


class SegmentEventDidNot(Node):
    """The contact has no event of this name (in the last `withinDays` days)."""

    TAG: ClassVar[str] = "<event.didNot>"
    event: EventName
    op: Literal["didNot"]
    withinDays: WithinDays | None = None


class _FieldTestProblem(_DataTest):
    """A field test whose field is unknown, or whose op does not apply to its field: says which."""

    TAG: ClassVar[str] = "<field?>"
    op: Annotated[str, Atom(_field_operator, {})]
    value: Any = None


class _EventTestProblem(Node):
    """An event test whose op is neither did nor didNot: says why."""

    TAG: ClassVar[str] = "<event?>"
    event: EventName
    op: Annotated[str, Atom(_event_operator, {})]
    atLeast: AtLeast = 1
    withinDays: WithinDays | None = None


ConditionNode: TypeAlias = (
    SegmentAll | SegmentAny | SegmentNot | SegmentEmailTest | SegmentSubscribedTest | SegmentTimestampTest
    | SegmentDataTextTest | SegmentDataMatchTest | SegmentDataPresenceTest | SegmentDataNumberTest | SegmentDataDateTest
    | SegmentEventDid | SegmentEventDidNot | _FieldTestProblem | _EventTestProblem)
"""Every shape of node; the last two only report why a node fits none of the others."""
CONDITION_TAGS: dict[str, type[Node]] = {node.TAG: node for node in get_args(ConditionNode)}


def condition_tag(node: Any) -> str | None:
    """Which model a node is, from its keys (the first of all, any, not, field, event it has), and for a
    test from its field and op; None when it is none of the shapes."""
    if isinstance(node, Node):
        return node.TAG
    if not isinstance(node, dict):
        return None
    kind = next((key for key in (*GROUPS, "field", "event") if key in node), None)
    if kind is None:
        return None
    if kind in GROUPS:
        return f"<{kind}>"
    op = node.get("op")
    if kind == "event":
        return f"<event.{op}>" if isinstance(op, str) and op in EVENT_OPS else "<event?>"
    field = node["field"]
    operands = _OPERANDS.get(field_kind(field) or "", {}) if isinstance(field, str) else {}
    if not isinstance(op, str) or op not in operands:
        return "<field?>"
    if field_kind(field) == "data" and len(field) - len("data.") > MAX_DATA_KEY:
        return "<field?>"
    return f"<{field_kind(field)}.{operands[op]}>"


SegmentCondition = TypeAliasType("SegmentCondition", Annotated[ConditionNode, TaggedUnion(
    condition_tag, "invalid_condition", SHAPES, unlisted=(_FieldTestProblem, _EventTestProblem))])
for _model in (SegmentAll, SegmentAny, SegmentNot, _FieldTestProblem, _EventTestProblem):
    _model.model_rebuild()


def limit_problems(tree: Any) -> list[tuple[str, str, str]]:
    """(path in the tree, message, code) for each node past MAX_DEPTH, and the first past MAX_NODES,
    visiting at most MAX_NODES + 1 nodes: a tree past its limits is not parsed further."""
    found: list[tuple[str, str, str]] = []
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(tree, "", 1)]
    while stack and len(found) < MAX_ERRORS:
        node, path, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            found.append((path, f"A condition may hold at most {MAX_NODES} nodes", "too_many_nodes"))
            break
        if depth > MAX_DEPTH:
            found.append((path, f"Conditions may be nested at most {MAX_DEPTH} levels deep", "too_deep"))
            continue
        kind = next((key for key in GROUPS if key in node), None) if isinstance(node, dict) else None
        if kind in ("all", "any") and isinstance(node[kind], list):
            children = node[kind][:MAX_NODES]
            stack.extend((child, f"{path}.{kind}.{i}".lstrip("."), depth + 1)
                         for i, child in reversed(list(enumerate(children))))
        elif kind == "not":
            stack.append((node["not"], f"{path}.not".lstrip("."), depth + 1))
    return found


def _within_limits(tree: Any) -> Any:
    if found := limit_problems(tree):
        raise PydanticCustomError(LIMITS, "The condition is past its size limits", {"errors": found})
    return tree


def _kept(tree: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    handler(tree)
    return tree


class _ConditionTree:
    """How pydantic takes a `Condition`: as a SegmentCondition within its limits, kept as it was."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return handler(Annotated[SegmentCondition, BeforeValidator(_within_limits), WrapValidator(_kept),
                                 PlainSerializer(lambda tree: tree)])


Condition: TypeAlias = Annotated[dict[str, Any], _ConditionTree]
"""A condition tree at most MAX_DEPTH deep and MAX_NODES big (which JSON schema cannot say), checked by
the models and kept as the plain object it was: what `storage.segments.condition_clause` compiles."""
_CONDITION: TypeAdapter[Any] = TypeAdapter(Condition)


class ConditionObject:
    """A request body's condition: taken as a plain object (`validate_condition` names each problem by
    its path in the tree) and described as SegmentCondition in /openapi.json."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        return handler(TypeAdapter(SegmentCondition).core_schema)


def validate_condition(tree: Any, path: str = "condition") -> None:
    """Raise ValidationFailed naming each problem by its path in the tree (`condition.all.1.op`), with
    codes: invalid_type, invalid_condition (none of the shapes), unknown_key, required, unknown_field,
    unknown_operator, invalid_operator (known, but not for this field or for events), invalid_date,
    invalid_string, too_small, too_big, too_deep (more than MAX_DEPTH levels), too_many_nodes."""
    try:
        _CONDITION.validate_python(tree)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc, path, CONDITION_TAGS, MAX_ERRORS), "Invalid segment condition",
                               "Fix the condition at each path listed in errors.") from None


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
