"""Workflow definitions: the grammar the automation engine executes, checked before anything is stored.

    {"steps": [step, ...]}          the first step is the entry; at most MAX_STEPS steps
    every step                      "id" (1-64 of A-Z a-z 0-9 _ -), "type", and by type:
      delay       exactly one of "seconds" (int ≥ 1), "minutes" (int ≥ 1), "until" (RFC 3339 date-time
                  with its offset); at most MAX_DELAY_SECONDS (366 days) ahead;  "next"
      send        "template" (a template id of the project), "data" (object, optional);  "next"
      condition   "condition" (a segment condition tree, `pipeline.marketing.segments`);  "then", "else"
      wait        "event" (a name), "timeoutSeconds" (1 … 366 days);  "then" (the event came),
                  "timeout" (it did not)
      update      "data" (object, merged into the contact's data), "subscribed" (bool);  "next"
      webhook     "url" (http or https, as an endpoint's: `pipeline.webhook_targets`);  "next"
      exit        nothing else
    "next", "then", "else", "timeout" are optional step ids; a missing one ends the run (COMPLETED).

Every step must be reachable from the entry and no path may come back to a step it passed (no cycles),
so every run ends. Errors name the step by its index: `steps.2.type` unknown_step_type, `steps.1.next`
unknown_step or cycle, `steps.0.minutes` too_big, `steps.3.template` unknown_template, `steps.4`
unreachable_step, `steps.1.id` duplicate_step.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from sqlalchemy.orm import Session

from pipeline import grammar
from pipeline.compose import MAX_RENDERED_HEADER, Template, looks_like_html
from pipeline.errors import FieldError, ValidationFailed
from pipeline.marketing.segments import CONDITION_TAGS, Condition, event_names
from pipeline.webhook_targets import MAX_URL, URL_PATTERN, target_problem, url_problem
from storage import templates as template_store
from storage import workflow_admin as store

MAX_STEPS = 100
MAX_DELAY_SECONDS = 366 * 24 * 3600
MAX_DELAY_MINUTES = MAX_DELAY_SECONDS // 60
MAX_EVENT_NAME = 200
MAX_TEMPLATE_ID = 64
MAX_DATA_KEYS = 256
MAX_DATA_KEY = 200
MAX_DATA_BYTES = 65_536
"""A send or update step's `data`, as compact JSON."""
MAX_DEFINITION_BYTES = 1_000_000
MAX_ERRORS = 50

STEP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
STEP_ID_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
EVENT_NAME_PATTERN = grammar.EVENT_NAME_PATTERN

BRANCHES: dict[str, tuple[str, ...]] = {
    "delay": ("next",), "send": ("next",), "condition": ("then", "else"), "wait": ("then", "timeout"),
    "update": ("next",), "webhook": ("next",), "exit": (),
}
"""Each step type's fields that name the step to go to."""
STEP_TYPES = tuple(BRANCHES)
DELAY_UNITS = ("seconds", "minutes", "until")


# ---------------------------------------------------------------------------------------------------
# One step: a pydantic model per type (also /openapi.json's step schemas).

def _step_id(value: Any) -> str:
    if not isinstance(value, str):
        raise grammar.problem("invalid_type", "Expected a string")
    if not STEP_ID.fullmatch(value):
        raise grammar.problem("invalid_string", "Step ids are 1-64 characters of A-Z, a-z, 0-9, _ and -")
    return value


def _step_ref(value: Any) -> str:
    if not isinstance(value, str):
        raise grammar.problem("invalid_type", "Expected a step id")
    return value


def _until(value: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str):
        raise grammar.problem("invalid_type", "Expected an ISO 8601 date-time with its offset")
    try:
        if not DATE_TIME.fullmatch(value):
            raise ValueError(value)
        when = until_time(value)
    except ValueError:
        raise grammar.problem("invalid_date",
                              "Expected an ISO 8601 date-time with its offset (2025-03-01T10:00:00Z)") from None
    if info.context != grammar.STORED and when > datetime.now(UTC) + timedelta(seconds=MAX_DELAY_SECONDS):
        raise grammar.problem("too_big", "A delay is at most 366 days; until is further ahead")
    return value


def until_time(value: str) -> datetime:
    """A delay's `until` as a UTC datetime; ValueError when it is none."""
    return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).astimezone(UTC)


def _template_id(value: Any) -> str:
    if not isinstance(value, str):
        raise grammar.problem("invalid_type", "Expected a template id")
    if not 1 <= len(value) <= MAX_TEMPLATE_ID:
        raise grammar.problem("invalid_string", f"Template ids are 1-{MAX_TEMPLATE_ID} characters")
    if "\x00" in value:
        raise grammar.problem("invalid_string", "Text may not contain NUL")
    return value


def _data(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise grammar.problem("invalid_type", "Expected an object")
    if len(value) > MAX_DATA_KEYS:
        raise grammar.problem("too_big", f"At most {MAX_DATA_KEYS} keys")
    if any(not 1 <= len(key) <= MAX_DATA_KEY for key in value):
        raise grammar.problem("invalid_string", f"Data keys must be 1-{MAX_DATA_KEY} characters")
    if len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_DATA_BYTES:
        raise grammar.problem("too_big", f"At most {MAX_DATA_BYTES} bytes as JSON")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise grammar.problem("invalid_type", "Expected a URL")
    if (found := url_problem(value, True)) is not None:
        raise grammar.problem(found.code, found.message)
    return value


def _unknown_type(value: Any) -> str:
    raise grammar.problem("unknown_step_type", f"Unknown step type {json.dumps(value, default=str)[:80]}; types are "
                                       f"{', '.join(STEP_TYPES)}")


StepId: TypeAlias = Annotated[str, grammar.Atom(_step_id, {"type": "string", "pattern": STEP_ID_PATTERN})]
StepRef: TypeAlias = Annotated[
    Annotated[str, grammar.Atom(_step_ref, {"type": "string", "pattern": STEP_ID_PATTERN})] | None,
    Field(description="The id of the step to go to; missing or null: the run completes here")]
EventName: TypeAlias = Annotated[str, grammar.event_name(MAX_EVENT_NAME)]
StepData: TypeAlias = Annotated[dict[str, Any], grammar.Atom(_data, {
    "type": "object", "maxProperties": MAX_DATA_KEYS, "propertyNames": {"minLength": 1, "maxLength": MAX_DATA_KEY},
    "description": f"At most {MAX_DATA_BYTES} bytes as JSON"})]
Seconds: TypeAlias = Annotated[int, grammar.whole_number(MAX_DELAY_SECONDS, "a delay is at most 366 days")]
Minutes: TypeAlias = Annotated[int, grammar.whole_number(MAX_DELAY_MINUTES, "a delay is at most 366 days")]
TimeoutSeconds: TypeAlias = Annotated[int, grammar.whole_number(MAX_DELAY_SECONDS, "a wait lasts at most 366 days")]
Until: TypeAlias = Annotated[str, grammar.Atom(_until, {
    "type": "string", "format": "date-time", "description": "RFC 3339 with its offset; at most 366 days ahead"})]
TemplateId: TypeAlias = Annotated[str, grammar.Atom(_template_id, {
    "type": "string", "minLength": 1, "maxLength": MAX_TEMPLATE_ID, "pattern": grammar.NO_NUL})]
Url: TypeAlias = Annotated[str, grammar.Atom(_url, {"type": "string", "maxLength": MAX_URL, "pattern": URL_PATTERN})]


class _Step(grammar.Node):
    id: StepId

    def branch(self, name: str) -> str | None:
        """The step id this step's `name` branch goes to (None: the run completes)."""
        return getattr(self, "else_" if name == "else" else name, None)


class _Delay(_Step):
    WHERE: ClassVar[str] = "in a delay step"
    type: Literal["delay"]
    next: StepRef = None


class DelaySecondsStep(_Delay):
    TAG: ClassVar[str] = "<delay.seconds>"
    seconds: Seconds

    def due(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.seconds)


class DelayMinutesStep(_Delay):
    TAG: ClassVar[str] = "<delay.minutes>"
    minutes: Minutes

    def due(self, now: datetime) -> datetime:
        return now + timedelta(minutes=self.minutes)


class DelayUntilStep(_Delay):
    TAG: ClassVar[str] = "<delay.until>"
    until: Until

    def due(self, now: datetime) -> datetime:
        return until_time(self.until)


class SendStep(_Step):
    """Send a template of the project to the contact; `data` and the triggering event's data fill its
    variables."""

    TAG: ClassVar[str] = "<send>"
    WHERE: ClassVar[str] = "in a send step"
    type: Literal["send"]
    template: TemplateId
    data: StepData | None = None
    next: StepRef = None


class ConditionStep(_Step):
    """Branch on the contact (a segment condition tree): `then` when it matches, else `else`."""

    TAG: ClassVar[str] = "<condition>"
    WHERE: ClassVar[str] = "in a condition step"
    type: Literal["condition"]
    condition: Condition
    then: StepRef = None
    else_: StepRef = Field(default=None, alias="else")


class WaitStep(_Step):
    """Wait for the contact's next `event`: `then` when it comes, `timeout` after `timeoutSeconds`."""

    TAG: ClassVar[str] = "<wait>"
    WHERE: ClassVar[str] = "in a wait step"
    type: Literal["wait"]
    event: EventName
    timeoutSeconds: TimeoutSeconds
    then: StepRef = None
    timeout: StepRef = None


class UpdateStep(_Step):
    """Merge `data` into the contact's data and/or set its subscription."""

    TAG: ClassVar[str] = "<update>"
    WHERE: ClassVar[str] = "in an update step"
    type: Literal["update"]
    data: StepData | None = None
    subscribed: grammar.Boolean | None = None
    next: StepRef = None


class WebhookStep(_Step):
    TAG: ClassVar[str] = "<webhook>"
    WHERE: ClassVar[str] = "in a webhook step"
    type: Literal["webhook"]
    url: Url
    next: StepRef = None


class ExitStep(_Step):
    TAG: ClassVar[str] = "<exit>"
    WHERE: ClassVar[str] = "in an exit step"
    type: Literal["exit"]


class _DelayProblem(_Delay):
    """A delay step with none, or more than one, of seconds, minutes and until: says so."""

    TAG: ClassVar[str] = "<delay?>"
    seconds: Any = None
    minutes: Any = None
    until: Any = None

    @model_validator(mode="after")
    def _one_unit(self) -> _DelayProblem:
        raise grammar.problem("invalid_delay", "A delay step takes exactly one of seconds, minutes or until")


class _UnknownTypeStep(_Step):
    """A step with no type, or one that is none of STEP_TYPES: says so (its other keys are not judged)."""

    TAG: ClassVar[str] = "<unknown>"
    model_config = ConfigDict(extra="allow")
    type: Annotated[str, grammar.Atom(_unknown_type, {})]


DelayStep: TypeAlias = DelaySecondsStep | DelayMinutesStep | DelayUntilStep
RunnableStep: TypeAlias = DelayStep | SendStep | ConditionStep | WaitStep | UpdateStep | WebhookStep | ExitStep
StepNode: TypeAlias = RunnableStep | _DelayProblem | _UnknownTypeStep
"""Every shape of step; the last two only report why a step fits none of the others."""
STEP_TAGS: dict[str, type[grammar.Node]] = {step.TAG: step for step in get_args(StepNode)}
_TAGS = {**STEP_TAGS, **CONDITION_TAGS}
"""Every tag a step's error may pass through (a condition step holds a condition tree)."""


def step_tag(step: Any) -> str | None:
    """Which model a step is, from its type (and a delay's unit); None when it is not an object."""
    if isinstance(step, _Step):
        return step.TAG
    if not isinstance(step, dict):
        return None
    kind = step.get("type")
    if not isinstance(kind, str) or kind not in BRANCHES:
        return _UnknownTypeStep.TAG
    if kind == "delay":
        given = [unit for unit in DELAY_UNITS if unit in step]
        return f"<delay.{given[0]}>" if len(given) == 1 else _DelayProblem.TAG
    return f"<{kind}>"


WorkflowStep: TypeAlias = Annotated[StepNode, grammar.TaggedUnion(
    step_tag, "invalid_step", "Expected a step object", unlisted=(_DelayProblem, _UnknownTypeStep))]
_STEPS: TypeAdapter[list[WorkflowStep]] = TypeAdapter(list[WorkflowStep])
_STEP: TypeAdapter[Any] = TypeAdapter(WorkflowStep)


@dataclass(frozen=True)
class BrokenStep:
    """A stored step the engine cannot run (an odd row written before the rules, or by hand): a run that
    reaches it fails with `reason`."""

    id: str
    type: Any
    reason: str


@dataclass(frozen=True)
class ParsedDefinition:
    """A stored definition as the engine runs it: its steps by id, and the id of the first."""

    steps: dict[str, RunnableStep | BrokenStep]
    entry: str | None


def parse_definition(definition: Any) -> ParsedDefinition:
    """Parse each step of a stored definition with the API's models (a stored delay or wait may be 0),
    once per claim of the workflow's runs; a step that does not parse becomes a BrokenStep. Never raises."""
    steps = definition.get("steps") if isinstance(definition, dict) else None
    if not isinstance(steps, list):
        return ParsedDefinition({}, None)
    parsed = {str(step["id"]): _parse_step(step, str(step["id"])) for step in steps
              if isinstance(step, dict) and "id" in step}
    first = steps[0] if steps and isinstance(steps[0], dict) and "id" in steps[0] else None
    return ParsedDefinition(parsed, str(first["id"]) if first is not None else None)


def _parse_step(step: dict[str, Any], step_id: str) -> RunnableStep | BrokenStep:
    try:
        return _STEP.validate_python(step, context=grammar.STORED)
    except ValidationError as exc:
        kind = step.get("type")
        if not isinstance(kind, str) or kind not in BRANCHES:
            return BrokenStep(step_id, kind, f"step {step_id!r} has an unknown type {kind!r}")
        first = grammar.field_errors(exc, "", _TAGS, 1)[0]
        return BrokenStep(step_id, kind, f"step {step_id!r}: {first.field or 'the step'}: {first.message}")


class StepList:
    """A request body's steps: taken as a plain list (`validate_definition` names each problem by its
    step) and described as the list of WorkflowStep in /openapi.json."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(_STEPS.core_schema)
        return {**schema, "minItems": 1, "maxItems": MAX_STEPS,
                "description": "The first step is the entry. Every step must be reachable from it and no path "
                               "may return to a step (no cycles)."}


# ---------------------------------------------------------------------------------------------------
# The graph.

class _Graph:
    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[FieldError] = []

    def fail(self, field: str, message: str, code: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(FieldError(field, message, code))

    def at(self, index: int, key: str | None = None) -> str:
        return f"{self.path}.{index}" + (f".{key}" if key else "")

    def check(self, steps: list[StepNode]) -> None:
        """Duplicate ids, references to unknown steps, cycles, unreachable steps."""
        index_of: dict[str, int] = {}
        for index, step in enumerate(steps):
            if step.id in index_of:
                self.fail(self.at(index, "id"), f"Step id '{step.id}' is also step {index_of[step.id]}'s",
                          "duplicate_step")
            else:
                index_of[step.id] = index
        edges: dict[int, list[tuple[str, int]]] = {}
        for index, step in enumerate(steps):
            edges[index] = []
            for branch in BRANCHES[step.type]:
                target = step.branch(branch)
                if target is None:
                    continue
                if target not in index_of:
                    self.fail(self.at(index, branch), f"No step has the id '{target[:64]}'", "unknown_step")
                else:
                    edges[index].append((branch, index_of[target]))
        if self.errors or not steps:
            return
        # Depth-first from the entry: an edge back to a step on the current path closes a cycle.
        reached = {0}
        on_path: list[int] = [0]
        iterators = [iter(edges[0])]
        while iterators:
            step_index = on_path[-1]
            edge = next(iterators[-1], None)
            if edge is None:
                iterators.pop()
                on_path.pop()
                continue
            branch, target_index = edge
            if target_index in on_path:
                self.fail(self.at(step_index, branch), f"Going to step '{steps[target_index].id}' here makes a "
                                                       "loop; workflows may not revisit a step", "cycle")
            elif target_index not in reached:
                reached.add(target_index)
                on_path.append(target_index)
                iterators.append(iter(edges[target_index]))
        for index in range(len(steps)):
            if index not in reached:
                self.fail(self.at(index), f"Step '{steps[index].id}' cannot be reached from the first step",
                          "unreachable_step")


def check_structure(definition: Any, path: str = "steps") -> list[FieldError]:
    """Every problem of a definition that needs no database (all but unknown templates). A valid
    definition's steps are rewritten as parsed (a whole number given as 5.0 is stored as 5)."""
    graph = _Graph(path)
    steps = definition.get("steps") if isinstance(definition, dict) else None
    if not isinstance(steps, list):
        graph.fail(path, "Expected a list of steps", "invalid_type")
        return graph.errors
    if not steps:
        graph.fail(path, "A workflow has at least one step", "too_small")
        return graph.errors
    if len(steps) > MAX_STEPS:
        graph.fail(path, f"A workflow has at most {MAX_STEPS} steps", "too_big")
        return graph.errors
    if len(json.dumps(steps, separators=(",", ":"), ensure_ascii=False, default=str).encode()) > MAX_DEFINITION_BYTES:
        graph.fail(path, f"Steps are at most {MAX_DEFINITION_BYTES} bytes as JSON", "too_big")
        return graph.errors
    try:
        parsed = _STEPS.validate_python(steps)
    except ValidationError as exc:
        return grammar.field_errors(exc, path, _TAGS, MAX_ERRORS)
    graph.check(parsed)
    if not graph.errors:
        definition["steps"] = [step.model_dump(by_alias=True, exclude_unset=True) for step in parsed]
    return graph.errors


def validate_definition(session: Session, project_id: str, definition: Any, path: str = "steps",
                        max_bytes: int | None = None) -> None:
    """Raise ValidationFailed naming each problem by its step (`steps.N.field`) and code: invalid_type,
    required, unknown_key, invalid_string, unknown_step_type, invalid_delay, invalid_date, too_small,
    too_big, invalid_url, duplicate_step, unknown_step, cycle, unreachable_step, unknown_template, and
    the condition codes of `pipeline.marketing.segments.validate_condition`. Whole-number fields given as 5.0 are
    rewritten to 5 in `definition`. With `max_bytes` (`smtp.max_message_bytes`), a send step whose template
    renders larger with the step's own data alone (before any contact's) is too_big."""
    errors = check_structure(definition, path)
    if not errors:
        steps = definition["steps"]
        wanted = templates_used(definition)
        known = store.existing_templates(session, project_id, sorted(wanted)) if wanted else set()
        for index, step in enumerate(steps):
            if step["type"] == "send" and step["template"] not in known:
                errors.append(FieldError(f"{path}.{index}.template", f"Template {step['template']} not found",
                                         "unknown_template"))
            elif step["type"] == "send" and max_bytes is not None:
                errors += _template_size(session, project_id, step, f"{path}.{index}.template", max_bytes)
    if errors:
        raise ValidationFailed(errors[:MAX_ERRORS], "Invalid workflow definition",
                               "Fix each step listed in errors (they are named steps.<index>.<field>).")


def _template_size(session: Session, project_id: str, step: dict[str, Any], field: str,
                   max_bytes: int) -> list[FieldError]:
    """too_big when the step's template, with the step's data, renders over the size limits by itself."""
    template = template_store.get_template(session, project_id, step["template"])
    if template is None:
        return []
    data = step.get("data") or {}
    subject_bytes = Template(template.subject).size(data)
    body_bytes = Template(template.body).size(data, template.style == "PLUNK" or looks_like_html(template.body))
    if subject_bytes > MAX_RENDERED_HEADER:
        return [FieldError(field, f"Template {template.id}'s subject renders to more than {MAX_RENDERED_HEADER} "
                                  "bytes, the limit for one header", "too_big")]
    if subject_bytes + body_bytes > max_bytes:
        return [FieldError(field, f"Template {template.id} renders to more than {max_bytes} bytes, the message "
                                  "size limit (smtp.max_message_bytes)", "too_big")]
    return []


def _steps(definition: Any) -> list[dict[str, Any]]:
    steps = definition.get("steps") if isinstance(definition, dict) else None
    return [step for step in steps or [] if isinstance(step, dict)]


def events_used(definition: Any) -> set[str]:
    """Event names a definition depends on: its wait steps' events and the events its conditions test."""
    names: set[str] = set()
    for step in _steps(definition):
        if step.get("type") == "wait" and isinstance(step.get("event"), str):
            names.add(step["event"])
        elif step.get("type") == "condition":
            names |= event_names(step.get("condition"))
    return names


def templates_used(definition: Any) -> set[str]:
    return {step["template"] for step in _steps(definition)
            if step.get("type") == "send" and isinstance(step.get("template"), str)}


ACTION_DELAY_STEP = "delay"
ACTION_SEND_STEP = "send"


def action_definition(delay_minutes: int, template_id: str) -> dict[str, Any]:
    """A legacy action (seed 002) as a definition: wait `delay_minutes` (when > 0), then send."""
    send = {"id": ACTION_SEND_STEP, "type": "send", "template": template_id}
    if delay_minutes > 0:
        return {"steps": [{"id": ACTION_DELAY_STEP, "type": "delay", "minutes": delay_minutes,
                           "next": ACTION_SEND_STEP}, send]}
    return {"steps": [send]}


def action_fields(definition: Any) -> tuple[int, str | None]:
    """(delay minutes, template id) of a definition made by `action_definition`."""
    delay, template = 0, None
    for step in _steps(definition):
        if step.get("type") == "delay" and isinstance(step.get("minutes"), int):
            delay = step["minutes"]
        elif step.get("type") == "send":
            template = step.get("template")
    return delay, template


async def check_webhook_targets(steps: Any, allow_private: bool, path: str = "steps") -> None:
    """Before the definition is saved (outside its transaction, as this resolves names): 422 naming
    `steps.N.url` for each webhook step whose URL `pipeline.webhook_targets.target_problem` refuses (a
    non-public address, unless `allow_private`). Anything else odd is left to `validate_definition`."""
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        return
    urls = {index: step["url"] for index, step in enumerate(steps) if isinstance(step, dict)
            and step.get("type") == "webhook" and isinstance(step.get("url"), str)}
    problems = await asyncio.gather(*(target_problem(url, allow_private, f"{path}.{index}.url")
                                      for index, url in urls.items()))
    errors = [found for found in problems if found is not None]
    if errors:
        raise ValidationFailed(errors[:MAX_ERRORS], "Invalid workflow definition",
                               "Fix each step listed in errors (they are named steps.<index>.<field>).")
