"""`prometheus`: schema (Kong's flags), metrics through a running gateway (Kong's names, labels
and buckets; what each flag turns on) and a real two-worker node whose /metrics sums both."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fhirgate.config import load_config_dict
from fhirgate.errors import ConfigError
from fhirgate.gateway.plugins.prometheus import exporter
from fhirgate.gateway.plugins.prometheus.handler import Handler
from fhirgate.gateway.plugins.prometheus.schema import PrometheusConfig
from tests.harness import Reply, Upstream, running_gateway, service_config

ALL_FLAGS = {"status_code_metrics": True, "latency_metrics": True, "bandwidth_metrics": True}


def _cfg(upstream: Upstream, config: dict[str, Any], **route: Any) -> dict[str, Any]:
    cfg = service_config(upstream.url, **route)
    cfg["plugins"] = [{"name": "prometheus", "config": config}]
    return cfg


def _scrape(port: int, wanted: str | None = None, timeout: float = 5.0) -> str:
    """GET /metrics; with `wanted`, until that line appears (the log phase runs after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=UTF-8"
        if wanted is None or wanted in r.text.splitlines() or time.monotonic() > deadline:
            return r.text
        time.sleep(0.02)


def _status_line(count: int, code: int = 200, source: str = "service", **labels: str) -> str:
    """One `kong_http_requests_total` sample as Kong prints it."""
    service, route, consumer = (
        labels.get("service", "s1"),
        labels.get("route", "r1"),
        labels.get("consumer", ""),
    )
    return (
        f'kong_http_requests_total{{service="{service}",route="{route}",code="{code}",source="{source}",'
        f'workspace="default",consumer="{consumer}"}} {count}'
    )


def _names(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


# --- schema ----------------------------------------------------------------------------------


def test_every_flag_defaults_to_false() -> None:
    cfg = load_config_dict({"_format_version": "3.0", "plugins": [{"name": "prometheus"}]})
    conf = cfg.plugins[0].config
    assert isinstance(conf, PrometheusConfig)
    assert conf.model_dump() == {
        "per_consumer": False,
        "status_code_metrics": False,
        "ai_metrics": False,
        "latency_metrics": False,
        "bandwidth_metrics": False,
        "upstream_health_metrics": False,
        "wasm_metrics": False,
    }


def test_unknown_and_mistyped_fields_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            {
                "_format_version": "3.0",
                "plugins": [
                    {"name": "prometheus", "config": {"per_service": True, "latency_metrics": "often"}}
                ],
            }
        )
    issues = {i.location: i.message for i in info.value.issues}
    assert issues["plugins[0].config.per_service"] == "unknown field"
    assert "plugins[0].config.latency_metrics" in issues


def test_the_plugin_runs_at_kongs_priority() -> None:
    assert (Handler.name, Handler.priority) == ("prometheus", 13)


class _Entity:
    """A hashable stand-in for a service, route or consumer (the real ones hash by identity)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


# --- access ----------------------------------------------------------------------------------


def test_with_every_flag_off_only_node_metrics_are_exported(upstream: Upstream) -> None:
    with running_gateway(_cfg(upstream, {}), status=True) as gw:
        for _ in range(3):
            assert httpx.get(gw.url).status_code == 200
        text = _scrape(gw.port("status"))
    assert _names(text) == {"kong_datastore_reachable", "kong_node_info"}
    assert "kong_datastore_reachable 1" in text.splitlines()
    assert re.search(r'^kong_node_info\{node_id="[0-9a-f-]{36}",version="[^"]+"\} 1$', text, re.M)


def test_status_code_metrics_count_requests_with_kongs_labels(upstream: Upstream) -> None:
    with running_gateway(_cfg(upstream, {"status_code_metrics": True}), status=True) as gw:
        for _ in range(3):
            httpx.get(gw.url + "/ok")
        upstream.handler = lambda req: Reply(status=404, body=b"{}")
        httpx.get(gw.url + "/missing")
        line = _status_line(1, code=404)
        text = _scrape(gw.port("status"), wanted=line)
    lines = text.splitlines()
    assert "# TYPE kong_http_requests_total counter" in lines
    assert _status_line(3) in lines
    assert line in lines
    assert _names(text) == {"kong_datastore_reachable", "kong_node_info", "kong_http_requests_total"}


def test_responses_made_by_the_gateway_have_source_kong(upstream: Upstream) -> None:
    cfg = _cfg(upstream, {"status_code_metrics": True})
    cfg["plugins"].append({"name": "rate-limiting", "config": {"hour": 1}})
    with running_gateway(cfg, status=True) as gw:
        httpx.get(gw.url)
        httpx.get(gw.url)
        line = _status_line(1, code=429, source="kong")
        text = _scrape(gw.port("status"), wanted=line)
    assert line in text.splitlines()


def test_requests_without_a_service_are_not_counted(upstream: Upstream) -> None:
    cfg = _cfg(upstream, {"status_code_metrics": True})
    cfg["routes"] = [{"name": "orphan", "paths": ["/orphan"]}]
    with running_gateway(cfg, status=True) as gw:
        assert httpx.get(gw.url + "/orphan").status_code == 503
        httpx.get(gw.url + "/counted")
        text = _scrape(gw.port("status"), wanted=None)
        deadline = time.monotonic() + 5
        while "kong_http_requests_total{" not in text and time.monotonic() < deadline:
            text = _scrape(gw.port("status"))
    counted = [line for line in text.splitlines() if line.startswith("kong_http_requests_total{")]
    assert counted == [_status_line(1)]


def test_latency_metrics_are_histograms_with_kongs_buckets(upstream: Upstream) -> None:
    with running_gateway(_cfg(upstream, {"latency_metrics": True}), status=True) as gw:
        httpx.get(gw.url)
        count = 'kong_request_latency_ms_count{service="s1",route="r1",workspace="default"} 1'
        text = _scrape(gw.port("status"), wanted=count)
    lines = text.splitlines()
    assert _names(text) == {
        "kong_datastore_reachable",
        "kong_node_info",
        "kong_kong_latency_ms",
        "kong_upstream_latency_ms",
        "kong_request_latency_ms",
    }
    assert "# TYPE kong_kong_latency_ms histogram" in lines
    kong_le = re.findall(
        r'^kong_kong_latency_ms_bucket\{service="s1",route="r1",workspace="default",le="([^"]+)"\} 1$',
        text,
        re.M,
    )
    assert kong_le == [*map(str, exporter.KONG_LATENCY_BUCKETS), "+Inf"]
    for name in ("kong_upstream_latency_ms", "kong_request_latency_ms"):
        buckets = re.findall(
            rf'^{name}_bucket\{{service="s1",route="r1",workspace="default",le="([^"]+)"\}} 1$', text, re.M
        )
        assert buckets == [*map(str, exporter.UPSTREAM_LATENCY_BUCKETS), "+Inf"]
        assert f'{name}_count{{service="s1",route="r1",workspace="default"}} 1' in lines
    assert "kong_http_requests_total" not in text


def test_bandwidth_metrics_count_bytes_each_way(upstream: Upstream) -> None:
    with running_gateway(_cfg(upstream, {"bandwidth_metrics": True}), status=True) as gw:
        r = httpx.post(gw.url, content=b"x" * 1000)
        assert r.status_code == 200
        text = _scrape(gw.port("status"), wanted=None)
        deadline = time.monotonic() + 5
        while "egress" not in text and time.monotonic() < deadline:
            text = _scrape(gw.port("status"))
    values = dict(
        re.findall(
            r'^kong_bandwidth_bytes\{service="s1",route="r1",direction="(\w+)",'
            r'workspace="default",consumer=""\} (\d+)$',
            text,
            re.M,
        )
    )
    assert "# TYPE kong_bandwidth_bytes counter" in text.splitlines()
    assert int(values["ingress"]) > 1000  # body plus request head
    assert int(values["egress"]) >= len(r.content)


def test_per_consumer_labels_with_the_consumers_username() -> None:
    exporter.setup_node()
    handler = Handler(PrometheusConfig(per_consumer=True, status_code_metrics=True), "p1")
    service, route = _Entity(name="svc", host="h"), _Entity(name=None, id="route-id")
    kong: Any = SimpleNamespace(
        router=SimpleNamespace(get_service=lambda: service, get_route=lambda: route),
        client=SimpleNamespace(get_consumer=lambda: _Entity(username="alice", id="c1")),
        response=SimpleNamespace(get_status=lambda: 201, get_source=lambda: "service"),
    )
    handler.log(kong)
    handler.log(kong)
    line = _status_line(2, code=201, service="svc", route="route-id", consumer="alice")
    assert line in exporter.render().decode().splitlines()


def test_a_node_start_removes_directories_of_dead_nodes() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # `pid` is now a dead process
    stale = Path(tempfile.gettempdir()) / f"fhirgate-prometheus-{pid}-stale"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    exporter.setup_node()
    assert not stale.exists()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"].startswith(
        str(Path(tempfile.gettempdir()) / f"fhirgate-prometheus-{os.getpid()}-")
    )


def test_log_hook_cost_is_measured() -> None:
    """Not an assertion on speed: prints the µs per request of the log hook (see the report)."""
    exporter.setup_node()
    handler = Handler(PrometheusConfig(status_code_metrics=True), "p1")
    service, route = _Entity(name="svc", host="h"), _Entity(name="r", id="r")
    kong: Any = SimpleNamespace(
        router=SimpleNamespace(get_service=lambda: service, get_route=lambda: route),
        client=SimpleNamespace(get_consumer=lambda: None),
        response=SimpleNamespace(get_status=lambda: 200, get_source=lambda: "service"),
    )
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        handler.log(kong)
    print(f"prometheus log hook (status_code_metrics): {(time.perf_counter() - t0) / n * 1e6:.2f} µs")
    assert f'consumer=""}} {n}' in exporter.render().decode()


# --- a real node with two workers --------------------------------------------------------------


@pytest.mark.slow
def test_a_two_worker_node_reports_the_sum_of_both_workers(upstream: Upstream, tmp_path: Path) -> None:
    config = tmp_path / "kong.yml"
    config.write_text(json.dumps(_cfg(upstream, {"status_code_metrics": True})))
    errors = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fhirgate.cli.main",
            "gateway",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--status-listen",
            "127.0.0.1:0",
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if m := re.search(r"(\w+) listening on (http://\S+)", line):
                urls[m.group(1)] = m.group(2)
            if "ready" in line:
                break
        assert len(urls) == 2, (tmp_path / "stderr.log").read_text()
        proxy = next(u for k, u in urls.items() if k != "status")
        status = urls["status"]
        workers: set[str] = set()
        total = 0
        deadline = time.monotonic() + 30
        while (len(workers) < 2 or total < 100) and time.monotonic() < deadline:
            with httpx.Client() as fresh:  # a new connection each time: the kernel spreads them
                r = fresh.get(proxy + "/x")
            assert r.status_code == 200
            total += 1
            # request ids start with a per-worker random prefix (16 hex digits)
            workers.add(r.headers["x-fhirgate-request-id"][:16])
        assert len(workers) == 2, "both workers should have served requests"
        assert len(upstream.requests) == total
        line = _status_line(total)
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(status + "/metrics").text
            if line in text.splitlines():
                break
            time.sleep(0.05)
        assert line in text.splitlines()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()
        errors.close()
