"""`rate-limiting`: schema (Kong's fields, defaults and validation) and access through a running
gateway (headers, refusals, windows on an injected clock)."""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhirgate import clock
from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from fhirgate.gateway.plugins.rate_limiting import handler as rl_handler
from fhirgate.gateway.plugins.rate_limiting.handler import windows
from fhirgate.gateway.plugins.rate_limiting.schema import RateLimitingConfig
from fhirgate.gateway.shm import SharedMemoryError
from tests.harness import Upstream, running_gateway, service_config

# T0 (2023-11-14 22:13:15 UTC) is 15 s into its minute.
T0 = 1_699_999_995
LIMIT_HEADERS = (
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "retry-after",
)


@pytest.fixture
def now() -> Iterator[list[float]]:
    """The injected clock: set `now[0]` to move time."""
    current = [float(T0)]
    clock.set_clock(lambda: current[0])
    try:
        yield current
    finally:
        clock.set_clock(None)


def _cfg(upstream: Upstream, config: dict[str, Any], **route: Any) -> dict[str, Any]:
    cfg = service_config(upstream.url, **route)
    cfg["plugins"] = [{"name": "rate-limiting", "config": config}]
    return cfg


def _issues(config: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {
                "_format_version": "3.0",
                "plugins": [{"name": "rate-limiting", "config": config}],
            }
        )
    return [(i.location, i.message) for i in info.value.issues]


def _limit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-") or k in LIMIT_HEADERS}


# --- schema ----------------------------------------------------------------------------------


def test_defaults_are_kongs() -> None:
    cfg = load_config_dict(
        {"_format_version": "3.0", "plugins": [{"name": "rate-limiting", "config": {"minute": 5}}]}
    )
    conf = cfg.plugins[0].config
    assert isinstance(conf, RateLimitingConfig)
    assert conf.minute == 5
    assert (conf.second, conf.hour, conf.day, conf.month, conf.year) == (None,) * 5
    assert conf.limit_by == "consumer"
    assert conf.policy == "local"
    assert conf.fault_tolerant is True
    assert conf.hide_client_headers is False
    assert conf.error_code == 429
    assert conf.error_message == "API rate limit exceeded"
    assert conf.sync_rate == -1
    assert conf.header_name is None
    assert conf.path is None
    assert conf.redis.host is None
    assert conf.redis.port == 6379
    assert conf.redis.timeout == 2000
    assert conf.redis.database == 0
    assert conf.redis.ssl is False


def test_at_least_one_limit_is_required() -> None:
    assert _issues({}) == [
        (
            "plugins[0].config",
            "at least one of these fields must be non-empty: 'config.second', 'config.minute', "
            "'config.hour', 'config.day', 'config.month', 'config.year'",
        )
    ]


def test_limits_must_be_positive() -> None:
    assert _issues({"second": 0}) == [("plugins[0].config.second", "value must be greater than 0")]
    assert _issues({"minute": -1, "hour": 5}) == [
        ("plugins[0].config.minute", "value must be greater than 0")
    ]


def test_limits_must_not_decrease_with_longer_periods() -> None:
    assert _issues({"second": 10, "minute": 5}) == [
        ("plugins[0].config", "The limit for minute(5.0) cannot be lower than the limit for second(10.0)")
    ]
    assert _issues({"minute": 100, "hour": 200, "year": 150}) == [
        ("plugins[0].config", "The limit for year(150.0) cannot be lower than the limit for hour(200.0)")
    ]


def test_limit_by_header_requires_header_name() -> None:
    assert _issues({"minute": 5, "limit_by": "header"}) == [
        ("plugins[0].config.header_name", "required field missing")
    ]
    assert _issues({"minute": 5, "limit_by": "header", "header_name": "x y"}) == [
        (
            "plugins[0].config.header_name",
            "bad header name 'x y', allowed characters are A-Z, a-z, 0-9, '_', and '-'",
        )
    ]


def test_limit_by_path_requires_a_path() -> None:
    assert _issues({"minute": 5, "limit_by": "path"}) == [
        ("plugins[0].config.path", "required field missing")
    ]
    assert _issues({"minute": 5, "limit_by": "path", "path": "api"}) == [
        ("plugins[0].config.path", "should start with: /")
    ]


def test_limit_by_must_be_one_of_kongs() -> None:
    [(location, message)] = _issues({"minute": 5, "limit_by": "user"})
    assert location == "plugins[0].config.limit_by"
    assert "'consumer', 'credential', 'ip', 'service', 'header' or 'path'" in message


@pytest.mark.parametrize("policy", ["redis", "cluster"])
def test_redis_and_cluster_policies_are_refused_until_they_arrive(policy: str) -> None:
    config: dict[str, Any] = {"minute": 5, "policy": policy, "redis": {"host": "127.0.0.1"}}
    assert _issues(config) == [
        (
            "plugins[0].config.policy",
            f"policy '{policy}' is not available yet in fhirgate: use 'local' (counts exactly per node, "
            "shared by all its workers); 'redis' (counts across nodes) arrives in a later release",
        )
    ]


def test_sync_rate_is_for_redis_only() -> None:
    assert _issues({"minute": 5, "sync_rate": 1}) == [
        ("plugins[0].config", "sync_rate can only be used with the redis policy")
    ]


def test_error_code_must_be_an_http_status() -> None:
    assert _issues({"minute": 5, "error_code": 0}) == [
        ("plugins[0].config.error_code", "value should be an HTTP status code between 100 and 599")
    ]


def test_unknown_fields_are_refused() -> None:
    assert _issues({"minute": 5, "limit": 3}) == [("plugins[0].config.limit", "unknown field")]
    assert _issues({"minute": 5, "redis": {"hots": "x"}}) == [
        ("plugins[0].config.redis.hots", "unknown field")
    ]


def test_kongs_deprecated_redis_fields_are_kept_under_redis() -> None:
    cfg = load_config_dict(
        {
            "_format_version": "3.0",
            "plugins": [
                {
                    "name": "rate-limiting",
                    "config": {"minute": 5, "redis_host": "cache", "redis_port": 6380, "redis_database": 2},
                }
            ],
        }
    )
    conf = cfg.plugins[0].config
    assert isinstance(conf, RateLimitingConfig)
    assert (conf.redis.host, conf.redis.port, conf.redis.database) == ("cache", 6380, 2)


# --- windows ---------------------------------------------------------------------------------


def test_windows_are_aligned_on_utc_calendar_boundaries() -> None:
    t = calendar.timegm((2024, 2, 29, 12, 34, 56))
    starts, ends = windows(t)
    assert starts == (
        t,
        calendar.timegm((2024, 2, 29, 12, 34, 0)),
        calendar.timegm((2024, 2, 29, 12, 0, 0)),
        calendar.timegm((2024, 2, 29, 0, 0, 0)),
        calendar.timegm((2024, 2, 1, 0, 0, 0)),
        calendar.timegm((2024, 1, 1, 0, 0, 0)),
    )
    assert ends == (
        t + 1,
        starts[1] + 60,
        starts[2] + 3600,
        starts[3] + 86400,
        calendar.timegm((2024, 3, 1, 0, 0, 0)),
        calendar.timegm((2025, 1, 1, 0, 0, 0)),
    )
    december = calendar.timegm((2023, 12, 31, 23, 59, 59))
    _, ends = windows(december)
    assert ends[4] == ends[5] == calendar.timegm((2024, 1, 1, 0, 0, 0))


# --- access ----------------------------------------------------------------------------------


def test_headers_count_down_and_the_request_over_the_limit_is_refused(
    upstream: Upstream, now: list[float]
) -> None:
    with running_gateway(_cfg(upstream, {"minute": 3, "hour": 10})) as gw, httpx.Client() as client:
        seen = []
        for _ in range(3):
            r = client.get(gw.url + "/x")
            assert r.status_code == 200
            seen.append(_limit_headers(r))
        refused = client.get(gw.url + "/x")
    assert seen[0] == {
        "x-ratelimit-limit-minute": "3",
        "x-ratelimit-remaining-minute": "2",
        "x-ratelimit-limit-hour": "10",
        "x-ratelimit-remaining-hour": "9",
        "ratelimit-limit": "3",
        "ratelimit-remaining": "2",
        "ratelimit-reset": "45",  # T0 is 15 s into its minute
    }
    assert [h["x-ratelimit-remaining-minute"] for h in seen] == ["2", "1", "0"]
    assert [h["x-ratelimit-remaining-hour"] for h in seen] == ["9", "8", "7"]
    assert refused.status_code == 429
    assert refused.json() == {"message": "API rate limit exceeded"}
    assert refused.headers["content-type"] == "application/json; charset=utf-8"
    assert _limit_headers(refused) == {
        "x-ratelimit-limit-minute": "3",
        "x-ratelimit-remaining-minute": "0",
        "x-ratelimit-limit-hour": "10",
        "x-ratelimit-remaining-hour": "7",  # the refused request is not counted
        "ratelimit-limit": "3",
        "ratelimit-remaining": "0",
        "ratelimit-reset": "45",
        "retry-after": "45",
    }
    assert len(upstream.requests) == 3


def test_a_refused_request_never_reaches_the_upstream(upstream: Upstream, now: list[float]) -> None:
    with running_gateway(_cfg(upstream, {"second": 1})) as gw:
        assert httpx.get(gw.url + "/a").status_code == 200
        assert httpx.post(gw.url + "/b", content=b"payload").status_code == 429
    assert [r.target for r in upstream.requests] == ["/a"]


def test_the_most_restrictive_window_wins_and_ties_go_to_the_longer_one(
    upstream: Upstream, now: list[float]
) -> None:
    with running_gateway(_cfg(upstream, {"second": 5, "minute": 5, "hour": 100})) as gw:
        first = _limit_headers(httpx.get(gw.url + "/"))
    # second and minute both have 4 left: the minute (longer) is reported, reset 60 - 15
    assert (first["ratelimit-limit"], first["ratelimit-remaining"], first["ratelimit-reset"]) == (
        "5",
        "4",
        "45",
    )


def test_the_second_window_is_reported_when_it_is_the_tightest(upstream: Upstream, now: list[float]) -> None:
    with running_gateway(_cfg(upstream, {"second": 2, "minute": 10})) as gw:
        headers = _limit_headers(httpx.get(gw.url + "/"))
    assert (headers["ratelimit-limit"], headers["ratelimit-remaining"], headers["ratelimit-reset"]) == (
        "2",
        "1",
        "1",
    )


def test_a_new_window_admits_again(upstream: Upstream, now: list[float]) -> None:
    with running_gateway(_cfg(upstream, {"minute": 2})) as gw, httpx.Client() as client:
        assert [client.get(gw.url).status_code for _ in range(3)] == [200, 200, 429]
        now[0] = T0 + 44  # 59 s into the same minute
        refused = client.get(gw.url)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        now[0] = T0 + 45  # next minute
        again = client.get(gw.url)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-minute"] == "1"
    assert again.headers["ratelimit-reset"] == "60"


def test_hide_client_headers_hides_them_on_success_and_refusal(upstream: Upstream, now: list[float]) -> None:
    with running_gateway(_cfg(upstream, {"second": 1, "hide_client_headers": True})) as gw:
        ok = httpx.get(gw.url)
        refused = httpx.get(gw.url)
    assert ok.status_code == 200
    assert _limit_headers(ok) == {}
    assert refused.status_code == 429
    assert _limit_headers(refused) == {}
    assert refused.json() == {"message": "API rate limit exceeded"}


def test_custom_error_code_and_message(upstream: Upstream, now: list[float]) -> None:
    config = {"second": 1, "error_code": 503, "error_message": "Slow down"}
    with running_gateway(_cfg(upstream, config)) as gw:
        httpx.get(gw.url)
        refused = httpx.get(gw.url)
    assert refused.status_code == 503
    assert refused.json() == {"message": "Slow down"}
    assert refused.headers["retry-after"] == "1"


def test_fhir_clients_get_an_operation_outcome(upstream: Upstream, now: list[float]) -> None:
    with running_gateway(_cfg(upstream, {"second": 1})) as gw:
        httpx.get(gw.url)
        refused = httpx.get(gw.url, headers={"Accept": "application/fhir+json"})
    assert refused.status_code == 429
    assert refused.json() == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "throttled", "diagnostics": "API rate limit exceeded"}],
    }
    assert refused.headers["retry-after"] == "1"


def test_limit_by_header_counts_each_value_and_falls_back_to_the_ip(
    upstream: Upstream, now: list[float]
) -> None:
    config = {"minute": 1, "limit_by": "header", "header_name": "X-Tenant"}
    with running_gateway(_cfg(upstream, config)) as gw:
        a = [httpx.get(gw.url, headers={"X-Tenant": "a"}).status_code for _ in range(2)]
        b = [httpx.get(gw.url, headers={"X-Tenant": "b"}).status_code for _ in range(2)]
        anonymous = [httpx.get(gw.url).status_code for _ in range(2)]
    assert (a, b, anonymous) == ([200, 429], [200, 429], [200, 429])


def test_limit_by_path_counts_the_configured_path_apart(upstream: Upstream, now: list[float]) -> None:
    config = {"minute": 1, "limit_by": "path", "path": "/export"}
    with running_gateway(_cfg(upstream, config)) as gw:
        export = [httpx.get(gw.url + "/export").status_code for _ in range(2)]
        other = [httpx.get(gw.url + p).status_code for p in ("/a", "/b")]  # both by client IP
    assert export == [200, 429]
    assert other == [200, 429]


def test_limit_by_service_shares_one_counter_across_clients_headers(
    upstream: Upstream, now: list[float]
) -> None:
    config = {"minute": 2, "limit_by": "service"}
    with running_gateway(_cfg(upstream, config)) as gw:
        codes = [httpx.get(gw.url, headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
    assert codes == [200, 200, 429]


def test_each_plugin_instance_counts_apart(upstream: Upstream, now: list[float]) -> None:
    cfg = service_config(upstream.url, paths=["/a"], name="ra")
    cfg["services"][0]["routes"].append({"name": "rb", "paths": ["/b"]})
    cfg["plugins"] = [
        {"name": "rate-limiting", "route": "ra", "config": {"minute": 1}},
        {"name": "rate-limiting", "route": "rb", "config": {"minute": 1}},
    ]
    with running_gateway(cfg) as gw:
        codes = [httpx.get(gw.url + p).status_code for p in ("/a", "/b", "/a", "/b")]
    assert codes == [200, 200, 429, 429]


class _BrokenTable:
    def hit(self, *_args: Any, **_kwargs: Any) -> Any:
        raise SharedMemoryError("the shared counter table is locked (a worker died holding it?)")


def test_fault_tolerant_proxies_without_headers_when_counting_fails(
    upstream: Upstream, now: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rl_handler, "node_counters", _BrokenTable)
    with running_gateway(_cfg(upstream, {"second": 1})) as gw:
        codes = [httpx.get(gw.url) for _ in range(2)]
    assert [r.status_code for r in codes] == [200, 200]
    assert _limit_headers(codes[1]) == {}


def test_not_fault_tolerant_answers_500_when_counting_fails(
    upstream: Upstream, now: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rl_handler, "node_counters", _BrokenTable)
    with running_gateway(_cfg(upstream, {"second": 1, "fault_tolerant": False})) as gw:
        r = httpx.get(gw.url)
    assert r.status_code == 500
    assert r.json() == {"message": "An unexpected error occurred"}
    assert upstream.requests == []
