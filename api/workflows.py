"""Workflows and legacy actions: filled in by its own change."""

from __future__ import annotations

from api.routing import Route

ROUTES: list[Route] = []
