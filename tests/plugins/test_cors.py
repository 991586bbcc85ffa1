"""`cors` (Kong's spec/03-plugins/13-cors): schema, then preflights and actual requests through a
running gateway."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from tests.harness import Reply, Upstream, running_gateway, service_config

ALL_METHODS = "GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT"
CORS_HEADERS = (
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-headers",
    "access-control-allow-methods",
    "access-control-max-age",
    "access-control-expose-headers",
    "access-control-allow-private-network",
)


def with_cors(upstream_url: str, **config: Any) -> dict[str, Any]:
    cfg = service_config(upstream_url)
    cfg["plugins"] = [{"name": "cors", "config": config}]
    return cfg


def cors_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k in CORS_HEADERS}


def preflight(url: str, origin: str = "http://app.test", **headers: str) -> httpx.Response:
    return httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "GET", **headers})


def config_issues(plugin_config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_dict({"_format_version": "3.0", "plugins": [{"name": "cors", "config": plugin_config}]})
    return [str(issue) for issue in info.value.issues]


# --- schema ---------------------------------------------------------------------------------


def test_schema_defaults_are_kongs() -> None:
    cfg = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "cors"}]})
    assert cfg.plugins[0].config.model_dump() == {
        "origins": None,
        "headers": None,
        "exposed_headers": None,
        "methods": ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"],
        "max_age": None,
        "credentials": False,
        "private_network": False,
        "preflight_continue": False,
        "allow_origin_absent": True,
    }


def test_schema_accepts_asterisk_plain_origins_and_regexes() -> None:
    origins = ["*", "http://mockbin.com", r"(.*[./])?example\.com", r"^https?://(?<sub>\w+)\.test$"]
    cfg = load_config_dict(
        {"_format_version": "3.0", "plugins": [{"name": "cors", "config": {"origins": origins}}]}
    )
    assert cfg.plugins[0].config.model_dump()["origins"] == origins


def test_schema_refuses_an_origin_that_is_not_a_valid_regex() -> None:
    assert config_issues({"origins": ["http://ok.test", "[a-z"]}) == [
        "plugins[0].config.origins[1]: '[a-z' is not a valid regex"
    ]


def test_schema_refuses_an_unknown_method() -> None:
    assert config_issues({"methods": ["GET", "FETCH"]}) == [
        "plugins[0].config.methods[1]: expected one of: " + ", ".join(ALL_METHODS.split(","))
    ]


def test_schema_refuses_unknown_fields() -> None:
    assert config_issues({"origin": "http://a.test"}) == ["plugins[0].config.origin: unknown field"]


def test_schema_refuses_cors_on_a_consumer() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {"_format_version": "3.0", "consumers": [{"username": "alice", "plugins": [{"name": "cors"}]}]}
        )
    assert [i.message for i in info.value.issues] == ["plugin 'cors' cannot be applied to a consumer"]


# --- preflight ------------------------------------------------------------------------------


def test_preflight_is_answered_by_the_gateway_with_defaults(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url)) as gw:
        resp = preflight(gw.url + "/anything", **{"Access-Control-Request-Headers": "X-One, X-Two"})
    assert resp.status_code == 200
    assert resp.content == b""
    assert cors_headers(resp) == {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": ALL_METHODS,
        "access-control-allow-headers": "X-One, X-Two",
    }
    assert "vary" not in resp.headers
    assert upstream.requests == []


def test_preflight_with_full_config_sends_every_configured_header(upstream: Upstream) -> None:
    cfg = with_cors(
        upstream.url,
        origins=["http://app.test", "http://other.test"],
        methods=["GET", "POST"],
        headers=["x-auth", "content-type"],
        exposed_headers=["x-exposed"],
        max_age=23,
        credentials=True,
        private_network=True,
    )
    with running_gateway(cfg) as gw:
        resp = preflight(
            gw.url + "/",
            **{"Access-Control-Request-Headers": "x-other", "Access-Control-Request-Private-Network": "true"},
        )
    assert resp.status_code == 200
    assert cors_headers(resp) == {
        "access-control-allow-origin": "http://app.test",
        "access-control-allow-credentials": "true",
        "access-control-allow-headers": "x-auth,content-type",
        "access-control-allow-methods": "GET,POST",
        "access-control-max-age": "23",
        "access-control-allow-private-network": "true",
    }
    assert resp.headers.get_list("vary") == ["Origin"]
    assert upstream.requests == []


def test_preflight_without_private_network_request_gets_no_private_network_header(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url, private_network=True)) as gw:
        resp = preflight(gw.url + "/")
    assert resp.status_code == 200
    assert "access-control-allow-private-network" not in resp.headers


def test_preflight_from_an_origin_not_allowed_gets_no_allow_origin(upstream: Upstream) -> None:
    cfg = with_cors(upstream.url, origins=["http://app.test", "http://other.test"], max_age=1.5)
    with running_gateway(cfg) as gw:
        resp = preflight(gw.url + "/", origin="http://evil.test")
    assert resp.status_code == 200
    assert "access-control-allow-origin" not in resp.headers
    assert resp.headers["access-control-max-age"] == "1.5"
    assert resp.headers.get_list("vary") == ["Origin"]
    assert upstream.requests == []


def test_preflight_continue_hands_the_preflight_to_the_upstream_untouched(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(
        status=204, headers=[("Access-Control-Allow-Origin", "upstream")], body=b""
    )
    with running_gateway(with_cors(upstream.url, preflight_continue=True)) as gw:
        resp = preflight(gw.url + "/pre")
    assert resp.status_code == 204
    assert cors_headers(resp) == {"access-control-allow-origin": "upstream"}
    assert [(r.method, r.target) for r in upstream.requests] == [("OPTIONS", "/pre")]


def test_options_without_request_method_is_not_a_preflight(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url)) as gw:
        resp = httpx.options(gw.url + "/opt", headers={"Origin": "http://app.test"})
    assert resp.status_code == 200
    assert resp.json() == {"path": "/opt", "method": "OPTIONS"}
    assert resp.headers["access-control-allow-origin"] == "*"
    assert len(upstream.requests) == 1


# --- actual requests ------------------------------------------------------------------------


def test_response_allows_every_origin_by_default_without_vary(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url, exposed_headers=["x-one", "x-two"])) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "http://app.test"})
    assert resp.status_code == 200
    assert cors_headers(resp) == {
        "access-control-allow-origin": "*",
        "access-control-expose-headers": "x-one,x-two",
    }
    assert "vary" not in resp.headers


def test_allowed_origin_is_echoed_and_vary_origin_added_to_the_upstreams_vary(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(headers=[("Vary", "Accept-Encoding")], body=b"ok")
    cfg = with_cors(upstream.url, origins=["http://app.test", "https://other.test:8443"])
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "https://other.test:8443"})
    assert resp.headers["access-control-allow-origin"] == "https://other.test:8443"
    assert resp.headers.get_list("vary") == ["Accept-Encoding", "Origin"]


def test_origin_not_allowed_gets_no_allow_origin_even_from_the_upstream(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(headers=[("Access-Control-Allow-Origin", "*")], body=b"ok")
    cfg = with_cors(upstream.url, origins=["http://app.test", "http://other.test"], credentials=True)
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "http://evil.test"})
    assert resp.status_code == 200
    assert "access-control-allow-origin" not in resp.headers
    assert resp.headers["access-control-allow-credentials"] == "true"  # as Kong: set whatever the origin
    assert resp.headers.get_list("vary") == ["Origin"]


def test_default_ports_are_ignored_when_comparing_origins(upstream: Upstream) -> None:
    cfg = with_cors(upstream.url, origins=["https://app.test:443", "http://other.test"])
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "https://app.test"})
        other_port = httpx.get(gw.url + "/", headers={"Origin": "https://app.test:8443"})
    assert resp.headers["access-control-allow-origin"] == "https://app.test"
    assert "access-control-allow-origin" not in other_port.headers


@pytest.mark.parametrize(
    ("origins", "request_origin", "allowed"),
    [
        # A regex without ':' is matched against the origin's host only.
        ([r".+\.example\.com", "http://x.test"], "https://api.example.com", True),
        ([r".+\.example\.com", "http://x.test"], "https://api.example.com:9000", True),
        ([r".+\.example\.com", "http://x.test"], "https://api.example.com.evil.test", False),
        # With ':' it is matched against the whole origin.
        ([r"https://.+\.example\.com:8443", "http://x.test"], "https://a.example.com:8443", True),
        ([r"https://.+\.example\.com:8443", "http://x.test"], "http://a.example.com:8443", False),
        # The user's own anchors are accepted.
        ([r"^https://app\.test$", "http://x.test"], "https://app.test", True),
        # An alternation must match the whole origin, never a prefix of it.
        ([r"http://a\.test|http://b\.test"], "http://a.test.evil.test", False),
        ([r"http://a\.test|http://b\.test"], "http://b.test", True),
    ],
)
def test_regex_origins_match_the_whole_origin_or_host(
    upstream: Upstream, origins: list[str], request_origin: str, allowed: bool
) -> None:
    with running_gateway(with_cors(upstream.url, origins=origins)) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": request_origin})
    assert resp.headers.get("access-control-allow-origin") == (request_origin if allowed else None)
    assert resp.headers.get_list("vary") == ["Origin"]


def test_single_plain_origin_is_sent_whatever_the_request_origin(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url, origins=["http://app.test"])) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "http://evil.test"})
        without = httpx.get(gw.url + "/")
    assert resp.headers["access-control-allow-origin"] == "http://app.test"
    assert without.headers["access-control-allow-origin"] == "http://app.test"
    assert resp.headers.get_list("vary") == ["Origin"]


def test_asterisk_among_several_origins_allows_every_origin(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url, origins=["http://app.test", "*"])) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "http://anyone.test"})
    assert resp.headers["access-control-allow-origin"] == "*"
    assert "vary" not in resp.headers


def test_credentials_with_every_origin_allowed_echo_the_origin(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url, origins=["*"], credentials=True)) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "http://app.test"})
        without = httpx.get(gw.url + "/")
    assert cors_headers(resp) == {
        "access-control-allow-origin": "http://app.test",
        "access-control-allow-credentials": "true",
    }
    assert resp.headers.get_list("vary") == ["Origin"]
    # No origin to echo: `*`, and never `Allow-Credentials: true` with it.
    assert cors_headers(without) == {"access-control-allow-origin": "*"}


def test_allow_origin_absent_false_adds_no_headers_without_origin(upstream: Upstream) -> None:
    cfg = with_cors(upstream.url, allow_origin_absent=False, exposed_headers=["x-one"])
    with running_gateway(cfg) as gw:
        without = httpx.get(gw.url + "/")
        with_origin = httpx.get(gw.url + "/", headers={"Origin": "http://app.test"})
    assert cors_headers(without) == {}
    assert cors_headers(with_origin) == {
        "access-control-allow-origin": "*",
        "access-control-expose-headers": "x-one",
    }


def test_allow_origin_absent_default_adds_headers_without_origin(upstream: Upstream) -> None:
    with running_gateway(with_cors(upstream.url)) as gw:
        resp = httpx.get(gw.url + "/")
    assert cors_headers(resp) == {"access-control-allow-origin": "*"}


def test_refusals_by_later_plugins_carry_cors_headers(upstream: Upstream) -> None:
    cfg = with_cors(upstream.url, origins=["http://app.test", "http://other.test"])
    cfg["plugins"].append({"name": "ip-restriction", "config": {"deny": ["127.0.0.1"]}})
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/", headers={"Origin": "http://app.test"})
    assert resp.status_code == 403
    assert resp.json() == {"message": "IP address not allowed: 127.0.0.1"}
    assert resp.headers["access-control-allow-origin"] == "http://app.test"
    assert resp.headers.get_list("vary") == ["Origin"]
    assert upstream.requests == []


def test_preflight_is_answered_before_plugins_that_would_refuse(upstream: Upstream) -> None:
    # CORS (2000) runs before ip-restriction (990): a browser's preflight never hits auth/ACLs.
    cfg = with_cors(upstream.url)
    cfg["plugins"].append({"name": "ip-restriction", "config": {"deny": ["127.0.0.1"]}})
    with running_gateway(cfg) as gw:
        resp = preflight(gw.url + "/")
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "*"
    assert upstream.requests == []
