"""Workflow definitions: the grammar the automation engine executes, checked before anything is stored.

    {"steps": [step, ...]}          the first step is the entry; at most MAX_STEPS steps
    every step                      "id" (1-64 of A-Z a-z 0-9 _ -), "type", and by type:
      delay       exactly one of "seconds" (int ≥ 1), "minutes" (int ≥ 1), "until" (RFC 3339 date-time
                  with its offset); at most MAX_DELAY_SECONDS (366 days) ahead;  "next"
      send        "template" (a template id of the project), "data" (object, optional);  "next"
      condition   "condition" (a segment condition tree, `pipeline.segments`);  "then", "else"
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
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from pipeline.compose import MAX_RENDERED_HEADER, Template, looks_like_html
from pipeline.errors import FieldError, ValidationFailed
from pipeline.segments import event_names, validate_condition
from pipeline.webhook_targets import target_problem, url_problem
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
EVENT_NAME_PATTERN = "^[^\\u0000]*\\S[^\\u0000]*$"

BRANCHES: dict[str, tuple[str, ...]] = {
    "delay": ("next",), "send": ("next",), "condition": ("then", "else"), "wait": ("then", "timeout"),
    "update": ("next",), "webhook": ("next",), "exit": (),
}
"""Each step type's fields that name the step to go to."""
STEP_TYPES = tuple(BRANCHES)
_KEYS: dict[str, set[str]] = {
    "delay": {"seconds", "minutes", "until"}, "send": {"template", "data"}, "condition": {"condition"},
    "wait": {"event", "timeoutSeconds"}, "update": {"data", "subscribed"}, "webhook": {"url"}, "exit": set(),
}


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[FieldError] = []

    def fail(self, field: str, message: str, code: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(FieldError(field, message, code))

    def at(self, index: int, key: str | None = None) -> str:
        return f"{self.path}.{index}" + (f".{key}" if key else "")

    # --- one step ---------------------------------------------------------------------------------

    def step(self, index: int, step: Any) -> str | None:
        """Check one step's own fields; its type if known (for the graph checks), else None."""
        if not isinstance(step, dict):
            self.fail(self.at(index), "Expected a step object", "invalid_type")
            return None
        kind = step.get("type")
        if "id" not in step:
            self.fail(self.at(index, "id"), "Required", "required")
        elif not isinstance(step["id"], str):
            self.fail(self.at(index, "id"), "Expected a string", "invalid_type")
        elif not STEP_ID.fullmatch(step["id"]):
            self.fail(self.at(index, "id"), "Step ids are 1-64 characters of A-Z, a-z, 0-9, _ and -",
                      "invalid_string")
        if "type" not in step:
            self.fail(self.at(index, "type"), "Required", "required")
            return None
        if not isinstance(kind, str) or kind not in BRANCHES:
            self.fail(self.at(index, "type"), f"Unknown step type {json.dumps(kind)[:80]}; types are "
                                              f"{', '.join(STEP_TYPES)}", "unknown_step_type")
            return None
        allowed = {"id", "type", *_KEYS[kind], *BRANCHES[kind]}
        for key in step:
            if key not in allowed:
                self.fail(self.at(index, key), f"Unknown key '{key}' in a {kind} step; expected only "
                                               f"{', '.join(sorted(allowed))}", "unknown_key")
        for branch in BRANCHES[kind]:
            if step.get(branch) is not None and not isinstance(step[branch], str):
                self.fail(self.at(index, branch), "Expected a step id", "invalid_type")
        getattr(self, f"_{kind}")(index, step)
        return kind

    def _delay(self, index: int, step: dict[str, Any]) -> None:
        given = [key for key in ("seconds", "minutes", "until") if key in step]
        if len(given) != 1:
            self.fail(self.at(index), "A delay step takes exactly one of seconds, minutes or until", "invalid_delay")
            return
        key = given[0]
        if key == "until":
            self.until(index, step["until"])
        else:
            limit = MAX_DELAY_SECONDS if key == "seconds" else MAX_DELAY_MINUTES
            self.whole(step, key, index, limit, "a delay is at most 366 days")

    def until(self, index: int, value: Any) -> None:
        field = self.at(index, "until")
        if not isinstance(value, str):
            self.fail(field, "Expected an ISO 8601 date-time with its offset", "invalid_type")
            return
        try:
            if not DATE_TIME.fullmatch(value):
                raise ValueError(value)
            when = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:
            self.fail(field, "Expected an ISO 8601 date-time with its offset (2025-03-01T10:00:00Z)", "invalid_date")
            return
        if when.astimezone(UTC) > datetime.now(UTC) + timedelta(seconds=MAX_DELAY_SECONDS):
            self.fail(field, "A delay is at most 366 days; until is further ahead", "too_big")

    def whole(self, step: dict[str, Any], key: str, index: int, limit: int, why: str) -> None:
        """A whole number 1…limit (an integral float such as 5.0 is stored as 5)."""
        value, field = step[key], self.at(index, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            self.fail(field, "Expected a whole number", "invalid_type")
        elif value < 1:
            self.fail(field, "At least 1", "too_small")
        elif value > limit:
            self.fail(field, f"At most {limit}: {why}", "too_big")
        else:
            step[key] = int(value)

    def _send(self, index: int, step: dict[str, Any]) -> None:
        if "template" not in step:
            self.fail(self.at(index, "template"), "Required", "required")
        elif not isinstance(step["template"], str):
            self.fail(self.at(index, "template"), "Expected a template id", "invalid_type")
        elif not 1 <= len(step["template"]) <= MAX_TEMPLATE_ID:
            self.fail(self.at(index, "template"), f"Template ids are 1-{MAX_TEMPLATE_ID} characters",
                      "invalid_string")
        self.data(index, step)

    def data(self, index: int, step: dict[str, Any]) -> None:
        if "data" not in step:
            return
        value, field = step["data"], self.at(index, "data")
        if not isinstance(value, dict):
            self.fail(field, "Expected an object", "invalid_type")
        elif len(value) > MAX_DATA_KEYS:
            self.fail(field, f"At most {MAX_DATA_KEYS} keys", "too_big")
        elif any(not 1 <= len(key) <= MAX_DATA_KEY for key in value):
            self.fail(field, f"Data keys must be 1-{MAX_DATA_KEY} characters", "invalid_string")
        elif len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_DATA_BYTES:
            self.fail(field, f"At most {MAX_DATA_BYTES} bytes as JSON", "too_big")

    def _condition(self, index: int, step: dict[str, Any]) -> None:
        if "condition" not in step:
            self.fail(self.at(index, "condition"), "Required", "required")
            return
        try:
            validate_condition(step["condition"], path=self.at(index, "condition"))
        except ValidationFailed as exc:
            for error in exc.errors:
                self.fail(error.field, error.message, error.code)

    def _wait(self, index: int, step: dict[str, Any]) -> None:
        field = self.at(index, "event")
        if "event" not in step:
            self.fail(field, "Required", "required")
        elif not isinstance(step["event"], str):
            self.fail(field, "Expected an event name", "invalid_type")
        elif not step["event"].strip():
            self.fail(field, "Event names are not blank", "too_small")
        elif len(step["event"]) > MAX_EVENT_NAME:
            self.fail(field, f"At most {MAX_EVENT_NAME} characters", "too_big")
        elif "\x00" in step["event"]:
            self.fail(field, "Text may not contain NUL", "invalid_string")
        if "timeoutSeconds" not in step:
            self.fail(self.at(index, "timeoutSeconds"), "Required", "required")
        else:
            self.whole(step, "timeoutSeconds", index, MAX_DELAY_SECONDS, "a wait lasts at most 366 days")

    def _update(self, index: int, step: dict[str, Any]) -> None:
        self.data(index, step)
        if "subscribed" in step and not isinstance(step["subscribed"], bool):
            self.fail(self.at(index, "subscribed"), "Expected true or false", "invalid_type")

    def _webhook(self, index: int, step: dict[str, Any]) -> None:
        field, url = self.at(index, "url"), step.get("url")
        if "url" not in step:
            self.fail(field, "Required", "required")
        elif not isinstance(url, str):
            self.fail(field, "Expected a URL", "invalid_type")
        elif (problem := url_problem(url, True, field)) is not None:
            self.fail(problem.field, problem.message, problem.code)

    def _exit(self, index: int, step: dict[str, Any]) -> None:
        pass

    # --- the graph ----------------------------------------------------------------------------------

    def graph(self, steps: list[Any], kinds: list[str | None]) -> None:
        """Duplicate ids, references to unknown steps, cycles, unreachable steps."""
        index_of: dict[str, int] = {}
        for index, step in enumerate(steps):
            step_id = step.get("id") if isinstance(step, dict) else None
            if not isinstance(step_id, str):
                continue
            if step_id in index_of:
                self.fail(self.at(index, "id"), f"Step id '{step_id}' is also step {index_of[step_id]}'s",
                          "duplicate_step")
            else:
                index_of[step_id] = index
        edges: dict[int, list[tuple[str, int]]] = {}
        for index, (step, kind) in enumerate(zip(steps, kinds, strict=True)):
            edges[index] = []
            for branch in BRANCHES.get(kind or "", ()):
                target = step.get(branch)
                if not isinstance(target, str):
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
            branch, target = edge
            if target in on_path:
                self.fail(self.at(step_index, branch), f"Going to step '{steps[target]['id']}' here makes a loop; "
                                                       "workflows may not revisit a step", "cycle")
            elif target not in reached:
                reached.add(target)
                on_path.append(target)
                iterators.append(iter(edges[target]))
        for index in range(len(steps)):
            if index not in reached:
                self.fail(self.at(index), f"Step '{steps[index]['id']}' cannot be reached from the first step",
                          "unreachable_step")


def check_structure(definition: Any, path: str = "steps") -> list[FieldError]:
    """Every problem of a definition that needs no database (all but unknown templates)."""
    checker = _Checker(path)
    steps = definition.get("steps") if isinstance(definition, dict) else None
    if not isinstance(steps, list):
        checker.fail(path, "Expected a list of steps", "invalid_type")
        return checker.errors
    if not steps:
        checker.fail(path, "A workflow has at least one step", "too_small")
        return checker.errors
    if len(steps) > MAX_STEPS:
        checker.fail(path, f"A workflow has at most {MAX_STEPS} steps", "too_big")
        return checker.errors
    if len(json.dumps(steps, separators=(",", ":"), ensure_ascii=False, default=str).encode()) > MAX_DEFINITION_BYTES:
        checker.fail(path, f"Steps are at most {MAX_DEFINITION_BYTES} bytes as JSON", "too_big")
        return checker.errors
    kinds = [checker.step(index, step) for index, step in enumerate(steps)]
    if not checker.errors:
        checker.graph(steps, kinds)
    return checker.errors


def validate_definition(session: Session, project_id: str, definition: Any, path: str = "steps",
                        max_bytes: int | None = None) -> None:
    """Raise ValidationFailed naming each problem by its step (`steps.N.field`) and code: invalid_type,
    required, unknown_key, invalid_string, unknown_step_type, invalid_delay, invalid_date, too_small,
    too_big, invalid_url, duplicate_step, unknown_step, cycle, unreachable_step, unknown_template, and
    the condition codes of `pipeline.segments.validate_condition`. Whole-number fields given as 5.0 are
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
    errors = [problem for problem in problems if problem is not None]
    if errors:
        raise ValidationFailed(errors[:MAX_ERRORS], "Invalid workflow definition",
                               "Fix each step listed in errors (they are named steps.<index>.<field>).")
