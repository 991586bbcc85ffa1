"""Kong's `cors` plugin (`kong/plugins/cors/handler.lua`, priority 2000).

- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered in
  the access phase with 200 and the CORS headers, without contacting the upstream, unless
  `preflight_continue` hands it to the upstream untouched.
- Any other response (the upstream's, or one another plugin or the gateway produced) gets
  ``Access-Control-Allow-Origin``, ``-Allow-Credentials`` and ``-Expose-Headers`` in the header
  filter; ``Vary: Origin`` is added whenever the answer depends on the request's origin.

Origins are compiled once per configuration; only the request's ``Origin`` is parsed per request
(and cached).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.cors.schema import CorsConfig, compile_origin_regex

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK

# An origin entry with any other character is a regex (Kong: `[^A-Za-z0-9.:/-]`).
_PLAIN_ORIGIN = re.compile(r"[A-Za-z0-9.:/-]+")
_ORIGIN_PARTS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/?#@]*@)?(\[[^\]]*\]|[^/?#:]*)(?::([^/?#]*))?")
_SKIP = "skip_response_headers"


@dataclass(frozen=True, slots=True)
class _Origin:
    """An origin reduced as Kong's `normalize_origin` does: `scheme://host[:port]` without a
    default port, and its host."""

    domain: str
    host: str


@lru_cache(maxsize=10_000)
def normalize_origin(origin: str) -> _Origin:
    m = _ORIGIN_PARTS.match(origin)
    if m is None or not m.group(2):
        return _Origin(origin, origin)
    scheme, host, port = m.group(1), m.group(2), m.group(3)
    if (scheme == "http" and port == "80") or (scheme == "https" and port == "443"):
        port = None
    return _Origin(f"{scheme}://{host}" + (f":{port}" if port else ""), host)


@dataclass(frozen=True, slots=True)
class _Matcher:
    regex: re.Pattern[str] | None
    domain: str
    by_host: bool  # a regex without ':' is matched against the origin's host only

    def matches(self, origin: _Origin) -> bool:
        if self.regex is None:
            return origin.domain == self.domain
        return self.regex.fullmatch(origin.host if self.by_host else origin.domain) is not None


def _compile(entry: str) -> _Matcher:
    by_host = ":" not in entry
    if _PLAIN_ORIGIN.fullmatch(entry):
        return _Matcher(None, normalize_origin(entry).domain, by_host)
    # Kong anchors the regex at both ends (stripping the user's own `^`); a full match does the
    # same, and also keeps an unparenthesised alternation (`a\.com|b\.com`) from matching a prefix.
    return _Matcher(compile_origin_regex(entry.removeprefix("^")), "", by_host)


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


class Handler(Plugin):
    name = "cors"
    priority = 2000
    Config = CorsConfig
    no_consumer = True
    description = "Answer CORS preflight requests and add CORS headers to responses."

    config: CorsConfig

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        if not isinstance(config, CorsConfig):
            raise TypeError(f"cors: expected CorsConfig, got {type(config).__name__}")
        super().__init__(config, instance_id)
        self.config = config
        origins = config.origins or []
        # Kong 3.8+: `*` among several entries allows every origin too.
        self._allow_all = not origins or "*" in origins
        # A single plain origin is sent as is, whatever the request's origin (Kong).
        self._fixed_origin: str | None = None
        if len(origins) == 1 and not self._allow_all and _PLAIN_ORIGIN.fullmatch(origins[0]):
            self._fixed_origin = origins[0]
        self._matchers = [] if self._allow_all else [_compile(o) for o in origins]
        self._methods = ",".join(config.methods)
        self._allow_headers = ",".join(config.headers) if config.headers else None
        self._expose_headers = ",".join(config.exposed_headers) if config.exposed_headers else None
        self._max_age = _number(config.max_age) if config.max_age is not None else None

    # --- the decision, shared by both phases ------------------------------------------------
    def _origin_headers(self, req_origin: str | None) -> tuple[str | None, bool, bool]:
        """(Access-Control-Allow-Origin or None to remove it, allow_credentials, vary)."""
        credentials = self.config.credentials
        if self._allow_all:
            if not credentials:
                return "*", False, False
            # `Access-Control-Allow-Credentials: true` is not allowed with `*`: echo the origin.
            if req_origin:
                return req_origin, True, True
            return "*", False, False
        if self._fixed_origin is not None:
            return self._fixed_origin, credentials, True
        if req_origin:
            origin = normalize_origin(req_origin)
            for matcher in self._matchers:
                if matcher.matches(origin):
                    return origin.domain, credentials, True
        return None, credentials, True

    # --- phases ------------------------------------------------------------------------------
    def access(self, kong: PDK) -> None:
        request = kong.request
        if request.get_method() != "OPTIONS":
            return
        req_origin = request.get_header("Origin")
        if not req_origin or not request.get_header("Access-Control-Request-Method"):
            return
        # Either the upstream answers the preflight, or we do now: no headers in header_filter.
        kong.ctx.plugin[_SKIP] = True
        config = self.config
        if config.preflight_continue:
            return
        headers: dict[str, str] = {}
        acao, credentials, vary = self._origin_headers(req_origin)
        if acao is not None:
            headers["Access-Control-Allow-Origin"] = acao
        if credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        if vary:
            headers["Vary"] = "Origin"
        if self._allow_headers is not None:
            headers["Access-Control-Allow-Headers"] = self._allow_headers
        else:
            requested = request.get_header("Access-Control-Request-Headers")
            if requested:
                headers["Access-Control-Allow-Headers"] = requested
        headers["Access-Control-Allow-Methods"] = self._methods
        if self._max_age is not None:
            headers["Access-Control-Max-Age"] = self._max_age
        if config.private_network and request.get_header("Access-Control-Request-Private-Network") == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
        kong.response.exit(200, None, headers)

    def header_filter(self, kong: PDK) -> None:
        if kong.ctx.plugin.get(_SKIP):
            return
        req_origin = kong.request.get_header("Origin") or None
        if req_origin is None and not self.config.allow_origin_absent:
            return
        response = kong.response
        acao, credentials, vary = self._origin_headers(req_origin)
        if acao is None:
            response.clear_header("Access-Control-Allow-Origin")
        else:
            response.set_header("Access-Control-Allow-Origin", acao)
        if credentials:
            response.set_header("Access-Control-Allow-Credentials", "true")
        if vary:
            # Added, not set: the upstream's own `Vary` stays (Kong #5794).
            response.add_header("Vary", "Origin")
        if self._expose_headers is not None:
            response.set_header("Access-Control-Expose-Headers", self._expose_headers)


__all__ = ["Handler", "normalize_origin"]
