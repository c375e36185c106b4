"""Browser tests' kit: Debian's Chromium driven by Playwright (sync API), a tab that fails the test on any
console error, uncaught page error or Content-Security-Policy violation, axe-core on the page (every
serious or critical violation fails, all listed), and full-page screenshots with readable names under the
test's tmp dir. Never skipped: without Chromium or Playwright the test fails and says why."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("PLUNKD_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
"""Without the networking flags Chromium keeps calling Google's hosts, which this closed network refuses."""
BLOCKING_IMPACTS = ("serious", "critical")
REPORT_CSP_VIOLATIONS = """document.addEventListener("securitypolicyviolation", function (e) {
  console.error("CSP violation: " + e.violatedDirective + " blocked " + (e.blockedURI || "inline"));
});"""
"""Run before each page's scripts (Playwright's init script is not subject to the page's CSP)."""


def chromium_or_fail() -> str:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install -y chromium) or "
                    "set PLUNKD_TEST_CHROMIUM to a Chromium binary", pytrace=False)
    return CHROMIUM


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright `Browser`), closed on the way out."""
    executable = chromium_or_fail()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def axe_violations(page: Any) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now, one line per element."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [f"{violation['id']} ({violation['impact']}): {violation['help']} at {node['target']}"
            for violation in results.response["violations"] if violation["impact"] in BLOCKING_IMPACTS
            for node in violation["nodes"]]


def assert_accessible(page: Any) -> None:
    found = axe_violations(page)
    assert not found, f"axe on {page.url}:\n" + "\n".join(found)


@dataclass
class Tab:
    """One browser context (its own cookies) and its page, watched for errors, with numbered screenshots
    under `shots`: `check(name)` after each page a user reaches."""

    page: Any
    shots: Path
    who: str
    problems: list[str] = field(default_factory=list)
    taken: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Any, shots: Path, who: str, **context_options: Any) -> Tab:
        context = browser.new_context(java_script_enabled=True, **context_options)
        context.add_init_script(REPORT_CSP_VIOLATIONS)
        tab = cls(context.new_page(), shots, who)
        tab.page.on("console", lambda message: tab.problems.append(
            f"console {message.type}: {message.text} ({message.location.get('url')})")
            if message.type == "error" else None)
        tab.page.on("pageerror", lambda error: tab.problems.append(f"page error: {error}"))
        return tab

    def screenshot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", f"{self.who} {name}".lower()).strip("-")
        path = self.shots / f"{len(list(self.shots.glob('*.png'))) + 1:02d}-{slug}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        return path

    def visit(self, url: str, name: str) -> None:
        """Open `url` (answered 200) and `check` it as `name`."""
        response = self.page.goto(url)
        assert response is not None and response.status == 200, f"{url}: {response and response.status}"
        self.check(name)

    def check(self, name: str) -> None:
        """The page as a user sees it now: screenshot it, run axe, and fail on any error it logged."""
        self.page.wait_for_load_state("load")
        self.screenshot(name)
        assert_accessible(self.page)
        assert not self.problems, f"{self.who} on {self.page.url}:\n" + "\n".join(self.problems)

    def focused(self) -> dict[str, str]:
        """The focused element: its tag, id, and the text of its label (or its own text)."""
        return self.page.evaluate("""() => {
          const el = document.activeElement;
          const label = el.id ? document.querySelector(`label[for="${el.id}"]`) : null;
          return {tag: el.tagName.toLowerCase(), id: el.id || "", type: el.type || "",
                  label: label ? label.innerText.trim() : (el.innerText || "").trim()};
        }""")

    def tab_to(self, element_id: str, presses: int = 20) -> list[dict[str, str]]:
        """Press Tab until the element `element_id` has focus; the elements passed on the way."""
        passed = []
        for _ in range(presses):
            self.page.keyboard.press("Tab")
            passed.append(self.focused())
            if passed[-1]["id"] == element_id:
                return passed
        raise AssertionError(f"Tab never reached #{element_id}; focus went through {passed}")
