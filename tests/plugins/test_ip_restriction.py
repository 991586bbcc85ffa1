"""`ip-restriction` (Kong's spec/03-plugins/17-ip-restriction): schema, the address-range set, and
access through a running gateway (the test client is 127.0.0.1; other addresses arrive through
`X-Forwarded-For` from a trusted proxy)."""

from __future__ import annotations

import ipaddress
from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from fhirgate.gateway.plugins.ip_restriction.handler import RangeSet, client_address
from tests.harness import Upstream, running_gateway, service_config

AT_LEAST_ONE = "at least one of these fields must be non-empty: 'config.allow', 'config.deny'"


def with_ip_restriction(upstream_url: str, **config: Any) -> dict[str, Any]:
    cfg = service_config(upstream_url)
    cfg["plugins"] = [{"name": "ip-restriction", "config": config}]
    return cfg


def config_issues(plugin_config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {"_format_version": "3.0", "plugins": [{"name": "ip-restriction", "config": plugin_config}]}
        )
    return [str(issue) for issue in info.value.issues]


def assert_refused(resp: httpx.Response, upstream: Upstream, message: str, status: int = 403) -> None:
    assert resp.status_code == status
    assert resp.json() == {"message": message}
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    assert upstream.requests == []


# --- schema ---------------------------------------------------------------------------------


def test_schema_defaults_leave_status_and_message_unset() -> None:
    cfg = load_config_dict(
        {
            "_format_version": "3.0",
            "plugins": [{"name": "ip-restriction", "config": {"allow": ["10.0.0.0/8"]}}],
        }
    )
    assert cfg.plugins[0].config.model_dump() == {
        "allow": ["10.0.0.0/8"],
        "deny": None,
        "status": None,
        "message": None,
    }


def test_schema_accepts_ipv4_ipv6_addresses_and_ranges() -> None:
    entries = ["127.0.0.1", "10.0.0.0/8", "10.1.2.3/16", "::1", "2001:db8::/32", "0.0.0.0/0"]
    cfg = load_config_dict(
        {"_format_version": "3.0", "plugins": [{"name": "ip-restriction", "config": {"deny": entries}}]}
    )
    assert cfg.plugins[0].config.model_dump()["deny"] == entries


@pytest.mark.parametrize("config", [{}, {"allow": [], "deny": []}, {"status": 401}])
def test_schema_requires_allow_or_deny(config: dict[str, Any]) -> None:
    assert config_issues(config) == [f"plugins[0].config: {AT_LEAST_ONE}"]


@pytest.mark.parametrize("bad", ["hello", "127.0.0.256", "10.0.0.0/33", "::g", "2001:db8::/129", ""])
def test_schema_refuses_what_is_not_an_ip_or_cidr(bad: str) -> None:
    assert config_issues({"allow": ["127.0.0.1", bad]}) == [
        f"plugins[0].config.allow[1]: invalid ip or cidr range: '{bad}'"
    ]


def test_schema_refuses_a_status_that_is_not_http() -> None:
    assert config_issues({"deny": ["10.0.0.1"], "status": 1000}) == [
        "plugins[0].config.status: Input should be less than or equal to 599"
    ]


# --- the range set --------------------------------------------------------------------------


def test_range_set_merges_overlapping_ranges_and_finds_edges() -> None:
    rs = RangeSet(["10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", "192.168.1.7", "2001:db8::/126"])
    inside = ["10.0.0.0", "10.0.0.255", "10.0.1.255", "192.168.1.7", "2001:db8::3"]
    outside = ["9.255.255.255", "10.0.2.0", "192.168.1.6", "192.168.1.8", "2001:db8::4", "::"]
    assert all(ipaddress.ip_address(a) in rs for a in inside)
    assert not any(ipaddress.ip_address(a) in rs for a in outside)


def test_range_set_keeps_families_apart() -> None:
    rs = RangeSet(["0.0.0.0/0"])
    assert ipaddress.ip_address("1.2.3.4") in rs
    assert ipaddress.ip_address("::1") not in rs
    assert not RangeSet([])


def test_ipv4_mapped_ipv6_client_is_checked_as_ipv4() -> None:
    assert client_address("::ffff:10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert client_address("2001:db8::1") == ipaddress.ip_address("2001:db8::1")
    assert client_address("not-an-ip") is None


# --- access ---------------------------------------------------------------------------------


def test_denied_client_gets_403_with_its_address(upstream: Upstream) -> None:
    with running_gateway(with_ip_restriction(upstream.url, deny=["127.0.0.1"])) as gw:
        resp = httpx.get(gw.url + "/")
    assert_refused(resp, upstream, "IP address not allowed: 127.0.0.1")


def test_client_outside_the_deny_list_passes(upstream: Upstream) -> None:
    with running_gateway(with_ip_restriction(upstream.url, deny=["10.0.0.0/8", "::1"])) as gw:
        resp = httpx.get(gw.url + "/ok")
    assert resp.status_code == 200
    assert [r.target for r in upstream.requests] == ["/ok"]


def test_client_inside_the_allow_list_passes(upstream: Upstream) -> None:
    with running_gateway(with_ip_restriction(upstream.url, allow=["10.0.0.1", "127.0.0.0/8"])) as gw:
        resp = httpx.get(gw.url + "/ok")
    assert resp.status_code == 200
    assert len(upstream.requests) == 1


def test_client_outside_the_allow_list_is_refused(upstream: Upstream) -> None:
    with running_gateway(with_ip_restriction(upstream.url, allow=["10.0.0.0/8"])) as gw:
        resp = httpx.post(gw.url + "/", content=b"x" * 1000)
    assert_refused(resp, upstream, "IP address not allowed: 127.0.0.1")


def test_deny_wins_over_allow(upstream: Upstream) -> None:
    cfg = with_ip_restriction(upstream.url, allow=["127.0.0.0/8"], deny=["127.0.0.1"])
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/")
    assert_refused(resp, upstream, "IP address not allowed: 127.0.0.1")


def test_configured_status_and_message_are_used(upstream: Upstream) -> None:
    cfg = with_ip_restriction(upstream.url, deny=["127.0.0.1"], status=401, message="Go away")
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/")
    assert_refused(resp, upstream, "Go away", status=401)


def test_forwarded_address_from_a_trusted_proxy_is_the_one_checked(upstream: Upstream) -> None:
    cfg = with_ip_restriction(upstream.url, deny=["10.0.0.0/8"])
    with running_gateway(cfg, trusted_ips=["127.0.0.1"], real_ip_header="X-Forwarded-For") as gw:
        denied = httpx.get(gw.url + "/", headers={"X-Forwarded-For": "10.1.2.3"})
        assert_refused(denied, upstream, "IP address not allowed: 10.1.2.3")
        allowed = httpx.get(gw.url + "/", headers={"X-Forwarded-For": "10.1.2.3, 192.0.2.1"})
    assert allowed.status_code == 200
    assert len(upstream.requests) == 1


def test_forwarded_address_from_an_untrusted_peer_is_ignored(upstream: Upstream) -> None:
    with running_gateway(with_ip_restriction(upstream.url, allow=["10.0.0.0/8"])) as gw:
        resp = httpx.get(gw.url + "/", headers={"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3"})
    assert_refused(resp, upstream, "IP address not allowed: 127.0.0.1")


def test_ipv6_client_is_matched_against_ipv6_ranges(upstream: Upstream) -> None:
    cfg = with_ip_restriction(upstream.url, deny=["2001:db8::/32"])
    with running_gateway(cfg, trusted_ips=["127.0.0.1"], real_ip_header="X-Forwarded-For") as gw:
        denied = httpx.get(gw.url + "/", headers={"X-Forwarded-For": "2001:db8::42"})
        assert_refused(denied, upstream, "IP address not allowed: 2001:db8::42")
        allowed = httpx.get(gw.url + "/", headers={"X-Forwarded-For": "2001:db9::42"})
    assert allowed.status_code == 200


def test_unparseable_forwarded_address_falls_back_to_the_peer(upstream: Upstream) -> None:
    # As nginx's realip module: a forwarded value that is not an address is ignored, so the
    # peer's own address is the one checked (and here denied).
    cfg = with_ip_restriction(upstream.url, deny=["127.0.0.1"])
    with running_gateway(cfg, trusted_ips=["127.0.0.1"], real_ip_header="X-Forwarded-For") as gw:
        resp = httpx.get(gw.url + "/", headers={"X-Forwarded-For": "not-an-address"})
    assert_refused(resp, upstream, "IP address not allowed: 127.0.0.1")


def test_refusal_on_a_fhir_request_is_an_operation_outcome(upstream: Upstream) -> None:
    with running_gateway(with_ip_restriction(upstream.url, deny=["127.0.0.1"])) as gw:
        resp = httpx.get(gw.url + "/Patient/1", headers={"Accept": "application/fhir+json"})
    assert resp.status_code == 403
    assert resp.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert resp.json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "forbidden", "diagnostics": "IP address not allowed: 127.0.0.1"}
        ],
    }
    assert upstream.requests == []
