"""A segment's condition tree as the flat fields of an HTML form, and back: the dashboard's condition builder.

The tree's nodes are listed in pre-order, each with its depth (`n<i>.depth`) and kind (`n<i>.kind`: all, any,
not, field or event), then the fields of its kind:

* field test: `n<i>.field` (email, subscribed, createdAt, updatedAt or data, with `n<i>.key` for `data.<key>`),
  `n<i>.op`, and its value as `n<i>.type` (text, number, boolean, or none: no value) and `n<i>.value`;
* event test: `n<i>.event`, `n<i>.op` (did, didNot), `n<i>.atLeast` and `n<i>.withinDays` (blank: not given),
  `n<i>.withinNull` ("1": withinDays given as null).

`tree_to_fields` then `fields_to_tree` gives back the same tree, key for key and type for type (30 stays an
int, 30.0 a float). `fields_to_tree` checks the structure only; the grammar (`validate_condition`) checks
the rest, and names its errors by the tree's paths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import FieldError, ValidationFailed
from pipeline.marketing.segments import MAX_DEPTH, MAX_NODES

KINDS = ("all", "any", "not", "field", "event")
GROUP_KINDS = ("all", "any", "not")
PLAIN_FIELDS = ("email", "subscribed", "createdAt", "updatedAt")
VALUE_TYPES = ("text", "number", "boolean", "none")
NODE_KEYS = ("depth", "kind", "field", "key", "op", "type", "value", "event", "atLeast", "withinDays", "withinNull")
MAX_FIELD = 1000
"""Characters of one posted field (the grammar's longest text)."""


@dataclass
class FormNode:
    """One row of the builder, as the form holds it (text)."""

    depth: int
    kind: str
    values: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> str:
        return self.values.get(key, "")


# ---------------------------------------------------------------------------------------------------
# Tree → rows → fields.

def tree_to_nodes(tree: dict[str, Any], depth: int = 0) -> list[FormNode]:
    for group in ("all", "any"):
        if group in tree:
            return [FormNode(depth, group), *(n for child in tree[group] for n in tree_to_nodes(child, depth + 1))]
    if "not" in tree:
        return [FormNode(depth, "not"), *tree_to_nodes(tree["not"], depth + 1)]
    if "event" in tree:
        values = {"event": tree["event"], "op": tree["op"]}
        if "atLeast" in tree:
            values["atLeast"] = str(tree["atLeast"])
        if "withinDays" in tree:
            if tree["withinDays"] is None:
                values["withinNull"] = "1"
            else:
                values["withinDays"] = str(tree["withinDays"])
        return [FormNode(depth, "event", values)]
    name = tree["field"]
    values = {"field": name, "op": tree["op"], **_value_fields(tree)}
    if name.startswith("data."):
        values.update(field="data", key=name[5:])
    return [FormNode(depth, "field", values)]


def _value_fields(test: dict[str, Any]) -> dict[str, str]:
    if "value" not in test:
        return {"type": "none", "value": ""}
    value = test["value"]
    if isinstance(value, bool):
        return {"type": "boolean", "value": "true" if value else "false"}
    if isinstance(value, int | float):
        return {"type": "number", "value": json.dumps(value)}
    return {"type": "text", "value": str(value)}


def nodes_to_fields(nodes: list[FormNode]) -> dict[str, str]:
    fields = {"nodes": str(len(nodes))}
    for index, node in enumerate(nodes):
        fields[f"n{index}.depth"] = str(node.depth)
        fields[f"n{index}.kind"] = node.kind
        for key, value in node.values.items():
            fields[f"n{index}.{key}"] = value
    return fields


def tree_to_fields(tree: dict[str, Any]) -> dict[str, str]:
    return nodes_to_fields(tree_to_nodes(tree))


# ---------------------------------------------------------------------------------------------------
# Fields → rows → tree.

def fields_to_nodes(fields: dict[str, str]) -> list[FormNode]:
    """The rows the form posted (at most MAX_NODES; each field cut to MAX_FIELD characters)."""
    try:
        count = int(fields.get("nodes", "0"))
    except ValueError:
        count = -1
    if not 0 <= count <= MAX_NODES:
        raise ValidationFailed([FieldError("nodes", f"0 to {MAX_NODES} conditions", "too_big")])
    nodes = []
    for index in range(count):
        depth_text = fields.get(f"n{index}.depth", "")
        kind = fields.get(f"n{index}.kind", "")
        if not depth_text.isdigit() or len(depth_text) > 3 or kind not in KINDS:
            raise ValidationFailed([FieldError(f"n{index}", "A condition row of an unknown shape", "invalid_row")])
        values = {key: fields[f"n{index}.{key}"][:MAX_FIELD] for key in NODE_KEYS[2:] if f"n{index}.{key}" in fields}
        nodes.append(FormNode(int(depth_text), kind, values))
    return nodes


def nodes_to_tree(nodes: list[FormNode]) -> dict[str, Any]:
    """The tree the rows describe; ValidationFailed naming the row (`n<i>`) when they describe none."""
    if not nodes:
        return {"all": []}
    errors: list[FieldError] = []
    built = [_node(index, node, errors) for index, node in enumerate(nodes)]
    if errors:
        raise ValidationFailed(errors[:20])
    if nodes[0].depth != 0:
        raise _row_error(0, "The first condition is the top of the tree (depth 0)")
    stack: list[tuple[int, dict[str, Any]]] = []
    for index, (node, tree) in enumerate(zip(nodes, built, strict=True)):
        if index and node.depth == 0:
            raise _row_error(index, "Only one condition is at the top: put the others in a group")
        if node.depth > MAX_DEPTH:
            raise _row_error(index, f"At most {MAX_DEPTH} levels")
        while stack and stack[-1][0] >= node.depth:
            _close(stack.pop())
        if index:
            if not stack or stack[-1][0] != node.depth - 1:
                raise _row_error(index, "A condition sits one level under its group")
            parent = stack[-1][1]
            if "not" in parent:
                if parent["not"] is not None:
                    raise _row_error(index, "A not group holds one condition")
                parent["not"] = tree
            else:
                next(iter(parent.values())).append(tree)
        if node.kind in GROUP_KINDS:
            stack.append((node.depth, tree))
    while stack:
        _close(stack.pop())
    return built[0]


def _close(entry: tuple[int, dict[str, Any]]) -> None:
    if entry[1].get("not", {}) is None:
        raise ValidationFailed([FieldError("condition", "A not group needs one condition", "empty_not")])


def _row_error(index: int, message: str) -> ValidationFailed:
    return ValidationFailed([FieldError(f"n{index}", message, "invalid_row")], message)


def _node(index: int, node: FormNode, errors: list[FieldError]) -> dict[str, Any]:
    if node.kind in ("all", "any"):
        return {node.kind: []}
    if node.kind == "not":
        return {"not": None}
    if node.kind == "event":
        tree: dict[str, Any] = {"event": node.get("event"), "op": node.get("op")}
        for key in ("atLeast", "withinDays"):
            text = node.get(key).strip()
            if text:
                number = _whole(text)
                if number is None:
                    errors.append(FieldError(f"n{index}.{key}", "A whole number", "invalid_type"))
                tree[key] = number
            elif key == "withinDays" and node.get("withinNull") == "1":
                tree[key] = None
        return tree
    name = node.get("field")
    if name == "data":
        name = f"data.{node.get('key').strip()}"
    tree = {"field": name, "op": node.get("op")}
    kind, text = node.get("type") or "text", node.get("value")
    if kind == "text":
        tree["value"] = text
    elif kind == "number":
        tree["value"] = _number(text)
        if tree["value"] is None:
            errors.append(FieldError(f"n{index}.value", "A number", "invalid_type"))
    elif kind == "boolean":
        if text not in ("true", "false"):
            errors.append(FieldError(f"n{index}.value", "true or false", "invalid_type"))
        tree["value"] = text == "true"
    elif kind != "none":
        errors.append(FieldError(f"n{index}.type", f"One of {', '.join(VALUE_TYPES)}", "invalid_enum_value"))
    return tree


def _whole(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 9 else None


def _number(text: str) -> int | float | None:
    """A JSON number as written: `30` an int, `30.0` a float (so a tree's value comes back as it was)."""
    if len(text) > 40:
        return None
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if not isinstance(value, float) or math.isfinite(value) else None


def fields_to_tree(fields: dict[str, str]) -> dict[str, Any]:
    return nodes_to_tree(fields_to_nodes(fields))


# ---------------------------------------------------------------------------------------------------
# The builder's buttons: add a row under a group, remove a row and what it holds.

def edit(nodes: list[FormNode], action: str) -> list[FormNode]:
    """Apply `add-<kind>:<i>` (a new row at the end of group i) or `remove:<i>` (row i and its rows)."""
    verb, _, where = action.partition(":")
    if not where.isdigit() or int(where) >= len(nodes):
        raise ValidationFailed([FieldError("action", "No such condition", "invalid_action")])
    index = int(where)
    end = index + 1
    while end < len(nodes) and nodes[end].depth > nodes[index].depth:
        end += 1
    if verb == "remove":
        if index == 0:
            return [FormNode(0, "all")]
        return nodes[:index] + nodes[end:]
    kind = verb.removeprefix("add-")
    if not verb.startswith("add-") or kind not in KINDS or nodes[index].kind not in GROUP_KINDS:
        raise ValidationFailed([FieldError("action", "Conditions are added to a group", "invalid_action")])
    if len(nodes) >= MAX_NODES:
        raise ValidationFailed([FieldError("action", f"At most {MAX_NODES} conditions", "too_big")])
    new = FormNode(nodes[index].depth + 1, kind, {
        "field": {"field": "email", "op": "contains", "type": "text", "value": ""},
        "event": {"event": "", "op": "did"}}.get(kind, {}))
    return nodes[:end] + [new] + nodes[end:]
