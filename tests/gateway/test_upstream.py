"""Upstream failures, timeouts, pooling, client disconnects and the error dialects."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.harness import Reply, Upstream, parse_responses, raw_request, running_gateway, service_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def test_upstream_refused_is_502_with_kong_message() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with running_gateway(service_config(url)) as gw:
        r = httpx.get(gw.url + "/x")
    assert r.status_code == 502
    assert r.json() == {"message": "An invalid response was received from the upstream server"}
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["server"] == "fhirgate/0.1.0"


def test_upstream_read_timeout_is_504(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(delay=1.0)
    config = service_config(upstream.url)
    config["services"][0]["read_timeout"] = 150
    with running_gateway(config) as gw:
        start = time.monotonic()
        r = httpx.get(gw.url + "/slow")
        elapsed = time.monotonic() - start
    assert r.status_code == 504
    assert r.json() == {"message": "The upstream server is timing out"}
    assert elapsed < 0.9


def test_upstream_timeout_between_body_chunks_cuts_the_response(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(body=[b"a", b"b"], chunk_delay=0.6)
    config = service_config(upstream.url)
    config["services"][0]["read_timeout"] = 200
    with running_gateway(config) as gw:
        out = raw_request(gw.port(), b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert not out.endswith(b"0\r\n\r\n")  # the response was cut, never completed falsely


def test_invalid_upstream_response_is_502(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(raw=b"this is not HTTP\r\n\r\n", close=True)
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/x")
    assert r.status_code == 502
    assert r.json() == {"message": "An invalid response was received from the upstream server"}


def test_upstream_closing_before_answer_is_502(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(raw=b"", close=True)
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/x")
    assert r.status_code == 502


def test_upstream_smuggled_response_is_refused(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(
        raw=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", close=True
    )
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/x")
    assert r.status_code == 502


def test_close_delimited_upstream_body_is_relayed(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(
        raw=b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", close=True
    )
    with running_gateway(service_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/x")
    assert r.status_code == 200
    assert r.content == b"all of it"


def test_interim_upstream_response_is_not_forwarded(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(
        raw=b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        close=True,
    )
    with running_gateway(service_config(upstream.url)) as gw:
        out = raw_request(gw.port(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert out.endswith(b"ok")


def test_upstream_connections_are_pooled_across_clients(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        for _ in range(5):
            with httpx.Client() as client:  # a new client connection each time
                assert client.get(gw.url + "/p").status_code == 200
        assert gw.gateway.pool.connects == 1
    assert upstream.connections == 1


def test_client_disconnect_mid_response_frees_upstream_connection(upstream: Upstream) -> None:
    upstream.handler = lambda req: Reply(body=[b"x" * 1000] * 50, chunk_delay=0.05)
    with running_gateway(service_config(upstream.url)) as gw:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as s:
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        assert _wait(lambda: upstream.open_connections == 0)
        assert gw.gateway.pool.idle_count() == 0
        assert _wait(lambda: not gw.gateway.active)


def test_client_disconnect_mid_body_frees_upstream_connection(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
            assert _wait(lambda: upstream.open_connections == 1)
        assert _wait(lambda: upstream.open_connections == 0)
        assert _wait(lambda: not gw.gateway.active)
        assert gw.gateway.pool.idle_count() == 0
    assert upstream.requests == []


def test_no_route_is_404_kong_json(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        r = httpx.get(gw.url + "/other")
    assert r.status_code == 404
    assert r.content == b'{"message":"no Route matched with those values"}'
    assert upstream.requests == []


def test_no_route_is_operation_outcome_when_client_accepts_fhir(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        r = httpx.get(gw.url + "/other", headers={"Accept": "application/fhir+json"})
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert r.json() == {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "not-found", "diagnostics": "no Route matched with those values"}
        ],
    }


def test_fhir_tagged_service_errors_are_operation_outcomes() -> None:
    config = service_config(f"http://127.0.0.1:{_free_port()}")
    config["services"][0]["tags"] = ["fhir"]
    with running_gateway(config) as gw:
        r = httpx.get(gw.url + "/Patient/1")
    assert r.status_code == 502
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "exception"
    assert body["issue"][0]["diagnostics"] == "An invalid response was received from the upstream server"


def test_json_preferred_over_fhir_keeps_kong_shape(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        r = httpx.get(gw.url + "/x", headers={"Accept": "application/json, application/fhir+json;q=0.5"})
    assert r.json() == {"message": "no Route matched with those values"}


def test_head_of_error_has_no_body(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        out = raw_request(gw.port(), b"HEAD /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404")
    assert out.endswith(b"\r\n\r\n")


def test_gateway_error_keeps_connection_alive(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw:
        out = raw_request(
            gw.port(),
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /fhir/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    assert [s for s, _h, _b in parse_responses(out)] == [404, 200]


def test_keep_alive_client_survives_a_gateway_refusal(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url, paths=["/fhir"])) as gw, httpx.Client(timeout=3) as c:
        assert c.get(gw.url + "/nope").status_code == 404
        assert c.get(gw.url + "/fhir/a").status_code == 200
        assert c.get(gw.url + "/nope").status_code == 404
    assert upstream.connections == 1


def test_connect_failures_are_retried_as_configured(tmp_path) -> None:
    log = tmp_path / "access.json"
    config = service_config(f"http://127.0.0.1:{_free_port()}")
    config["services"][0]["retries"] = 2
    with running_gateway(config, proxy_access_log=str(log), log_format="json") as gw:
        r = httpx.get(gw.url + "/x")
        assert r.status_code == 502
        assert _wait(lambda: log.exists() and log.read_text().strip() != "")
    record = json.loads(log.read_text().splitlines()[0])
    assert len(record["tries"]) == 3  # the first attempt and 2 retries


def test_retries_zero_means_one_attempt(tmp_path) -> None:
    log = tmp_path / "access.json"
    config = service_config(f"http://127.0.0.1:{_free_port()}")
    config["services"][0]["retries"] = 0
    with running_gateway(config, proxy_access_log=str(log), log_format="json") as gw:
        assert httpx.get(gw.url + "/x").status_code == 502
        assert _wait(lambda: log.exists() and log.read_text().strip() != "")
    assert len(json.loads(log.read_text().splitlines()[0])["tries"]) == 1
