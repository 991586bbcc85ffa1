"""Request smuggling and malformed input: each is refused with the exact status, the connection is
closed, and the upstream never sees a byte of it (nor of anything pipelined after it)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.harness import Upstream, parse_responses, raw_request, running_gateway, service_config

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"

CASES = {
    "content-length and transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        400,
    ),
    "transfer-encoding then content-length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX",
        400,
    ),
    "duplicate content-length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    "conflicting content-length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
        400,
    ),
    "content-length list": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
    "non-numeric content-length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello", 400),
    "signed content-length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", 400),
    "negative content-length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    "bad chunk size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "overflowing chunk size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n",
        400,
    ),
    "chunk size with bare LF": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        400,
    ),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n", 400),
    "NUL in header value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n", 400),
    "bare CR in header value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\rc\r\n\r\n", 400),
    "bare LF line endings": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", 400),
    "missing host": (b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    "repeated host": (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    "duplicate transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "chunked not last": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        400,
    ),
    "unsupported transfer coding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "unknown transfer coding": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "absolute-form disagreeing with host": (b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "fragment in target": (b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "non-ascii target": (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "invalid method token": (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "bad version": (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    "unsupported expectation": (
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\nx",
        417,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_is_refused_and_never_reaches_upstream(upstream: Upstream, name: str) -> None:
    data, status = CASES[name]
    with running_gateway(service_config(upstream.url)) as gw:
        out = raw_request(gw.port(), data + SMUGGLED)
    responses = parse_responses(out)
    assert len(responses) == 1, out  # nothing after the refusal is interpreted
    got_status, headers, body = responses[0]
    assert got_status == status, out
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert body.startswith(b'{"message":"')
    assert upstream.requests == []


def test_refusal_is_an_operation_outcome_when_client_prefers_fhir(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        out = raw_request(
            gw.port(),
            b"GET / HTTP/1.1\r\nAccept: application/fhir+json\r\nHost: x\r\nHost: y\r\n\r\n",
        )
    [(status, headers, body)] = parse_responses(out)
    assert status == 400
    assert headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert b'"resourceType":"OperationOutcome"' in body
    assert b'"code":"invalid"' in body
    assert b"more than one Host header" in body


def test_oversize_request_line_is_414(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), max_request_line=1024) as gw:
        out = raw_request(gw.port(), b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    [(status, _headers, body)] = parse_responses(out)
    assert status == 414
    assert body == b'{"message":"Request-URI Too Long"}'
    assert upstream.requests == []


def test_oversize_headers_are_431(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), max_header_size=2048) as gw:
        out = raw_request(gw.port(), b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    [(status, _headers, body)] = parse_responses(out)
    assert status == 431
    assert body == b'{"message":"Request Header Fields Too Large"}'
    assert upstream.requests == []


def test_too_many_headers_are_431(upstream: Upstream) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(50))
    with running_gateway(service_config(upstream.url), max_headers=20) as gw:
        out = raw_request(gw.port(), b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert parse_responses(out)[0][0] == 431
    assert upstream.requests == []


def test_slow_header_sender_times_out_with_408(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), client_header_timeout=300) as gw:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
            start = time.monotonic()
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    assert time.monotonic() - start < 3
    assert out.startswith(b"HTTP/1.1 408")
    assert upstream.requests == []


def test_slow_body_sender_times_out_with_408_and_frees_upstream(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), client_body_timeout=300) as gw:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-some")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        assert out.startswith(b"HTTP/1.1 408")
        deadline = time.monotonic() + 3
        while upstream.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.open_connections == 0
        assert gw.gateway.pool.idle_count() == 0
    assert upstream.requests == []  # the upstream never got a complete request


def test_path_escaping_the_route_is_refused(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        for target in (b"/fhir/..%2Fadmin", b"/fhir/%2e%2e%2fadmin", b"/fhir/..%5cadmin", b"/../etc/passwd"):
            out = raw_request(
                gw.port(), b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert parse_responses(out)[0][0] == 400, target
    assert upstream.requests == []


def test_dot_segments_are_resolved_before_routing(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        out = raw_request(
            gw.port(), b"GET /fhir/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        [(status, _h, body)] = parse_responses(out)
        assert status == 404
        assert body == b'{"message":"no Route matched with those values"}'
        out = raw_request(
            gw.port(), b"GET /fhir//Patient/./1/../2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert parse_responses(out)[0][0] == 200
    assert [r.target for r in upstream.requests] == ["/Patient/2"]  # strip_path removed /fhir
