"""mypy, run as a developer runs it (plain `mypy` in the checkout: the settings and the packages it checks are
pyproject.toml's [tool.mypy]), reports no error. The grammars' value types and node unions are Annotated type
aliases it understands, not the results of function calls (issue 21)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.servers import ROOT


def test_mypy_reports_no_errors():
    pytest.importorskip("mypy")
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert result.stdout.startswith("Success: no issues found"), result.stdout
