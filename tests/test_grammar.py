"""One grammar: the condition trees and workflow steps that /openapi.json describes are exactly the ones the
validator accepts (hypothesis-generated, valid and invalid, checked against the served schema with a JSON
Schema validator), errors keep their paths and codes, null optional step fields are taken as the schema
says, and a stored step that no longer parses fails the run that reaches it with the reason."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from api.app import served_openapi
from pipeline.errors import ValidationFailed
from pipeline.marketing.segments import OPERATORS, limit_problems, validate_condition
from pipeline.workflows.definitions import check_structure
from tests.test_workflows_api import template
from tests.test_workflows_engine import make_workflow, one_run, outcomes, scheduler_for, track_event


def schema_validator(component: str, wrap: Any = None) -> Draft202012Validator:
    """A JSON Schema validator of /openapi.json's `component` (wrapped, e.g. in an array), formats checked."""
    document = served_openapi()
    ref = {"$ref": f"#/components/schemas/{component}"}
    schema = {**(wrap(ref) if wrap else ref), "components": document["components"]}
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def resolves(tree: Any, path: str, root: str) -> bool:
    """Every part of an error's path but the last is a place in `tree`; the last is a key or index of it."""
    parts = path.split(".")[len(root.split(".")):]
    node = tree
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return not parts or isinstance(node, dict | list)


# ---------------------------------------------------------------------------------------------------
# Condition trees: pools of valid and invalid parts, combined into trees within the size limits.

FIELDS = ["email", "subscribed", "createdAt", "updatedAt", "data.plan", "data.", "data.a\x00b", "data." + "k" * 201,
          "phone", 7, None]
VALUES = ["pro", "", "x" * 1001, "a\x00b", 3, 2.5, -1e300, 1e301, True, False, None, [1], {"a": 1},
          "2024-03-01", "2024-03-01T10:00:00Z", "2024-03-01T12:00:00+02:00", "2024-02-30", "yesterday", 1700000000]
COUNTS = [1, 2, 2.0, 1.5, 0, -1, 1_000_000, 1_000_001, 36_500, 36_501, "2", True, None]
EVENTS = ["purchase", " x ", "", "  ", "e" * 200, "e" * 201, "a\x00", 5, None]
OPS = [*OPERATORS, "like", 3, None]


@st.composite
def field_test(draw) -> dict:
    node = {"field": draw(st.sampled_from(FIELDS))}
    if draw(st.booleans()) or draw(st.booleans()):
        node["op"] = draw(st.sampled_from(OPS))
    if draw(st.booleans()):
        node["value"] = draw(st.sampled_from(VALUES))
    if draw(st.integers(0, 9)) == 0:
        node[draw(st.sampled_from(["extra", "event", "atLeast"]))] = 1
    return node


@st.composite
def event_test(draw) -> dict:
    node = {"event": draw(st.sampled_from(EVENTS))}
    if draw(st.integers(0, 9)):
        node["op"] = draw(st.sampled_from(["did", "didNot", "did", "didNot", "equals", "bogus", 1]))
    for key in ("atLeast", "withinDays"):
        if draw(st.booleans()):
            node[key] = draw(st.sampled_from(COUNTS))
    if draw(st.integers(0, 9)) == 0:
        node[draw(st.sampled_from(["value", "field"]))] = "x"
    return node


LEAVES = st.one_of(field_test(), event_test(), st.sampled_from([{}, {"foo": 1}, 1, "x", None, []]))


def groups(children: st.SearchStrategy) -> st.SearchStrategy:
    listed = st.lists(children, max_size=3)
    return st.one_of(st.builds(lambda items: {"all": items}, listed), st.builds(lambda items: {"any": items}, listed),
                     st.builds(lambda child: {"not": child}, children),
                     st.builds(lambda items: {"all": items, "any": []}, listed),
                     st.builds(lambda child: {"all": child}, children))


TREES = st.recursive(LEAVES, groups, max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
@example({"field": "data.a\x00b", "op": "exists"})  # the schema's pattern refuses NUL in a data key
@example({"all": [{"field": "data.plan", "op": "equals", "value": "pro"},
                  {"event": "purchase", "op": "did", "atLeast": 2.0, "withinDays": None}]})
def test_condition_schema_and_validator_accept_the_same_trees(tree):
    if limit_problems(tree):  # past 10 levels or 200 nodes: JSON schema cannot say so (tests/schemathesis.toml)
        return
    schema = CONDITION_SCHEMA
    try:
        validate_condition(tree)
        errors = []
    except ValidationFailed as exc:
        errors = exc.errors
    assert (not errors) == schema.is_valid(tree), (tree, [(e.field, e.code) for e in errors],
                                                  [e.message for e in schema.iter_errors(tree)][:3])
    for error in errors:
        assert resolves(tree, error.field, "condition"), (tree, error)


CONDITION_SCHEMA = schema_validator("SegmentCondition")


# ---------------------------------------------------------------------------------------------------
# Steps: one step at a time (the graph rules, which JSON schema cannot state, are then trivially met).

STEP_VALUES = {
    "seconds": [5, 5.0, 0, 1.5, 366 * 86400 + 1, "5", True],
    "minutes": [1, 527_040, 527_041, None],
    "until": ["2025-03-01T10:00:00Z", "2025-03-01T10:00:00", "tomorrow", 5],
    "template": ["tpl", "", "t" * 65, "t\x00", 3],
    "data": [{"k": 1}, None, [1], {"": 1}, {"k" * 201: 1}],
    "condition": [{"all": []}, {"field": "email", "op": "like", "value": "x"}, None, "x"],
    "event": ["opened", " ", "e" * 201, 4],
    "timeoutSeconds": [60, 0, 366 * 86400 + 1, 60.0],
    "subscribed": [True, None, "yes"],
    "url": ["https://example.com/hook", "ftp://example.com/x", "http://", 5],
    "id": ["a", "bad id!", "x" * 65, 5],
    "next": [None, 5],
    "colour": ["red"],
}
KEYS = {"delay": ["seconds", "minutes", "until"], "send": ["template", "data"], "condition": ["condition"],
        "wait": ["event", "timeoutSeconds"], "update": ["data", "subscribed"], "webhook": ["url"], "exit": []}


@st.composite
def single_step(draw) -> dict:
    kind = draw(st.sampled_from([*KEYS, "teleport", 3]))
    step: dict = {"id": "a", "type": kind}
    for key in KEYS.get(kind, []) if isinstance(kind, str) else []:
        if draw(st.integers(0, 4)):
            step[key] = draw(st.sampled_from(STEP_VALUES[key]))
    for key in ("id", "next", "colour"):
        if draw(st.integers(0, 5)) == 0:
            step[key] = draw(st.sampled_from(STEP_VALUES[key]))
    if draw(st.integers(0, 9)) == 0:
        del step["id"]
    return step


def steps_schema() -> Draft202012Validator:
    """The `steps` property of the POST /workflows body, as served."""
    document = served_openapi()
    body = document["paths"]["/workflows"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    return Draft202012Validator({**body["properties"]["steps"], "components": document["components"]},
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


@settings(max_examples=400, deadline=None)
@given(single_step())
@example({"id": "a", "type": "send", "template": "tpl", "data": None})  # null: the schema's "not given"
@example({"id": "a", "type": "update", "subscribed": None})
def test_step_schema_and_validator_accept_the_same_steps(step):
    errors = check_structure({"steps": [step]})
    assert (not errors) == STEP_LIST.is_valid([step]), (step, [(e.field, e.code) for e in errors])
    for error in errors:
        assert resolves([step], error.field, "steps"), (step, error)


STEP_LIST = steps_schema()


# ---------------------------------------------------------------------------------------------------
# Through the API.

async def test_null_optional_step_fields_are_taken_as_not_given(api):
    template_id = await template(api)
    steps = [{"id": "s", "type": "send", "template": template_id, "data": None, "next": "u"},
             {"id": "u", "type": "update", "data": None, "subscribed": None}]
    status, body = await api.call("POST", "/workflows", json={"name": "n", "trigger": {"event": "e"}, "steps": steps})
    assert status == 201, body
    assert body["data"]["steps"] == steps


async def test_errors_keep_their_paths_and_codes(api):
    template_id = await template(api)
    deep: dict = {"field": "email", "op": "exists"}
    for _ in range(11):
        deep = {"not": deep}
    cases = [
        ([{"id": "c", "type": "condition", "condition": {"all": [{"all": []}, {"field": "email", "op": "like",
                                                                             "value": "x"}]}}],
         [("steps.0.condition.all.1.op", "unknown_operator")]),
        ([{"id": "c", "type": "condition", "condition": deep}],
         [("steps.0.condition" + ".not" * 10, "too_deep")]),
        ([{"id": "s", "type": "send", "template": template_id, "<send>": 1}], [("steps.0.<send>", "unknown_key")]),
        ([{"id": "s", "type": "send", "template": template_id, "next": "t"}, {"id": "t", "type": 3}],
         [("steps.1.type", "unknown_step_type")]),
        ([{"id": "d", "type": "delay", "seconds": 1, "until": "2025-01-01T00:00:00Z"}], [("steps.0", "invalid_delay")]),
    ]
    for steps, expected in cases:
        status, body = await api.call("POST", "/workflows", json={"name": "x", "trigger": {"event": "e"},
                                                                  "steps": steps})
        assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR", body
        assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == expected, steps
    status, body = await api.call("POST", "/segments", json={"name": "x", "condition": {"not": {"any": [
        {"event": "e", "op": "did", "atLeast": 0}, {"field": "data.n", "op": "lessThan", "value": "1"}]}}})
    assert status == 422
    assert [(e["field"], e["code"], e["message"]) for e in body["error"]["errors"]] == [
        ("condition.not.any.0.atLeast", "too_small", "At least 1"),
        ("condition.not.any.1.value", "invalid_type", "Expected a number")]


async def test_a_stored_step_that_does_not_parse_fails_its_run_with_the_reason(api, sender):
    """Rows written before the rules (or by hand): the run that reaches such a step fails, saying why, and
    nothing is done for it (no POST to a URL that has no host); the other runs go on."""
    odd_type = await make_workflow(api, [{"id": "a", "type": ["teleport"]}], ["odd"], name="odd-type")
    no_host = await make_workflow(api, [{"id": "h", "type": "webhook", "url": "http://"}], ["odd"], name="no-host")
    text_number = await make_workflow(api, [{"id": "c", "type": "condition", "condition": {
        "field": "data.n", "op": "greaterThan", "value": "abc"}, "then": "x"}, {"id": "x", "type": "exit"}],
        ["odd"], name="text-number")
    zero_delay = await make_workflow(api, [{"id": "d", "type": "delay", "seconds": 0, "next": "x"},
                                           {"id": "x", "type": "exit"}], ["odd"], name="zero-delay")
    await track_event(api, "kim@example.org", "odd", {"n": 5})
    scheduler = scheduler_for(api)
    await scheduler.run_until_idle()
    run = await one_run(api, odd_type)
    assert (run.status, run.history[-1]["reason"]) == ("FAILED", "step 'a' has an unknown type ['teleport']")
    run = await one_run(api, no_host)
    assert (run.status, run.history[-1]["reason"]) == (
        "FAILED", "step 'h': url: Expected an http:// or https:// URL with a host"), run.history
    assert outcomes(run) == ["failed"]
    run = await one_run(api, text_number)
    assert (run.status, run.history[-1]["reason"]) == ("FAILED", "step 'c': condition.value: Expected a number")
    run = await one_run(api, zero_delay)
    assert run.status == "EXITED" and outcomes(run) == ["delayed", "exit"]
