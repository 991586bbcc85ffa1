"""FHIR R4 search: request parsing into the query AST (`model.SearchQuery`)."""

from __future__ import annotations

from .parse import PREFIXES, parse_search

__all__ = ["PREFIXES", "parse_search"]
