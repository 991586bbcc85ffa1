"""The status listener (`/status`, `/status/ready`; off unless configured) and the proxy access log
(text and JSON; one line per request; never the query string, never credentials)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhirgate import settings as settings_module
from fhirgate.gateway.node import plan_listeners
from fhirgate.settings import Settings
from tests.harness import Upstream, running_gateway, service_config

# --------------------------------------------------------------------------------------------
# Listeners that are not configured are off


@pytest.fixture
def clean_settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from defaults only: no FHIRGATE_* variables, no fhirgate.toml."""
    for name in list(os.environ):
        if name.startswith("FHIRGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(settings_module, "_TOML_FILE", [tmp_path / "fhirgate.toml"])


@pytest.mark.usefixtures("clean_settings_env")
def test_only_the_plain_proxy_listener_is_on_by_default() -> None:
    listeners = plan_listeners(Settings())
    assert [(li.kind, li.host, li.port) for li in listeners] == [("proxy", "0.0.0.0", 8000)]


@pytest.mark.usefixtures("clean_settings_env")
def test_no_tls_listener_without_a_certificate() -> None:
    listeners = plan_listeners(Settings(listen_ssl=["127.0.0.1:8443"]))
    assert [li.kind for li in listeners] == ["proxy"]


@pytest.mark.usefixtures("clean_settings_env")
def test_a_certificate_turns_the_tls_listener_on(tmp_path: Path) -> None:
    listeners = plan_listeners(Settings(ssl_cert=tmp_path / "c.pem", ssl_cert_key=tmp_path / "k.pem"))
    assert [(li.kind, li.port, li.url) for li in listeners] == [
        ("proxy", 8000, "http://0.0.0.0:8000"),
        ("ssl", 8443, "https://0.0.0.0:8443"),
    ]


@pytest.mark.usefixtures("clean_settings_env")
def test_status_listener_only_when_configured() -> None:
    listeners = plan_listeners(Settings(status_listen="127.0.0.1:8100"))
    assert [(li.kind, li.host, li.port) for li in listeners] == [
        ("proxy", "0.0.0.0", 8000),
        ("status", "127.0.0.1", 8100),
    ]


@pytest.mark.usefixtures("clean_settings_env")
def test_status_listener_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRGATE_STATUS_LISTEN", "127.0.0.1:8101")
    assert [li.kind for li in plan_listeners(Settings())] == ["proxy", "status"]


# --------------------------------------------------------------------------------------------
# Status listener


def _status_url(gw: Any, path: str = "/status") -> str:
    return f"http://127.0.0.1:{gw.port('status')}{path}"


def test_status_reports_connections_requests_configuration_and_worker(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), status=True) as gw, httpx.Client() as proxy:
        for i in range(3):
            assert proxy.get(f"{gw.url}/p/{i}").status_code == 200
        r = httpx.get(_status_url(gw))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"server", "database", "configuration_hash", "worker"}
    server = body["server"]
    assert set(server) >= {
        "connections_active",
        "connections_reading",
        "connections_writing",
        "connections_waiting",
        "total_requests",
    }
    assert server["total_requests"] == 3  # status requests are not proxy requests
    assert server["connections_active"] == 1  # the proxy client's keep-alive connection
    assert server["connections_waiting"] == 1
    assert server["connections_writing"] == 0
    assert body["database"] == {"reachable": True}
    assert re.fullmatch(r"[0-9a-f]{32}", body["configuration_hash"])
    assert body["worker"]["pid"] == os.getpid()  # in-process gateway
    assert body["worker"]["in_flight"] == 0


def test_status_configuration_hash_changes_with_the_configuration(upstream: Upstream) -> None:
    config = service_config(upstream.url)
    with running_gateway(config, status=True) as gw:
        first = httpx.get(_status_url(gw)).json()["configuration_hash"]
        assert httpx.get(_status_url(gw)).json()["configuration_hash"] == first  # stable
        config["services"][0]["routes"][0]["paths"] = ["/other"]
        gw.reload(config)
        assert httpx.get(_status_url(gw)).json()["configuration_hash"] != first


def test_status_ready_is_200(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), status=True) as gw:
        r = httpx.get(_status_url(gw, "/status/ready"))
    assert r.status_code == 200
    assert r.json() == {"message": "ready"}


def test_status_unknown_path_is_404_json() -> None:
    with running_gateway(status=True) as gw:
        r = httpx.get(_status_url(gw, "/nope"))
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"message": "Not found"}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_status_refuses_other_methods_with_405(method: str) -> None:
    with running_gateway(status=True) as gw:
        r = httpx.request(method, _status_url(gw), content=b"{}")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert r.json() == {"message": "Method not allowed"}


def test_status_head_has_no_body() -> None:
    with running_gateway(status=True) as gw:
        r = httpx.head(_status_url(gw))
    assert r.status_code == 200
    assert r.content == b""


def test_status_is_not_served_on_the_proxy_listener(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url), status=True) as gw:
        r = httpx.get(gw.url + "/status")
    assert r.json() == {"path": "/status", "method": "GET"}  # proxied like any other path
    assert [rec.target for rec in upstream.requests] == ["/status"]


def test_no_status_listener_unless_asked(upstream: Upstream) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        assert [li.kind for li in gw.runtime.listeners] == ["proxy"]


# --------------------------------------------------------------------------------------------
# Access log

SECRET = "secret-token"


def _log_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The file's lines once it holds at least `count` (the log phase runs after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= count or time.monotonic() > deadline:
            return text.splitlines()
        time.sleep(0.01)


def _send_sensitive_requests(gw: Any) -> None:
    headers = {"Authorization": f"Bearer {SECRET}", "User-Agent": "test-agent"}
    with httpx.Client(headers=headers) as client:
        assert client.get(gw.url + "/fhir/Patient?patient=123&_count=5").status_code == 200
        assert client.post(gw.url + "/fhir/Observation?subject=Patient/123", content=b"{}").status_code == 200
        assert client.get(gw.url + "/nowhere?patient=123").status_code == 404


def _sensitive_config(upstream: Upstream) -> dict[str, Any]:
    return service_config(upstream.url, paths=["/fhir"], strip_path=False)


def test_text_access_log_has_a_line_per_request_without_query_or_credentials(
    upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    with running_gateway(_sensitive_config(upstream), proxy_access_log=str(log), log_format="text") as gw:
        _send_sensitive_requests(gw)
        lines = _log_lines(log, 3)
    assert len(lines) == 3
    get, post, miss = lines
    assert '"GET /fhir/Patient HTTP/1.1" 200 ' in get
    assert '"POST /fhir/Observation HTTP/1.1" 200 ' in post
    assert '"GET /nowhere HTTP/1.1" 404 ' in miss
    for line in lines:
        assert line.startswith("127.0.0.1 - - [")
        assert '"test-agent"' in line
        assert "request_id=" in line
        assert "?" not in line
        assert "patient=" not in line
        assert "subject=" not in line
        assert "Patient/123" not in line
        assert SECRET not in line
        assert "Bearer" not in line


def test_json_access_log_has_a_record_per_request_without_query_or_credentials(
    upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.json"
    with running_gateway(_sensitive_config(upstream), proxy_access_log=str(log), log_format="json") as gw:
        _send_sensitive_requests(gw)
        lines = _log_lines(log, 3)
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [(r["request"]["method"], r["request"]["uri"], r["response"]["status"]) for r in records] == [
        ("GET", "/fhir/Patient", 200),
        ("POST", "/fhir/Observation", 200),
        ("GET", "/nowhere", 404),
    ]
    assert records[0]["request"]["headers"]["authorization"] == "REDACTED"
    assert records[0]["request"]["url"].endswith("/fhir/Patient")
    for line, record in zip(lines, records, strict=True):
        assert "querystring" not in record["request"]
        assert "?" not in line
        assert "patient=" not in line
        assert "subject=" not in line
        assert "Patient/123" not in line
        assert SECRET not in line
        assert "Bearer" not in line


def test_access_log_is_off_by_default(upstream: Upstream, tmp_path: Path) -> None:
    with running_gateway(service_config(upstream.url)) as gw:
        assert httpx.get(gw.url + "/x").status_code == 200
        assert gw.gateway.access_log is None


def test_ready_is_503_while_draining_and_in_flight_requests_finish(upstream: Upstream) -> None:
    import asyncio
    import threading

    from tests.harness import Reply

    upstream.handler = lambda req: Reply(body=b"slow", delay=0.8)
    with running_gateway(service_config(upstream.url), status=True) as gw:
        status_url = f"http://127.0.0.1:{gw.port('status')}"
        assert httpx.get(status_url + "/status/ready").status_code == 200
        result: dict[str, Any] = {}

        def slow_request() -> None:
            result["response"] = httpx.get(gw.url + "/slow", timeout=10)

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 5
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        drained = asyncio.run_coroutine_threadsafe(gw.runtime.shutdown(5.0), gw.loop)
        ready = None
        for _ in range(100):
            try:
                ready = httpx.get(status_url + "/status/ready", timeout=2)
                if ready.status_code == 503:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        assert ready is not None
        assert ready.status_code == 503
        assert ready.json() == {"message": "shutting down"}
        thread.join(10)
        assert result["response"].status_code == 200  # the in-flight request was finished
        assert result["response"].content == b"slow"
        drained.result(10)
        with pytest.raises(httpx.TransportError):  # and then the status listener is gone too
            httpx.get(status_url + "/status/ready", timeout=2)
