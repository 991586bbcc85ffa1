"""Router: Kong 3.x `traditional_compatible` matching, priority and upstream path construction."""

import pytest

from fhirgate.config import load_config_dict
from fhirgate.gateway.router import Router


def make_router(*routes, service_path=None):
    """One service per route (named s<i>) so tests can tell routes apart by name."""
    services = []
    for i, route in enumerate(routes):
        service = {"name": f"s{i}", "host": f"up{i}.internal"}
        if service_path is not None:
            service["path"] = service_path
        services.append({**service, "routes": [{"name": f"r{i}", **route}]})
    config = load_config_dict({"_format_version": "3.0", "services": services})
    return Router(config.routes)


def matched_name(router, method="GET", host="example.com", path="/", headers=None, **kw):
    m = router.match(method, host, path, headers, **kw)
    return m.route.name if m else None


# --- matching ---------------------------------------------------------------------------------


def test_plain_path_is_a_prefix_match():
    router = make_router({"paths": ["/fhir"]})
    assert matched_name(router, path="/fhir") == "r0"
    assert matched_name(router, path="/fhir/Patient") == "r0"
    assert matched_name(router, path="/fhirx") == "r0"  # Kong prefixes are not segment-aware
    assert matched_name(router, path="/fhi") is None
    assert matched_name(router, path="/x/fhir") is None


def test_path_with_trailing_slash_does_not_match_the_path_without_it():
    router = make_router({"paths": ["/fhir/"]})
    assert matched_name(router, path="/fhir") is None
    assert matched_name(router, path="/fhir/") == "r0"


def test_regex_path_is_anchored_at_the_start_only():
    router = make_router({"paths": [r"~/users/\d+"]})
    assert matched_name(router, path="/users/42") == "r0"
    assert matched_name(router, path="/users/42/orders") == "r0"
    assert matched_name(router, path="/v1/users/42") is None


def test_regex_captures_expose_numbered_and_named_groups():
    router = make_router({"paths": [r"~/users/(?<id>\d+)/(\w+)"]})
    m = router.match("GET", "h", "/users/42/orders/7", None)
    assert m is not None
    assert m.matched_path == "/users/42/orders"
    assert m.uri_captures == {0: "/users/42/orders", 1: "42", 2: "orders", "id": "42"}


def test_methods_must_match_exactly():
    router = make_router({"methods": ["GET", "POST"], "paths": ["/"]})
    assert matched_name(router, method="POST") == "r0"
    assert matched_name(router, method="DELETE") is None


def test_host_matching_ignores_case_and_the_request_port():
    router = make_router({"hosts": ["api.example.com"]})
    assert matched_name(router, host="API.Example.com") == "r0"
    assert matched_name(router, host="api.example.com:8000") == "r0"
    assert matched_name(router, host="other.example.com") is None
    assert matched_name(router, host=None) is None


def test_host_with_port_matches_only_that_port():
    router = make_router({"hosts": ["api.example.com:8000"]})
    assert matched_name(router, host="api.example.com:8000") == "r0"
    assert matched_name(router, host="api.example.com:9000") is None
    assert matched_name(router, host="api.example.com") is None
    router80 = make_router({"hosts": ["api.example.com:80"]})
    assert matched_name(router80, host="api.example.com") == "r0"  # default port of http


def test_leading_wildcard_host_matches_subdomains_only():
    router = make_router({"hosts": ["*.example.com"]})
    assert matched_name(router, host="a.example.com") == "r0"
    assert matched_name(router, host="a.b.example.com:8443") == "r0"
    assert matched_name(router, host="example.com") is None


def test_trailing_wildcard_host_matches_any_suffix():
    router = make_router({"hosts": ["example.*"]})
    assert matched_name(router, host="example.org") == "r0"
    assert matched_name(router, host="example.co.uk") == "r0"
    assert matched_name(router, host="www.example.org") is None


def test_header_values_match_case_insensitively_and_all_headers_are_required():
    router = make_router({"headers": {"X-Version": ["V1", "v2"], "x-team": ["a"]}})
    assert matched_name(router, headers={"x-version": ["v1"], "x-team": ["A"]}) == "r0"
    assert matched_name(router, headers={"x-version": ["V2", "other"], "x-team": ["a"]}) == "r0"
    assert matched_name(router, headers={"x-version": ["v3"], "x-team": ["a"]}) is None
    assert matched_name(router, headers={"x-version": ["v1"]}) is None
    assert matched_name(router, headers=None) is None


def test_header_names_in_the_request_may_be_any_case():
    router = make_router({"headers": {"x-version": ["v1"]}})
    assert matched_name(router, headers={"X-Version": ["v1"]}) == "r0"


def test_header_value_with_tilde_star_is_a_case_insensitive_regex():
    router = make_router({"headers": {"user-agent": ["~*curl/[0-9.]+"]}})
    assert matched_name(router, headers={"user-agent": ["CURL/8.1"]}) == "r0"
    assert matched_name(router, headers={"user-agent": ["wget"]}) is None


def test_snis_are_checked_on_https_only():
    router = make_router({"snis": ["api.example.com"], "protocols": ["https"]})
    assert matched_name(router, scheme="https", sni="api.example.com") == "r0"
    assert matched_name(router, scheme="https", sni="other.example.com") is None
    assert matched_name(router, scheme="http") == "r0"


def test_no_route_matches_returns_none():
    router = make_router({"paths": ["/fhir"]})
    assert router.match("GET", "h", "/auth", None) is None


def test_header_routes_are_not_served_from_a_stale_cache():
    router = make_router({"headers": {"x-v": ["1"]}, "paths": ["/"]}, {"paths": ["/"]})
    assert matched_name(router, headers={"x-v": ["1"]}) == "r0"
    assert matched_name(router, headers={"x-v": ["2"]}) == "r1"
    assert matched_name(router, headers={"x-v": ["1"]}) == "r0"


def test_router_tells_whether_it_needs_request_headers():
    assert make_router({"paths": ["/"]}).uses_headers is False
    assert make_router({"paths": ["/"]}, {"headers": {"x-v": ["1"]}}).uses_headers is True


def test_repeated_match_returns_the_same_result():
    router = make_router({"paths": ["/a"]}, {"paths": ["/b"]})
    first = router.match("GET", "h", "/b/x", None)
    second = router.match("GET", "h", "/b/x", None)
    assert first is not None
    assert second is not None
    assert (
        (first.route.name, first.upstream_path) == (second.route.name, second.upstream_path) == ("r1", "/x")
    )
    assert router.match("GET", "h", "/c", None) is None
    assert router.match("GET", "h", "/c", None) is None


def test_route_without_service_matches_with_service_none():
    config = load_config_dict({"_format_version": "3.0", "routes": [{"name": "orphan", "paths": ["/x"]}]})
    m = Router(config.routes).match("GET", "h", "/x/y", None)
    assert m is not None
    assert m.service is None
    assert m.upstream_path == "/y"


# --- priority (Kong's get_priority; cases after spec/01-unit/08-router_spec.lua) -------------------


def test_route_with_more_matching_fields_wins():
    router = make_router({"paths": ["/"]}, {"paths": ["/"], "methods": ["GET"]})
    assert matched_name(router, method="GET") == "r1"
    assert matched_name(router, method="POST") == "r0"


def test_host_and_path_beat_a_longer_path_alone():
    router = make_router({"paths": ["/api/v1/very/long"]}, {"paths": ["/api"], "hosts": ["example.com"]})
    assert matched_name(router, path="/api/v1/very/long") == "r1"


def test_plain_host_beats_wildcard_host():
    router = make_router({"hosts": ["*.example.com"]}, {"hosts": ["api.example.com"]})
    assert matched_name(router, host="api.example.com") == "r1"
    assert matched_name(router, host="web.example.com") == "r0"


def test_route_with_more_headers_wins():
    router = make_router({"headers": {"x-a": ["1"]}}, {"headers": {"x-a": ["1"], "x-b": ["2"]}})
    assert matched_name(router, headers={"x-a": ["1"], "x-b": ["2"]}) == "r1"
    assert matched_name(router, headers={"x-a": ["1"]}) == "r0"


def test_regex_path_beats_plain_prefix():
    router = make_router({"paths": ["/foo/bar"]}, {"paths": ["~/foo/.*"]})
    assert matched_name(router, path="/foo/bar") == "r1"


def test_higher_regex_priority_wins_among_regex_paths():
    router = make_router(
        {"paths": ["~/status/.*"], "regex_priority": 0},
        {"paths": ["~/status/\\d+"], "regex_priority": 10},
    )
    assert matched_name(router, path="/status/200") == "r1"
    assert matched_name(router, path="/status/ok") == "r0"


def test_regex_priority_does_not_affect_plain_paths():
    router = make_router(
        {"paths": ["/v1/users"], "regex_priority": 0}, {"paths": ["/v1"], "regex_priority": 5}
    )
    assert matched_name(router, path="/v1/users/1") == "r0"


def test_longest_plain_prefix_wins():
    # Kong integration spec "prioritizes longer URIs"
    router = make_router(
        {"hosts": ["route.com"], "paths": ["/root"]},
        {"hosts": ["route.com"], "paths": ["/root/fixture"]},
    )
    assert matched_name(router, host="route.com", path="/root/fixture/get") == "r1"
    assert matched_name(router, host="route.com", path="/root/other") == "r0"


def test_equal_priority_is_resolved_by_declaration_order():
    router = make_router({"paths": ["/same"]}, {"paths": ["/same"]})
    assert matched_name(router, path="/same") == "r0"


def test_each_path_of_a_route_is_ranked_on_its_own():
    router = make_router({"paths": ["/a", "/abcdef"]}, {"paths": ["/abc"]})
    assert matched_name(router, path="/abcdefg") == "r0"
    assert matched_name(router, path="/abcx") == "r1"
    assert matched_name(router, path="/ax") == "r0"


def test_route_order_in_file_does_not_beat_priority():
    router = make_router({"paths": ["/"]}, {"paths": ["/fhir"]}, {"paths": ["/fhir"], "methods": ["GET"]})
    assert matched_name(router, path="/fhir/Patient") == "r2"
    assert matched_name(router, method="POST", path="/fhir/Patient") == "r1"
    assert matched_name(router, method="POST", path="/other") == "r0"


# --- upstream path ---------------------------------------------------------------------------------

# path_handling "v0" (Kong 3.x's only algorithm): the Route object table of Kong's Admin API docs,
# plus cases computed from `get_upstream_uri_v0`.
V0_CASES = [
    # service.path, route.path, strip_path, request, upstream
    ("/s", "/fv0", False, "/fv0req", "/s/fv0req"),
    ("/s", "/tv0", True, "/tv0req", "/s/req"),
    ("/s", "/fv0/", False, "/fv0/req", "/s/fv0/req"),
    ("/s", "/tv0/", True, "/tv0/req", "/s/req"),
    ("/", "/", True, "/", "/"),
    ("/", "/fhir", True, "/fhir/Patient/1", "/Patient/1"),
    ("/", "/fhir", True, "/fhir", "/"),
    ("/r4", "/fhir", True, "/fhir", "/r4"),
    ("/r4", "/fhir", True, "/fhir/", "/r4/"),
    ("/r4", "/fhir", True, "/fhir/Patient", "/r4/Patient"),
    ("/r4/", "/fhir", True, "/fhir", "/r4"),
    ("/r4/", "/fhir", True, "/fhir/", "/r4/"),
    ("/r4/", "/fhir", True, "/fhir/Patient", "/r4/Patient"),
    ("/r4/", "/fhir/", True, "/fhir/Patient", "/r4/Patient"),
    ("/r4", "/fhir", False, "/fhir/Patient", "/r4/fhir/Patient"),
    ("/r4/", "/fhir", False, "/fhir/Patient", "/r4/fhir/Patient"),
    ("/fee/bor", "/", True, "/foo/bar", "/fee/bor/foo/bar"),
    ("/fee/bor", "/foo/bar", True, "/foo/bars", "/fee/bor/s"),
    (None, "/fhir", True, "/fhir/metadata", "/metadata"),
    (None, "/fhir", False, "/fhir/metadata", "/fhir/metadata"),
]


@pytest.mark.parametrize(("service_path", "route_path", "strip", "request_path", "expected"), V0_CASES)
def test_upstream_path_v0(service_path, route_path, strip, request_path, expected):
    router = make_router({"paths": [route_path], "strip_path": strip}, service_path=service_path)
    m = router.match("GET", "h", request_path, None)
    assert m is not None
    assert m.upstream_path == expected


def test_upstream_path_v0_strips_the_whole_regex_match():
    router = make_router({"paths": [r"~/version/\d+/service"], "strip_path": True}, service_path="/api")
    m = router.match("GET", "h", "/version/1/service/path/to/resource", None)
    assert m is not None
    assert m.upstream_path == "/api/path/to/resource"


# Kong's "slash handling" table (spec/02-integration/05-proxy/02-router_spec.lua), which encodes the
# pre-2.0 algorithm kept as path_handling "v1": service path, route path (None: host match),
# request, expected upstream path, strip_path.
KONG_V1_CHECKS = [
    ("/", "/", "/", "/", True),
    ("/", "/", "/foo/bar", "/foo/bar", True),
    ("/", "/", "/foo/bar/", "/foo/bar/", True),
    ("/", "/foo/bar", "/foo/bar", "/", True),
    ("/", "/foo/bar", "/foo/bar/", "/", True),
    ("/", "/foo/bar/", "/foo/bar/", "/", True),
    ("/fee/bor", "/", "/", "/fee/bor", True),
    ("/fee/bor", "/", "/foo/bar", "/fee/borfoo/bar", True),
    ("/fee/bor", "/", "/foo/bar/", "/fee/borfoo/bar/", True),
    ("/fee/bor", "/foo/bar", "/foo/bar", "/fee/bor", True),
    ("/fee/bor", "/foo/bar", "/foo/bar/", "/fee/bor/", True),
    ("/fee/bor", "/foo/bar/", "/foo/bar/", "/fee/bor", True),
    ("/fee/bor/", "/", "/", "/fee/bor/", True),
    ("/fee/bor/", "/", "/foo/bar", "/fee/bor/foo/bar", True),
    ("/fee/bor/", "/", "/foo/bar/", "/fee/bor/foo/bar/", True),
    ("/fee/bor/", "/foo/bar", "/foo/bar", "/fee/bor/", True),
    ("/fee/bor/", "/foo/bar", "/foo/bar/", "/fee/bor/", True),
    ("/fee/bor/", "/foo/bar/", "/foo/bar/", "/fee/bor/", True),
    ("/", "/", "/", "/", False),
    ("/", "/", "/foo/bar", "/foo/bar", False),
    ("/", "/", "/foo/bar/", "/foo/bar/", False),
    ("/", "/foo/bar", "/foo/bar", "/foo/bar", False),
    ("/", "/foo/bar", "/foo/bar/", "/foo/bar/", False),
    ("/", "/foo/bar/", "/foo/bar/", "/foo/bar/", False),
    ("/fee/bor", "/", "/", "/fee/bor", False),
    ("/fee/bor", "/", "/foo/bar", "/fee/borfoo/bar", False),
    ("/fee/bor", "/", "/foo/bar/", "/fee/borfoo/bar/", False),
    ("/fee/bor", "/foo/bar", "/foo/bar", "/fee/borfoo/bar", False),
    ("/fee/bor", "/foo/bar", "/foo/bar/", "/fee/borfoo/bar/", False),
    ("/fee/bor", "/foo/bar/", "/foo/bar/", "/fee/borfoo/bar/", False),
    ("/fee/bor/", "/", "/", "/fee/bor/", False),
    ("/fee/bor/", "/", "/foo/bar", "/fee/bor/foo/bar", False),
    ("/fee/bor/", "/", "/foo/bar/", "/fee/bor/foo/bar/", False),
    ("/fee/bor/", "/foo/bar", "/foo/bar", "/fee/bor/foo/bar", False),
    ("/fee/bor/", "/foo/bar", "/foo/bar/", "/fee/bor/foo/bar/", False),
    ("/fee/bor/", "/foo/bar/", "/foo/bar/", "/fee/bor/foo/bar/", False),
    ("/", "/", "/foo/bars", "/foo/bars", True),
    ("/", "/", "/foo/bar/s", "/foo/bar/s", True),
    ("/", "/foo/bar", "/foo/bars", "/s", True),
    ("/", "/foo/bar/", "/foo/bar/s", "/s", True),
    ("/fee/bor", "/", "/foo/bars", "/fee/borfoo/bars", True),
    ("/fee/bor", "/", "/foo/bar/s", "/fee/borfoo/bar/s", True),
    ("/fee/bor", "/foo/bar", "/foo/bars", "/fee/bors", True),
    ("/fee/bor", "/foo/bar/", "/foo/bar/s", "/fee/bors", True),
    ("/fee/bor/", "/", "/foo/bars", "/fee/bor/foo/bars", True),
    ("/fee/bor/", "/", "/foo/bar/s", "/fee/bor/foo/bar/s", True),
    ("/fee/bor/", "/foo/bar", "/foo/bars", "/fee/bor/s", True),
    ("/fee/bor/", "/foo/bar/", "/foo/bar/s", "/fee/bor/s", True),
    ("/", "/", "/foo/bars", "/foo/bars", False),
    ("/", "/", "/foo/bar/s", "/foo/bar/s", False),
    ("/", "/foo/bar", "/foo/bars", "/foo/bars", False),
    ("/", "/foo/bar/", "/foo/bar/s", "/foo/bar/s", False),
    ("/fee/bor", "/", "/foo/bars", "/fee/borfoo/bars", False),
    ("/fee/bor", "/", "/foo/bar/s", "/fee/borfoo/bar/s", False),
    ("/fee/bor", "/foo/bar", "/foo/bars", "/fee/borfoo/bars", False),
    ("/fee/bor", "/foo/bar/", "/foo/bar/s", "/fee/borfoo/bar/s", False),
    ("/fee/bor/", "/", "/foo/bars", "/fee/bor/foo/bars", False),
    ("/fee/bor/", "/", "/foo/bar/s", "/fee/bor/foo/bar/s", False),
    ("/fee/bor/", "/foo/bar", "/foo/bars", "/fee/bor/foo/bars", False),
    ("/fee/bor/", "/foo/bar/", "/foo/bar/s", "/fee/bor/foo/bar/s", False),
    ("/", None, "/", "/", False),
    ("/", None, "/foo/bar", "/foo/bar", False),
    ("/", None, "/foo/bar/", "/foo/bar/", False),
    ("/fee/bor", None, "/", "/fee/bor", False),
    ("/fee/bor", None, "/foo/bar", "/fee/borfoo/bar", False),
    ("/fee/bor", None, "/foo/bar/", "/fee/borfoo/bar/", False),
    ("/fee/bor/", None, "/", "/fee/bor/", False),
    ("/fee/bor/", None, "/foo/bar", "/fee/bor/foo/bar", False),
    ("/fee/bor/", None, "/foo/bar/", "/fee/bor/foo/bar/", False),
    ("/", None, "/", "/", True),
    ("/", None, "/foo/bar", "/foo/bar", True),
    ("/", None, "/foo/bar/", "/foo/bar/", True),
    ("/fee/bor", None, "/", "/fee/bor", True),
    ("/fee/bor", None, "/foo/bar", "/fee/borfoo/bar", True),
    ("/fee/bor", None, "/foo/bar/", "/fee/borfoo/bar/", True),
    ("/fee/bor/", None, "/", "/fee/bor/", True),
    ("/fee/bor/", None, "/foo/bar", "/fee/bor/foo/bar", True),
    ("/fee/bor/", None, "/foo/bar/", "/fee/bor/foo/bar/", True),
]


def _v1_route(route_path, strip, regex):
    route = {"strip_path": strip, "path_handling": "v1", "hosts": ["localbin.com"]}
    if route_path is not None:
        route["paths"] = ["~/[0]?" + route_path[1:]] if regex else [route_path]
    return route


@pytest.mark.parametrize(("service_path", "route_path", "request_path", "expected", "strip"), KONG_V1_CHECKS)
def test_upstream_path_v1_plain_matches_kong_slash_handling_table(
    service_path, route_path, request_path, expected, strip
):
    router = make_router(_v1_route(route_path, strip, regex=False), service_path=service_path)
    m = router.match("GET", "localbin.com", request_path, None)
    assert m is not None
    assert m.upstream_path == expected


@pytest.mark.parametrize(
    ("service_path", "route_path", "request_path", "expected", "strip"),
    [c for c in KONG_V1_CHECKS if c[1] is not None],
)
def test_upstream_path_v1_regex_matches_kong_slash_handling_table(
    service_path, route_path, request_path, expected, strip
):
    router = make_router(_v1_route(route_path, strip, regex=True), service_path=service_path)
    m = router.match("GET", "localbin.com", request_path, None)
    assert m is not None
    assert m.upstream_path == expected
