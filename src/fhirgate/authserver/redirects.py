"""Redirect URI matching (RFC 6749 §3.1.2.3, RFC 9700 §4.1.3, RFC 8252 §7.3).

A requested `redirect_uri` must be one of the client's registered URIs, compared as strings: no
prefix, no normalisation, no added path segment or query. The one exception is a loopback `http`
URI, where a native app's port is chosen at run time: there the port alone may differ.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["LOOPBACK_HOSTS", "redirect_uri_matches"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "[::1]", "localhost"})

_NETLOC = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+)(?::(?P<port>[0-9]{1,5}))?$")


def _loopback_parts(uri: str) -> tuple[str, str, str] | None:
    """(host, path, query) of an `http` loopback URI without fragment or user information."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    if parts.scheme != "http" or parts.fragment or "#" in uri:
        return None
    match = _NETLOC.match(parts.netloc)
    if match is None or match["host"].lower() not in LOOPBACK_HOSTS:
        return None
    return match["host"].lower(), parts.path, parts.query


_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def redirect_uri_matches(registered: str, requested: str) -> bool:
    """Whether `requested` is `registered` (exactly, or with another port on a loopback host).
    Whitespace and control characters never match (URL parsers drop tabs and newlines silently)."""
    if _CONTROL.search(requested):
        return False
    if requested == registered:
        return True
    want = _loopback_parts(registered)
    if want is None:
        return False
    got = _loopback_parts(requested)
    return got is not None and got == want and requested.startswith("http://")
