"""`request-size-limiting` (Kong's spec/03-plugins/12-request-size-limiting): schema, then
requests with a Content-Length, with a chunked body and with `Expect: 100-continue` through a
running gateway."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from tests.harness import Upstream, parse_responses, raw_request, running_gateway, service_config

TOO_LARGE = {"message": "Request size limit exceeded"}
LENGTH_REQUIRED = {"message": "A valid Content-Length header is required"}


def with_limit(upstream_url: str, **config: Any) -> dict[str, Any]:
    cfg = service_config(upstream_url)
    cfg["plugins"] = [{"name": "request-size-limiting", "config": config}]
    return cfg


def config_issues(plugin_config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {
                "_format_version": "3.0",
                "plugins": [{"name": "request-size-limiting", "config": plugin_config}],
            }
        )
    return [str(issue) for issue in info.value.issues]


def chunks(*parts: bytes) -> Iterator[bytes]:
    yield from parts


def assert_refused(resp: httpx.Response, upstream: Upstream, status: int, body: dict[str, str]) -> None:
    assert resp.status_code == status
    assert resp.json() == body
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    assert upstream.requests == []


# --- schema ---------------------------------------------------------------------------------


def test_schema_defaults_are_kongs() -> None:
    cfg = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "request-size-limiting"}]})
    assert cfg.plugins[0].config.model_dump() == {
        "allowed_payload_size": 128,
        "size_unit": "megabytes",
        "require_content_length": False,
    }
    assert cfg.plugins[0].config.limit_bytes == 128 * 1024 * 1024  # type: ignore[attr-defined]


def test_schema_refuses_an_unknown_size_unit() -> None:
    assert config_issues({"size_unit": "gigabytes"}) == [
        "plugins[0].config.size_unit: expected one of: megabytes, kilobytes, bytes"
    ]


def test_schema_refuses_a_negative_or_fractional_size() -> None:
    assert config_issues({"allowed_payload_size": -1}) == [
        "plugins[0].config.allowed_payload_size: Input should be greater than or equal to 0"
    ]
    assert config_issues({"allowed_payload_size": 1.5}) == [
        "plugins[0].config.allowed_payload_size: "
        "Input should be a valid integer, got a number with a fractional part"
    ]


# --- Content-Length -------------------------------------------------------------------------


def test_body_within_the_limit_reaches_the_upstream(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, allowed_payload_size=10, size_unit="bytes")) as gw:
        resp = httpx.post(gw.url + "/", content=b"0123456789")
    assert resp.status_code == 200
    assert [r.body for r in upstream.requests] == [b"0123456789"]


def test_body_over_the_limit_is_refused_with_413(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, allowed_payload_size=10, size_unit="bytes")) as gw:
        resp = httpx.post(gw.url + "/", content=b"0123456789A")
    assert_refused(resp, upstream, 413, TOO_LARGE)


@pytest.mark.parametrize(("unit", "factor"), [("bytes", 1), ("kilobytes", 1024), ("megabytes", 1024 * 1024)])
def test_size_unit_scales_the_limit(upstream: Upstream, unit: str, factor: int) -> None:
    with running_gateway(with_limit(upstream.url, allowed_payload_size=1, size_unit=unit)) as gw:
        at_limit = httpx.post(gw.url + "/", content=b"x" * factor)
        over = httpx.post(gw.url + "/", content=b"x" * (factor + 1))
    assert at_limit.status_code == 200
    assert over.status_code == 413
    assert over.json() == TOO_LARGE
    assert [len(r.body) for r in upstream.requests] == [factor]


def test_oversize_content_length_is_refused_without_reading_the_body(upstream: Upstream) -> None:
    cfg = with_limit(upstream.url, allowed_payload_size=1, size_unit="kilobytes")
    with running_gateway(cfg) as gw:
        # Announce 1 GB and send none of it: the answer comes from the header alone.
        data = raw_request(
            gw.port(),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
            timeout=3,
        )
    [(status, headers, body)] = parse_responses(data)
    assert status == 413
    assert json.loads(body) == TOO_LARGE
    assert headers["connection"] == "close"
    assert upstream.requests == []


def test_oversize_content_length_with_expect_continue_gets_417_and_no_100(upstream: Upstream) -> None:
    cfg = with_limit(upstream.url, allowed_payload_size=1, size_unit="kilobytes")
    with running_gateway(cfg) as gw:
        data = raw_request(
            gw.port(),
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-Continue \r\n\r\n",
            timeout=3,
        )
    assert b"100 Continue" not in data
    [(status, _, body)] = parse_responses(data)
    assert status == 417
    assert json.loads(body) == TOO_LARGE
    assert upstream.requests == []


def test_expect_continue_within_the_limit_is_proxied(upstream: Upstream) -> None:
    cfg = with_limit(upstream.url, allowed_payload_size=1, size_unit="kilobytes")
    with running_gateway(cfg) as gw, socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(b"hello")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert [r.body for r in upstream.requests] == [b"hello"]


# --- chunked bodies -------------------------------------------------------------------------


def test_chunked_body_within_the_limit_reaches_the_upstream(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, allowed_payload_size=10, size_unit="bytes")) as gw:
        resp = httpx.post(gw.url + "/", content=chunks(b"01234", b"56789"))
    assert resp.status_code == 200
    assert [r.body for r in upstream.requests] == [b"0123456789"]


def test_chunked_body_over_the_limit_is_refused_with_413(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, allowed_payload_size=10, size_unit="bytes")) as gw:
        resp = httpx.post(gw.url + "/", content=chunks(b"01234", b"56789", b"A"))
    assert_refused(resp, upstream, 413, TOO_LARGE)


def test_endless_chunked_body_is_refused_once_past_the_limit(upstream: Upstream) -> None:
    cfg = with_limit(upstream.url, allowed_payload_size=1, size_unit="kilobytes")
    with running_gateway(cfg) as gw:
        # One chunk past the limit and no last chunk: the refusal cannot wait for the end.
        data = raw_request(
            gw.port(),
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"
            + b"x" * 0x800
            + b"\r\n",
            timeout=3,
        )
    [(status, headers, body)] = parse_responses(data)
    assert status == 413
    assert json.loads(body) == TOO_LARGE
    assert headers["connection"] == "close"
    assert upstream.requests == []


def test_require_content_length_refuses_a_chunked_body_with_411(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, require_content_length=True)) as gw:
        resp = httpx.post(gw.url + "/", content=chunks(b"abc"))
    assert_refused(resp, upstream, 411, LENGTH_REQUIRED)


def test_require_content_length_refuses_a_request_without_one(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, require_content_length=True)) as gw:
        resp = httpx.get(gw.url + "/")
    assert_refused(resp, upstream, 411, LENGTH_REQUIRED)


def test_require_content_length_accepts_a_request_with_one(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, require_content_length=True)) as gw:
        resp = httpx.post(gw.url + "/", content=b"abc")
    assert resp.status_code == 200
    assert [r.body for r in upstream.requests] == [b"abc"]


def test_request_without_body_passes(upstream: Upstream) -> None:
    with running_gateway(with_limit(upstream.url, allowed_payload_size=0, size_unit="bytes")) as gw:
        resp = httpx.get(gw.url + "/nobody")
    assert resp.status_code == 200
    assert [(r.target, r.body) for r in upstream.requests] == [("/nobody", b"")]
