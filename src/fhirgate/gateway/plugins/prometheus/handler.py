"""Kong's `prometheus` plugin (`kong/plugins/prometheus/handler.lua`): counts each request in the
log phase; the status listener serves the node's metrics at `/metrics` (see `exporter`).

As in Kong, a request without a service is not counted, and each flag turns one group of
per-request metrics on: `status_code_metrics` (`kong_http_requests_total`), `latency_metrics`
(`kong_kong_latency_ms`, `kong_upstream_latency_ms`, `kong_request_latency_ms`),
`bandwidth_metrics` (`kong_bandwidth_bytes`); `per_consumer` fills the `consumer` label with the
consumer's username.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.prometheus import exporter
from fhirgate.gateway.plugins.prometheus.exporter import WORKSPACE
from fhirgate.gateway.plugins.prometheus.schema import PrometheusConfig

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK


def _service_name(service: Any) -> str:
    return str(getattr(service, "name", None) or getattr(service, "host", None) or "")


def _route_name(route: Any) -> str:
    if route is None:
        return ""
    return str(getattr(route, "name", None) or getattr(route, "id", None) or "")


class Handler(Plugin):
    name: ClassVar[str] = "prometheus"
    priority: ClassVar[int] = 13
    Config: ClassVar[type[PluginConfig]] = PrometheusConfig
    description: ClassVar[str] = (
        "Expose Kong-compatible Prometheus metrics (summed over the node's workers) at /metrics on "
        "the status listener."
    )

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        super().__init__(config, instance_id)
        conf = cast(PrometheusConfig, config)
        self.per_consumer = conf.per_consumer
        self.status_codes = conf.status_code_metrics
        self.latency = conf.latency_metrics
        self.bandwidth = conf.bandwidth_metrics
        self.serialize = conf.latency_metrics or conf.bandwidth_metrics

    def log(self, kong: PDK) -> None:
        service = kong.router.get_service()
        if service is None:
            return  # Kong: "do not record any stats if the service is not present"
        if not (self.status_codes or self.serialize):
            return
        m = exporter.metrics()
        route = kong.router.get_route()
        consumer = ""
        if self.per_consumer:
            who = kong.client.get_consumer()
            consumer = str(getattr(who, "username", None) or "") if who is not None else ""
        if self.status_codes:
            code = kong.response.get_status()
            source = "service" if kong.response.get_source() == "service" else "kong"
            key = ("status", service, route, code, source, consumer)
            status_labels = (
                _service_name(service),
                _route_name(route),
                str(code),
                source,
                WORKSPACE,
                consumer,
            )
            m.child(key, m.status, status_labels).inc()
        if not self.serialize:
            return
        record = kong.log.serialize()
        if self.bandwidth:
            ingress = record["request"]["size"] or 0
            egress = record["response"]["size"] or 0
            if ingress > 0:
                bw_labels = (_service_name(service), _route_name(route), "ingress", WORKSPACE, consumer)
                m.child(("in", service, route, consumer), m.bandwidth, bw_labels).inc(ingress)
            if egress > 0:
                bw_labels = (_service_name(service), _route_name(route), "egress", WORKSPACE, consumer)
                m.child(("out", service, route, consumer), m.bandwidth, bw_labels).inc(egress)
        if self.latency:
            latencies = record["latencies"]
            labels = (_service_name(service), _route_name(route), WORKSPACE)
            request_ms = latencies.get("request")
            if request_ms is not None and request_ms >= 0:
                m.child(("total", service, route), m.total_latency, labels).observe(request_ms)
            upstream_ms = latencies.get("proxy")
            if upstream_ms is not None and upstream_ms >= 0:
                m.child(("upstream", service, route), m.upstream_latency, labels).observe(upstream_ms)
            kong_ms = latencies.get("kong")
            if kong_ms is not None and kong_ms >= 0:
                m.child(("kong", service, route), m.kong_latency, labels).observe(kong_ms)


__all__ = ["Handler"]
