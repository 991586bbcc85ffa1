"""Kong 3.x router, `traditional_compatible` flavour, for http/https routes.

Matching (Kong docs "Traditional router", "Routing criteria"): a route matches when every field it
sets matches (any one value per field): `methods` (exact), `hosts` (exact, ``*.example.com``
suffix or ``example.*`` prefix wildcard; the port is compared only when the route's host has one),
`headers` (case-insensitive values; ``~*`` values are regexes searched in the lower-cased value),
`paths` (plain paths are prefixes; ``~`` paths are regexes anchored at the start), `snis` (only
checked on https requests, as in Kong).

Priority (Kong's `kong/router/transform.lua` `get_priority`, highest first; a route with several
paths is split into one candidate per regex group / per plain-path length, as in
`split_routes_and_services_by_path`):

1. number of fields set among methods, hosts, headers, snis, paths;
2. hosts set and none of them a wildcard;
3. number of headers;
4. regex path (over plain path);
5. `regex_priority` (regex paths only);
6. length of the plain path (longest prefix wins);
7. declaration order in the configuration.

Step 7 deviates slightly: Kong's ATC router breaks ties by route UUID, which its docs call
undefined; fhirgate uses declaration order (Kong's older `created_at` order), which is stable and
predictable.

The upstream path is built as Kong does (`kong/router/utils.lua` `get_upstream_uri_v0`, and the
`path_handling` "v1" branch of `kong/router/traditional.lua`). Kong 3.x's default router ignores
"v1" and always uses "v0"; fhirgate honours "v1" as documented in Kong's Route object table, and
`fhirgate config check` warns about it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from fhirgate.config.model import Route, Service
from fhirgate.config.schema import compile_route_regex
from fhirgate.gateway.normalize import BadPathError, normalize_path

__all__ = ["RouteMatch", "Router"]

_NO_CAPTURES: Mapping[int | str, str] = MappingProxyType({})
_CACHE_SIZE: Final = 4096
_MISS: Final = object()


@dataclass(frozen=True, slots=True, eq=False)
class RouteMatch:
    """The route chosen for a request and what to send upstream."""

    route: Route
    service: Service | None
    #: Path to send upstream (before the query string), computed from `service.path`,
    #: `strip_path` and `path_handling` exactly as Kong does.
    upstream_path: str
    #: The plain prefix or the text the regex matched; None when the route has no paths.
    matched_path: str | None
    #: Regex captures as in Kong's `uri_captures`: 0 the whole match, 1.. the groups, names for
    #: named groups (groups that did not participate are left out).
    uri_captures: Mapping[int | str, str] = field(default_factory=lambda: _NO_CAPTURES)


@dataclass(frozen=True, slots=True)
class _Host:
    value: str  # lower-case, without wildcard and port
    kind: int  # 0 exact, 1 suffix ("*.x" -> ".x"), 2 prefix ("x.*" -> "x.")
    port: int | None


def _split_host_port(host: str) -> tuple[str, int | None]:
    """`example.com:8000` -> (`example.com`, 8000); IPv6 literals keep their brackets."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0 and host[end + 1 : end + 2] == ":" and host[end + 2 :].isdigit():
            return host[: end + 1], int(host[end + 2 :])
        return host, None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, int(port)
    return host, None


def _parse_route_host(raw: str) -> _Host:
    host, port = _split_host_port(raw.lower())
    if host.startswith("*"):
        return _Host(host[1:], 1, port)
    if host.endswith("*"):
        return _Host(host[:-1], 2, port)
    return _Host(host, 0, port)


class _Candidate:
    """One route (or one path group of a route) compiled for matching."""

    __slots__ = (
        "exact_hosts",
        "header_rules",
        "hosts",
        "methods",
        "order",
        "prefixes",
        "priority",
        "regexes",
        "route",
        "snis",
    )

    def __init__(self, route: Route, paths: Sequence[str], order: int) -> None:
        self.route = route
        self.order = order
        self.methods: frozenset[str] | None = frozenset(route.methods) if route.methods else None
        hosts = [_parse_route_host(h) for h in route.hosts]
        self.hosts: tuple[_Host, ...] | None = tuple(hosts) if hosts else None
        # Fast path: exact hosts without a port are a set lookup.
        self.exact_hosts: frozenset[str] | None = None
        if hosts and all(h.kind == 0 and h.port is None for h in hosts):
            self.exact_hosts = frozenset(h.value for h in hosts)
        self.header_rules: tuple[tuple[str, frozenset[str], tuple[re.Pattern[str], ...]], ...] = tuple(
            (
                name.lower(),
                frozenset(v.lower() for v in values if not v.startswith("~*")),
                tuple(re.compile(v[2:].lower()) for v in values if v.startswith("~*")),
            )
            for name, values in route.headers.items()
        )
        self.snis: tuple[_Host, ...] | None = tuple(_parse_route_host(s) for s in route.snis) or None
        self.regexes: tuple[re.Pattern[str], ...] = tuple(
            compile_route_regex(p) for p in paths if p.startswith("~")
        )
        self.prefixes: tuple[str, ...] = tuple(_normalize_prefix(p) for p in paths if not p.startswith("~"))

        weight = sum(
            1 for present in (route.methods, route.hosts, route.headers, route.snis, paths) if present
        )
        plain_hosts_only = bool(hosts) and not any("*" in h for h in route.hosts)
        is_regex = bool(self.regexes)
        self.priority: tuple[int, ...] = (
            weight,
            int(plain_hosts_only),
            len(route.headers),
            int(is_regex),
            route.regex_priority if is_regex else 0,
            0 if is_regex or not paths else len(paths[0]),
        )

    def match_host(self, host: str, port: int | None) -> bool:
        if self.exact_hosts is not None:
            return host in self.exact_hosts
        assert self.hosts is not None
        for h in self.hosts:
            if h.port is not None and h.port != port:
                continue
            if h.kind == 0:
                if host == h.value:
                    return True
            elif h.kind == 1:
                if host.endswith(h.value):
                    return True
            elif host.startswith(h.value):
                return True
        return False

    def match_sni(self, sni: str | None) -> bool:
        if sni is None:
            return False
        sni = sni.lower().rstrip(".")
        assert self.snis is not None
        for h in self.snis:
            if (
                (h.kind == 0 and sni == h.value.rstrip("."))
                or (h.kind == 1 and sni.endswith(h.value))
                or (h.kind == 2 and sni.startswith(h.value))
            ):
                return True
        return False

    def match_headers(self, headers: Mapping[str, Sequence[str]]) -> bool:
        for name, plain, patterns in self.header_rules:
            values = headers.get(name)
            if not values:
                return False
            for value in values:
                low = value.lower()
                if low in plain or any(p.search(low) for p in patterns):
                    break
            else:
                return False
        return True


def _normalize_prefix(path: str) -> str:
    try:
        return normalize_path(path)
    except BadPathError:  # refused by the loader already; keep as written
        return path


def _sanitize_postfix(postfix: str) -> str:
    # kong/router/utils.lua `sanitize_uri_postfix`
    if postfix in (".", ".."):
        return ""
    if postfix.startswith("./"):
        return postfix[2:]
    if postfix.startswith("../"):
        return postfix[3:]
    return postfix


def upstream_path_v0(base: str, postfix: str, req_path: str, strip_path: bool) -> str:
    """Kong's `get_upstream_uri_v0` (`kong/router/utils.lua`)."""
    if base.endswith("/"):
        if strip_path:
            if not postfix:
                if base == "/":
                    return "/"
                if req_path.endswith("/"):
                    return base
                return base[:-1]
            if postfix.startswith("/"):
                return base[:-1] + postfix
            return base + postfix
        return base + req_path[1:]
    if strip_path:
        if not postfix:
            if len(req_path) > 1 and req_path.endswith("/"):
                return base + "/"
            return base
        if postfix.startswith("/"):
            return base + postfix
        return base + "/" + postfix
    if req_path == "/":
        return base
    return base + req_path


def upstream_path_v1(base: str, postfix: str, req_path: str, strip_path: bool) -> str:
    """The `path_handling == "v1"` branch of Kong's `kong/router/traditional.lua`."""
    if strip_path:
        if base.endswith("/") and postfix.startswith("/"):
            return base[:-1] + postfix
        return base + postfix
    return base + req_path[1:]


def build_upstream_path(
    route: Route, service: Service | None, req_path: str, matched_path: str | None
) -> str:
    """The path Kong sends upstream for `req_path` (normalized) matched by `route`."""
    strip = route.strip_path
    # Kong: the postfix is what follows the matched part when stripping, else the path minus "/".
    postfix = req_path[len(matched_path) :] if strip and matched_path is not None else req_path[1:]
    base = (service.path if service is not None else None) or "/"
    if route.path_handling == "v1":
        return upstream_path_v1(base, postfix, req_path, strip)
    return upstream_path_v0(base, _sanitize_postfix(postfix), req_path, strip)


class Router:
    """Routes requests to the configured routes. Built once per configuration; `match` is the hot path."""

    def __init__(self, routes: Sequence[Route]) -> None:
        candidates: list[_Candidate] = []
        for order, route in enumerate(routes):
            for group in _path_groups(route.paths):
                candidates.append(_Candidate(route, group, order))
        candidates.sort(key=lambda c: (tuple(-p for p in c.priority), c.order))
        self._candidates: tuple[_Candidate, ...] = tuple(candidates)
        self._uses_headers = any(c.header_rules for c in candidates)
        self._uses_hosts = any(c.hosts is not None for c in candidates)
        self._uses_ports_or_snis = any(
            c.snis is not None or (c.hosts is not None and any(h.port is not None for h in c.hosts))
            for c in candidates
        )
        # A cache keyed on the request's routing inputs; only when no route reads headers
        # (headers are unbounded input, Kong folds them into its key; we skip the cache instead).
        self._cache: dict[tuple[str, ...], RouteMatch | None] | None = None if self._uses_headers else {}

    @property
    def uses_headers(self) -> bool:
        """True when some route matches on headers: only then does `match` need `headers`."""
        return self._uses_headers

    @property
    def routes_count(self) -> int:
        return len({id(c.route) for c in self._candidates})

    def match(
        self,
        method: str,
        host: str | None,
        path: str,
        headers: Mapping[str, Sequence[str]] | None = None,
        *,
        scheme: str = "http",
        sni: str | None = None,
    ) -> RouteMatch | None:
        """The best route for a request, or None (Kong answers 404 "no Route matched with those values").

        `host` is the raw Host header (port included, any case); `path` is already normalized
        (`fhirgate.gateway.normalize.normalize_path`) and has no query string; header names in
        `headers` are expected lower-case (values any case).
        """
        cache = self._cache
        if cache is not None:
            if self._uses_ports_or_snis:
                key: tuple[str, ...] = (method, host or "", path, scheme, sni or "")
            elif self._uses_hosts:
                key = (method, host or "", path)
            else:
                key = (method, path)  # no route looks at the host: one entry serves every host
            hit = cache.get(key, _MISS)
            if hit is not _MISS:
                return hit  # type: ignore[return-value]
            result = self._find(method, host, path, headers, scheme, sni)
            if len(cache) >= _CACHE_SIZE:
                # Start afresh rather than evict one by one: deleting from the front of a dict
                # makes the next `next(iter(dict))` scan the holes (O(n) per eviction).
                cache.clear()
            cache[key] = result
            return result
        return self._find(method, host, path, headers, scheme, sni)

    def _find(
        self,
        method: str,
        raw_host: str | None,
        path: str,
        headers: Mapping[str, Sequence[str]] | None,
        scheme: str,
        sni: str | None,
    ) -> RouteMatch | None:
        host: str | None = None
        port: int | None = None
        if raw_host and self._uses_hosts:
            host, port = _split_host_port(raw_host.lower())
            if port is None:
                port = 443 if scheme == "https" else 80
        if headers and self._uses_headers and any(k.lower() != k for k in headers):
            headers = {k.lower(): v for k, v in headers.items()}
        for c in self._candidates:
            if c.methods is not None and method not in c.methods:
                continue
            if c.hosts is not None and (host is None or not c.match_host(host, port)):
                continue
            if c.header_rules and (not headers or not c.match_headers(headers)):
                continue
            if c.snis is not None and scheme == "https" and not c.match_sni(sni):
                continue
            matched_path: str | None = None
            captures = _NO_CAPTURES
            if c.regexes:
                for rx in c.regexes:
                    m = rx.match(path)
                    if m is not None:
                        matched_path = m.group(0)
                        captures = _captures(m)
                        break
                else:
                    continue
            elif c.prefixes:
                for prefix in c.prefixes:
                    if path.startswith(prefix):
                        matched_path = prefix
                        break
                else:
                    continue
            route = c.route
            return RouteMatch(
                route=route,
                service=route.service,
                upstream_path=build_upstream_path(route, route.service, path, matched_path),
                matched_path=matched_path,
                uri_captures=captures,
            )
        return None


def _captures(m: re.Match[str]) -> Mapping[int | str, str]:
    out: dict[int | str, str] = {0: m.group(0)}
    for i, g in enumerate(m.groups(), start=1):
        if g is not None:
            out[i] = g
    for name, g in m.groupdict().items():
        if g is not None:
            out[name] = g
    return MappingProxyType(out)


def _path_groups(paths: Sequence[str]) -> list[tuple[str, ...]]:
    """Kong's `group_by_regex_or_length`: all regex paths together, plain paths by length."""
    if not paths:
        return [()]
    groups: dict[int, list[str]] = {}
    for p in paths:
        groups.setdefault(-1 if p.startswith("~") else len(p), []).append(p)
    return [tuple(g) for g in groups.values()]
