"""Dashboard segments: the form ↔ tree round trip (the 300 random trees of the segment tests, and the builder
page's own fields posted back), the live count equal to the API's, the JSON view, membership tracking with its
entries and exits, roles, and hostile or oversized input."""

from __future__ import annotations

import json
import random
import re
from html.parser import HTMLParser

from markupsafe import escape

from pipeline.marketing.segment_form import fields_to_tree, tree_to_fields
from pipeline.marketing.segments import validate_condition
from tests.test_segments import random_tree

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


class FormFields(HTMLParser):
    """The fields a browser submits from the page's first POST form with `action` (without any button)."""

    def __init__(self, action: str) -> None:
        super().__init__(convert_charrefs=True)
        self.action, self.inside, self.fields = action, False, {}
        self.select: str | None = None
        self.textarea: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and a.get("action") == self.action and a.get("method") == "post":
            self.inside = True
        if not self.inside:
            return
        if tag == "input" and a.get("name"):
            if a.get("type") == "checkbox" and "checked" not in a:
                return
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "select":
            self.select = a.get("name")
        elif tag == "option" and self.select and ("selected" in a or self.select not in self.fields):
            self.fields[self.select] = a.get("value", "")
        elif tag == "textarea":
            self.textarea = a.get("name")
            self.fields[self.textarea] = ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self.select = None
        elif tag == "textarea":
            self.textarea = None

    def handle_data(self, data):
        if self.textarea:
            self.fields[self.textarea] += data.removeprefix("\n") if not self.fields[self.textarea] else data


def page_fields(page: str, action: str) -> dict[str, str]:
    parser = FormFields(action)
    parser.feed(page)
    return parser.fields


def base(dash) -> str:
    return f"/projects/{dash.api.project_id}/segments"


async def api_segment(dash, condition, name="s", track=False) -> dict:
    status, body = await dash.api.call("POST", "/segments", json={"name": name, "condition": condition,
                                                                   "trackMembership": track})
    assert status == 201, body
    return body["data"]


def test_the_300_random_trees_round_trip_through_the_form_fields():
    rng = random.Random(20261123)  # the seed and generator of tests/test_segments.py's random trees
    kinds = set()
    for _ in range(300):
        tree = random_tree(rng)
        validate_condition(tree)
        fields = tree_to_fields(tree)
        assert all(isinstance(v, str) for v in fields.values())
        back = fields_to_tree(fields)
        assert back == tree and json.dumps(back) == json.dumps(tree), tree  # 30 stays 30, 30.0 stays 30.0
        kinds.update(key.split(".", 1)[1] for key in fields if "." in key)
    assert {"withinNull", "atLeast", "key", "type"} <= kinds


async def test_the_builder_page_posts_back_the_tree_it_shows(dash):
    """The page's own form (every hidden depth, select and value as a browser submits them) saves the same
    tree, and its JSON view holds the same tree."""
    rng = random.Random(7)
    trees = [random_tree(rng) for _ in range(40)]
    trees = [t for t in trees if "all" in t or "any" in t or "not" in t][:12]
    trees.append({"all": [{"field": "data.plan", "op": "equals", "value": 30.0},
                          {"event": "buy", "op": "did", "atLeast": 2, "withinDays": None},
                          {"not": {"field": "subscribed", "op": "equals", "value": False}}]})
    for index, tree in enumerate(trees):
        segment = await api_segment(dash, tree, name=f"tree {index}")
        path = f"{base(dash)}/{segment['id']}"
        status, page = await dash.owner.get(path)
        assert status == 200
        fields = page_fields(page, path)
        assert json.loads(fields["condition"]) == tree
        fields["name"] = f"tree {index} saved"
        token = fields.pop("csrf")
        assert token, "the form carries the session's CSRF token"
        response = await dash.owner.post(path, fields, csrf=token)
        assert response.status == 303, await response.text()
        status, body = await dash.api.call("GET", f"/segments/{segment['id']}")
        assert body["data"]["condition"] == tree and json.dumps(body["data"]["condition"]) == json.dumps(tree)
        assert body["data"]["name"] == f"tree {index} saved"


async def test_build_a_segment_by_buttons_and_its_count_equals_the_apis(dash):
    for email, plan in (("ann@example.com", "pro"), ("bob@example.com", "free"), ("cy@example.com", "pro")):
        status, _ = await dash.api.call("POST", "/contacts", json={"email": email, "subscribed": True,
                                                                    "data": {"plan": plan}})
    for email in ("ann@example.com", "bob@example.com"):
        status, body = await dash.api.call("POST", "/v1/track", json={"email": email, "event": "purchase"})
        assert status == 200, body
    status, page = await dash.owner.get(f"{base(dash)}/new")
    assert status == 200 and '<option value="plan">' in page and '<option value="purchase">' in page
    fields = page_fields(page, base(dash))
    for action in ("add-event:0", "add-field:0"):
        response = await dash.owner.post(base(dash), {**fields, "action": action})
        assert response.status == 200
        fields = page_fields(await response.text(), base(dash))
    fields.update({"name": "Buyers on pro", "n1.event": "purchase", "n1.atLeast": "1", "n1.withinDays": "30",
                   "n2.field": "data", "n2.key": "plan", "n2.op": "equals", "n2.type": "text", "n2.value": "pro"})
    fields.pop("csrf", None)
    response = await dash.owner.post(f"{base(dash)}/preview", fields, headers={"HX-Request": "true"})
    fragment = await response.text()
    assert response.status == 200 and "<strong>1</strong> contact match" in fragment and "ann@example.com" in fragment
    response = await dash.owner.post(base(dash), fields)
    assert response.status == 303, await response.text()
    segment_id = response.headers["Location"].rsplit("/", 1)[1]
    status, body = await dash.api.call("GET", f"/segments/{segment_id}/count")
    assert body["data"]["count"] == 1
    assert (await dash.api.call("GET", f"/segments/{segment_id}"))[1]["data"]["condition"] == {"all": [
        {"event": "purchase", "op": "did", "atLeast": 1, "withinDays": 30},
        {"field": "data.plan", "op": "equals", "value": "pro"}]}

    status, body = await dash.owner.post_json(f"{base(dash)}/preview", {"condition": {"field": "data.plan", "op":
                                                                                     "equals", "value": "pro"}})
    assert status == 200 and body["data"]["count"] == 2
    assert sorted(m["email"] for m in body["data"]["members"]) == ["ann@example.com", "cy@example.com"]


async def test_an_unfinished_condition_shows_its_problem_in_the_live_count(dash):
    """While the user is still typing (an event test without its event), the live count says what is missing:
    htmx swaps in only a 2xx answer, so the fragment answers 200 (a 422 would leave the last count showing).
    The Count members button without JavaScript, and a script, still get the 422."""
    status, page = await dash.owner.get(f"{base(dash)}/new")
    fields = page_fields(page, base(dash))
    response = await dash.owner.post(base(dash), {**fields, "action": "add-event:0"})
    fields = page_fields(await response.text(), base(dash))
    fields.pop("csrf", None)
    response = await dash.owner.post(f"{base(dash)}/preview", fields, headers={"HX-Request": "true"})
    fragment = await response.text()
    assert response.status == 200 and 'role="alert"' in fragment and "segment-count" not in fragment
    response = await dash.owner.post(f"{base(dash)}/preview", fields)
    assert response.status == 422 and 'role="alert"' in await response.text()
    response = await dash.owner.client.post(f"{base(dash)}/preview", json={"condition": {"event": "", "op": "did"}},
                                            headers={"Accept": "application/json", "HX-Request": "true",
                                                     "X-CSRF-Token": dash.owner.csrf})
    assert response.status == 422 and (await response.json())["data"]["problem"]


async def test_the_json_view_applies_to_the_form_and_bad_json_is_422(dash):
    tree = {"any": [{"field": "email", "op": "contains", "value": "@example.com"},
                    {"event": "open", "op": "didNot", "withinDays": 5}]}
    status, page = await dash.owner.get(f"{base(dash)}/new")
    fields = page_fields(page, base(dash))
    response = await dash.owner.post(base(dash), {**fields, "action": "json", "condition": json.dumps(tree)})
    assert response.status == 200
    shown = page_fields(await response.text(), base(dash))
    assert fields_to_tree(shown) == tree
    assert {k: v for k, v in tree_to_fields(tree).items()}.items() <= shown.items()
    assert json.loads(shown["condition"]) == tree

    for bad, _code in (("{not json", "invalid_json"), ('{"field": "email", "op": "bigger", "value": 1}', None),
                      ("[" * 5000 + "]" * 5000, None), ("x" * 300_000, "too_big")):
        response = await dash.owner.post(base(dash), {**fields, "action": "json", "condition": bad})
        assert response.status == 422, bad[:40]
    for hostile in ({**fields, "nodes": "100000"}, {**fields, "nodes": "1", "n0.depth": "0", "n0.kind": "<x>"},
                    {**fields, "action": "remove:99"}, {**fields, "action": "add-field:x"},
                    {**fields, "name": "x", "nodes": "2", "n0.depth": "0", "n0.kind": "field", "n0.field": "email",
                     "n0.op": "equals", "n0.value": "a", "n1.depth": "0", "n1.kind": "all"},
                    {**fields, "name": "x", "nodes": "1", "n0.depth": "0", "n0.kind": "not"}):
        response = await dash.owner.post(base(dash), hostile)
        assert response.status == 422, hostile
    response = await dash.owner.client.post(f"{base(dash)}/preview", data="[" * 100_000 + "]" * 100_000, headers={
        "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": dash.owner.csrf})
    assert response.status == 422, "a JSON body nested past the parser's depth"
    status, body = await dash.api.call("GET", "/segments")
    assert body["data"]["items"] == [], "nothing stored"


async def test_membership_tracking_shows_entries_and_hostile_names_are_escaped(dash):
    hostile = await api_segment(dash, {"any": [{"field": f"data.{HOSTILE}", "op": "equals", "value": HOSTILE},
                                               {"event": HOSTILE, "op": "didNot"}]}, name="hostile")
    status, page = await dash.owner.get(f"{base(dash)}/{hostile['id']}")
    assert status == 200 and HOSTILE not in page and "<script>alert(2)" not in page
    assert page.count(f'value="{escape(HOSTILE)}"') == 3, "the data key, the value and the event name"
    segment = await api_segment(dash, {"field": "data.vip", "op": "equals", "value": True}, name=HOSTILE)
    path = f"{base(dash)}/{segment['id']}"
    status, page = await dash.owner.get(path)
    assert HOSTILE not in page and str(escape(HOSTILE)) in page
    status, page = await dash.owner.get(base(dash))
    assert HOSTILE not in page and str(escape(HOSTILE)) in page
    await dash.owner.get(path)
    fields = page_fields(page := (await dash.owner.get(path))[1], path)
    assert "trackMembership" not in fields
    response = await dash.owner.post(path, {**fields, "trackMembership": "on"})
    assert response.status == 303
    status, body = await dash.api.call("POST", "/contacts", json={"email": "vip@example.com", "subscribed": True,
                                                                   "data": {"vip": True}})
    assert status in (200, 201), body
    status, page = await dash.owner.get(path)
    assert re.search(r"<h3>Joined: 1</h3>\s*<ul><li><a href=\"[^\"]+/contacts/[^\"]+\">vip@example.com</a>", page)
    assert "<h3>Left: 0</h3>" in page
    status, body = await dash.owner.get_json(path)
    assert body["data"]["trackMembership"] is True and body["data"]["moves"]["entry"]["count"] == 1


async def test_a_viewer_reads_and_counts_but_changes_nothing(dash):
    segment = await api_segment(dash, {"all": [{"field": "email", "op": "contains", "value": "a"}]}, name="Mine")
    viewer = await dash.browser("viewer@example.com", "viewer")
    path = f"{base(dash)}/{segment['id']}"
    status, page = await viewer.get(path)
    assert status == 200
    for button in ("Save segment", "Delete segment", "Add field test", "Remove condition", "Apply the JSON"):
        assert button not in page
    fields = page_fields(page, path)
    response = await viewer.post(f"{base(dash)}/preview", fields)
    assert response.status == 200, "counting changes nothing"
    for target in (path, f"{path}/delete", base(dash)):
        response = await viewer.post(target, {**fields, "name": "changed"})
        assert response.status == 403, target
    status, _ = await viewer.get(f"{base(dash)}/new")
    assert status == 403
    assert (await dash.api.call("GET", f"/segments/{segment['id']}"))[1]["data"]["name"] == "Mine"

    editor = await dash.browser("editor@example.com", "editor")
    status, page = await editor.get(path)
    response = await editor.post(path, {**page_fields(page, path), "name": "By editor"})
    assert response.status == 303
    response = await editor.post(f"{path}/delete")
    assert response.status == 303
    assert (await dash.api.call("GET", f"/segments/{segment['id']}"))[0] == 404
