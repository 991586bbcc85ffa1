"""HTTP/1.1 through the gateway: keep-alive, pipelining, streaming bodies both ways, 100-continue,
hop-by-hop headers and X-Forwarded-*. Real sockets on both sides."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.harness import Reply, Upstream, parse_responses, raw_request, running_gateway, service_config


def test_proxies_method_path_query_and_body(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.post(gw.url + "/fhir/Patient?name=smith&_count=2", content=b'{"resourceType":"Patient"}')
    assert r.status_code == 200
    assert r.json() == {"path": "/fhir/Patient?name=smith&_count=2", "method": "POST"}
    rec = upstream.requests[0]
    assert rec.body == b'{"resourceType":"Patient"}'
    assert rec.header("content-length") == "26"


def test_keep_alive_reuses_client_and_upstream_connections(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw, httpx.Client() as client:
        for i in range(5):
            assert client.get(f"{gw.url}/p/{i}").status_code == 200
    assert [r.target for r in upstream.requests] == [f"/p/{i}" for i in range(5)]
    assert upstream.connections == 1


def test_pipelined_requests_are_answered_in_order(upstream: Upstream) -> None:
    def slow_first(req):  # the first answer is the slowest: order must still hold
        delay = 0.2 if req.target == "/a" else 0.0
        return Reply(body=req.target.encode(), delay=delay)

    upstream.handler = slow_first
    with running_gateway(service_config(upstream.url)) as gw:
        data = (
            b"".join(f"GET /{p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in ("a", "b", "c"))
            + b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        out = raw_request(gw.port(), data)
    responses = parse_responses(out)
    assert [body for _s, _h, body in responses] == [b"/a", b"/b", b"/c", b"/d"]


def test_pipelined_post_bodies_stay_with_their_requests(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        data = (
            b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        out = raw_request(gw.port(), data)
    assert [s for s, _h, _b in parse_responses(out)] == [200, 200, 200]
    assert [(r.target, r.body) for r in upstream.requests] == [("/1", b"hello"), ("/2", b"abc"), ("/3", b"")]


def test_large_request_body_is_streamed_intact(upstream: Upstream) -> None:
    body = bytes(range(256)) * 40000  # ~10 MB
    with running_gateway(service_config(upstream.url), client_max_buffer=65536) as gw:
        r = httpx.put(gw.url + "/big", content=body, timeout=30)
    assert r.status_code == 200
    assert upstream.requests[0].body == body


def test_chunked_request_body_is_reframed_chunked(upstream: Upstream) -> None:
    def gen():
        for i in range(20):
            yield f"part{i};".encode()

    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.post(gw.url + "/c", content=gen())
    assert r.status_code == 200
    rec = upstream.requests[0]
    assert rec.body == b"".join(f"part{i};".encode() for i in range(20))
    assert rec.header("transfer-encoding") == "chunked"
    assert rec.header("content-length") is None


def test_chunked_streaming_response_arrives_in_order(upstream: Upstream) -> None:
    chunks = [f"chunk-{i}\n".encode() * 100 for i in range(30)]
    upstream.handler = lambda req: Reply(body=chunks, chunk_delay=0.005)
    with running_gateway(service_config(upstream.url)) as gw, httpx.stream("GET", gw.url + "/s") as r:
        assert r.headers["transfer-encoding"] == "chunked"
        got = b"".join(r.iter_bytes())
    assert got == b"".join(chunks)


def test_large_response_with_content_length_is_relayed(upstream: Upstream) -> None:
    payload = b"x" * (8 * 1024 * 1024)
    upstream.handler = lambda req: Reply(body=payload)
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/big", timeout=30)
    assert r.headers["content-length"] == str(len(payload))
    assert r.content == payload


def test_head_response_has_no_body_and_connection_is_reused(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(body=b"0123456789")
    with running_gateway(service_config(upstream.url)) as gw:
        data = b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        out = raw_request(gw.port(), data)
    first, rest = out.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 10" in first
    assert rest.startswith(b"HTTP/1.1 200")  # no body bytes between the two responses
    assert rest.endswith(b"0123456789")
    assert upstream.connections == 1


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_are_relayed_without_body(upstream: Upstream, status: int) -> None:
    upstream.handler = lambda req: Reply(status=status, headers=[], body=b"")
    with running_gateway(service_config(upstream.url)) as gw, httpx.Client() as c:
        assert c.get(gw.url + "/a").status_code == status
        assert c.get(gw.url + "/b").status_code == status


def test_http10_client_gets_close_delimited_body(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(body=[b"abc", b"def"])
    with running_gateway(service_config(upstream.url)) as gw:
        out = raw_request(gw.port(), b"GET /old HTTP/1.0\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert body == b"abcdef"


def test_expect_100_continue_is_answered_after_access(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            interim = s.recv(100)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            s.sendall(b"hello")
            final = s.recv(65536)
    assert final.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].body == b"hello"
    assert upstream.requests[0].header("expect") is None


def test_expect_100_continue_refused_request_never_uploads(upstream: Upstream) -> None:
    config = service_config(upstream.url, paths=["/fhir"])
    with running_gateway(config) as gw:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as s:
            s.sendall(b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    assert not out.startswith(b"HTTP/1.1 100")
    assert out.startswith(b"HTTP/1.1 404")
    assert b"Connection: close" in out
    assert upstream.requests == []


def test_hop_by_hop_request_headers_are_not_forwarded(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        raw_request(
            gw.port(),
            b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret\r\nX-Secret: s3\r\n"
            b"Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Authorization: Basic x\r\n"
            b"Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nX-Kept: yes\r\n\r\n",
        )
    rec = upstream.requests[0]
    names = {k for k, _ in rec.headers}
    for gone in (
        "x-secret",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "trailer",
    ):
        assert gone not in names, gone
    assert rec.header("x-kept") == "yes"
    assert rec.header("connection") in (None, "keep-alive")


def test_hop_by_hop_response_headers_are_not_returned(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(
        headers=[("Connection", "X-Up"), ("X-Up", "secret"), ("Keep-Alive", "timeout=3"), ("X-Fine", "1")],
        body=b"ok",
    )
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/x")
    assert r.status_code == 200
    assert "x-up" not in r.headers
    assert "keep-alive" not in r.headers
    assert r.headers["x-fine"] == "1"


def test_forwarded_headers_from_untrusted_client_are_replaced(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        httpx.get(
            gw.url + "/fhir/Patient",
            headers={
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Port": "1",
                "X-Forwarded-Path": "/admin",
                "X-Real-IP": "6.6.6.6",
                "Host": "api.example:8000",
            },
        )
    rec = upstream.requests[0]
    assert rec.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert rec.header("x-real-ip") == "127.0.0.1"
    assert rec.header("x-forwarded-proto") == "http"
    assert rec.header("x-forwarded-host") == "api.example"
    assert rec.header("x-forwarded-port") == str(gw.port())
    assert rec.header("x-forwarded-path") == "/fhir/Patient"
    assert rec.header("via") == "1.1 fhirgate/0.1.0"
    assert rec.header("host") == f"127.0.0.1:{upstream.port}"


def test_forwarded_headers_from_trusted_proxy_are_kept(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), trusted_ips=["127.0.0.0/8"]) as gw:
        httpx.get(
            gw.url + "/p",
            headers={
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "https",
                "X-Real-IP": "203.0.113.9",
            },
        )
    rec = upstream.requests[0]
    assert rec.header("x-forwarded-for") == "203.0.113.9, 127.0.0.1"
    assert rec.header("x-forwarded-proto") == "https"
    assert rec.header("x-real-ip") == "203.0.113.9"


def test_preserve_host_sends_client_host(upstream: Upstream) -> None:
    config = service_config(upstream.url, preserve_host=True)
    with running_gateway(config) as gw:
        httpx.get(gw.url + "/p", headers={"Host": "fhir.example.org"})
    assert upstream.requests[0].header("host") == "fhir.example.org"


def test_strip_path_and_service_path_shape_the_upstream_path(upstream: Upstream) -> None:
    config = {
        "_format_version": "3.0",
        "services": [
            {
                "name": "fhir",
                "url": upstream.url + "/csp/fhir/r4",
                "routes": [{"name": "r", "paths": ["/fhir"]}],
            }
        ],
    }
    with running_gateway(config) as gw:
        httpx.get(gw.url + "/fhir/Patient/1?x=y")
    assert upstream.requests[0].target == "/csp/fhir/r4/Patient/1?x=y"


def test_gateway_headers_on_proxied_response(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/p")
    assert r.headers["via"] == "1.1 fhirgate/0.1.0"
    assert int(r.headers["x-fhirgate-upstream-latency"]) >= 0
    assert int(r.headers["x-fhirgate-proxy-latency"]) >= 0
    assert len(r.headers["x-fhirgate-request-id"]) == 32


def test_gateway_headers_can_be_turned_off(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), headers=["off"]) as gw:
        r = httpx.get(gw.url + "/p")
    assert "via" not in r.headers
    assert "x-fhirgate-request-id" not in r.headers
    assert "via" not in dict(upstream.requests[0].headers)


def test_upgrade_request_is_proxied_as_plain_request_and_closed(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        out = raw_request(
            gw.port(),
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGARBAGE",
        )
    assert out.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].header("upgrade") is None
    assert len(upstream.requests) == 1


def test_idle_keepalive_connection_is_closed_after_timeout(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), keepalive_timeout=200) as gw:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as s:
            s.sendall(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'"GET"}'):
                first += s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert s.recv(100) == b""  # closed by the gateway
            assert time.monotonic() - start < 3


def test_response_body_json_is_passed_unchanged(upstream: Upstream) -> None:
    patient = {"resourceType": "Patient", "id": "1", "name": [{"family": "Smith"}]}
    upstream.handler = lambda req: Reply(
        headers=[("Content-Type", "application/fhir+json")], body=json.dumps(patient).encode()
    )
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/fhir/Patient/1")
    assert r.headers["content-type"] == "application/fhir+json"
    assert r.json() == patient


def test_forwarded_prefix_is_the_stripped_path(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw, httpx.Client() as c:
        c.get(gw.url + "/fhir/Patient/1")
        c.get(gw.url + "/fhir/Patient/1", headers={"X-Forwarded-Prefix": "/evil"})  # untrusted: ignored
    assert [r.header("x-forwarded-prefix") for r in upstream.requests] == ["/fhir", "/fhir"]


def test_no_forwarded_prefix_without_strip_path(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"], strip_path=False)) as gw:
        httpx.get(gw.url + "/fhir/Patient/1")
    assert upstream.requests[0].header("x-forwarded-prefix") is None
    assert upstream.requests[0].target == "/fhir/Patient/1"


def test_via_is_appended_to_the_clients(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        httpx.get(gw.url + "/p", headers={"Via": "1.1 corporate-proxy"})
    assert upstream.requests[0].header_all("via") == ["1.1 corporate-proxy, 1.1 fhirgate/0.1.0"]
