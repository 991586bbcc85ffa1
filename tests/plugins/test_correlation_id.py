"""`correlation-id` (Kong's spec/03-plugins/11-correlation-id): schema, then the header the
upstream and the client see through a running gateway."""

from __future__ import annotations

import os
import re
from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from tests.harness import Reply, Upstream, running_gateway, service_config

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def with_correlation_id(upstream_url: str, **config: Any) -> dict[str, Any]:
    cfg = service_config(upstream_url)
    cfg["plugins"] = [{"name": "correlation-id", "config": config}]
    return cfg


def config_issues(plugin_config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {"_format_version": "3.0", "plugins": [{"name": "correlation-id", "config": plugin_config}]}
        )
    return [str(issue) for issue in info.value.issues]


# --- schema ---------------------------------------------------------------------------------


def test_schema_defaults_are_kongs() -> None:
    cfg = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "correlation-id"}]})
    assert cfg.plugins[0].config.model_dump() == {
        "header_name": "Kong-Request-ID",
        "generator": "uuid#counter",
        "echo_downstream": False,
    }


def test_schema_refuses_an_unknown_generator() -> None:
    assert config_issues({"generator": "snowflake"}) == [
        "plugins[0].config.generator: expected one of: uuid, uuid#counter, tracker"
    ]


@pytest.mark.parametrize("bad", ["", "X Request", "X-Id:", "Ünïcode"])
def test_schema_refuses_a_header_name_that_is_not_a_token(bad: str) -> None:
    assert config_issues({"header_name": bad}) == [
        f"plugins[0].config.header_name: bad header name '{bad}': must be an HTTP token (RFC 9110 5.1)"
    ]


# --- access ---------------------------------------------------------------------------------


def test_uuid_counter_ids_share_the_worker_uuid_and_count_up(upstream: Upstream) -> None:
    with running_gateway(with_correlation_id(upstream.url)) as gw:
        first = httpx.get(gw.url + "/")
        httpx.get(gw.url + "/")
    ids = [r.header("kong-request-id") for r in upstream.requests]
    first_id = re.fullmatch(f"({UUID})#([0-9]+)", ids[0] or "")
    second_id = re.fullmatch(f"({UUID})#([0-9]+)", ids[1] or "")
    assert first_id, ids
    assert second_id, ids
    assert first_id.group(1) == second_id.group(1)
    assert int(second_id.group(2)) == int(first_id.group(2)) + 1
    # Not echoed by default.
    assert "kong-request-id" not in first.headers


def test_uuid_generator_makes_a_fresh_uuid_per_request(upstream: Upstream) -> None:
    with running_gateway(with_correlation_id(upstream.url, generator="uuid")) as gw:
        httpx.get(gw.url + "/")
        httpx.get(gw.url + "/")
    ids = [r.header("kong-request-id") or "" for r in upstream.requests]
    assert all(re.fullmatch(UUID, i) for i in ids), ids
    assert ids[0] != ids[1]


def test_tracker_generator_names_host_port_pid_and_time(upstream: Upstream) -> None:
    with running_gateway(with_correlation_id(upstream.url, generator="tracker")) as gw:
        httpx.get(gw.url + "/")
        port = gw.port()
    value = upstream.requests[0].header("kong-request-id") or ""
    assert re.fullmatch(rf"127\.0\.0\.1-{port}-{os.getpid()}-[0-9]+-1-[0-9]+\.[0-9]{{3}}", value), value


def test_client_sent_id_is_kept_and_sent_once(upstream: Upstream) -> None:
    cfg = with_correlation_id(upstream.url, echo_downstream=True)
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/", headers={"Kong-Request-ID": "client-chosen-1"})
    assert upstream.requests[0].header_all("kong-request-id") == ["client-chosen-1"]
    assert resp.headers.get_list("kong-request-id") == ["client-chosen-1"]


def test_empty_client_id_is_replaced(upstream: Upstream) -> None:
    with running_gateway(with_correlation_id(upstream.url, generator="uuid")) as gw:
        httpx.get(gw.url + "/", headers={"Kong-Request-ID": ""})
    values = upstream.requests[0].header_all("kong-request-id")
    assert len(values) == 1
    assert re.fullmatch(UUID, values[0])


def test_echo_downstream_returns_the_id_the_upstream_saw(upstream: Upstream) -> None:
    cfg = with_correlation_id(upstream.url, header_name="X-Correlation-ID", echo_downstream=True)
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/")
    sent = upstream.requests[0].header("x-correlation-id")
    assert sent is not None
    assert resp.headers.get_list("x-correlation-id") == [sent]
    assert upstream.requests[0].header("kong-request-id") is None


def test_echo_downstream_marks_refusals_by_later_plugins_too(upstream: Upstream) -> None:
    cfg = with_correlation_id(upstream.url, echo_downstream=True, generator="uuid")
    cfg["plugins"].append({"name": "ip-restriction", "config": {"deny": ["127.0.0.1"]}})
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/")
    assert resp.status_code == 403
    assert resp.json() == {"message": "IP address not allowed: 127.0.0.1"}
    assert re.fullmatch(UUID, resp.headers["kong-request-id"])
    assert upstream.requests == []


def test_echo_downstream_replaces_an_upstream_value(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(headers=[("Kong-Request-ID", "from-upstream")], body=b"ok")
    cfg = with_correlation_id(upstream.url, echo_downstream=True)
    with running_gateway(cfg) as gw:
        resp = httpx.get(gw.url + "/", headers={"Kong-Request-ID": "mine"})
    assert resp.headers.get_list("kong-request-id") == ["mine"]
