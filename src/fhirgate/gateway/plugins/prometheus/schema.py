"""Config of the `prometheus` plugin (Kong's `kong/plugins/prometheus/schema.lua`). Every metric
that can have many series is off by default, as in Kong."""

from __future__ import annotations

from pydantic import Field

from fhirgate.gateway.plugins.base import PluginConfig


class PrometheusConfig(PluginConfig):
    per_consumer: bool = Field(
        False, description="A boolean value that determines if per-consumer metrics should be collected."
    )
    status_code_metrics: bool = Field(
        False, description="A boolean value that determines if status code metrics should be collected."
    )
    ai_metrics: bool = Field(
        False,
        description="A boolean value that determines if AI metrics should be collected (no effect here).",
    )
    latency_metrics: bool = Field(
        False, description="A boolean value that determines if latency metrics should be collected."
    )
    bandwidth_metrics: bool = Field(
        False, description="A boolean value that determines if bandwidth metrics should be collected."
    )
    upstream_health_metrics: bool = Field(
        False,
        description=(
            "A boolean value that determines if upstream metrics should be collected (no effect until "
            "fhirgate runs health checks on upstream targets)."
        ),
    )
    wasm_metrics: bool = Field(
        False,
        description="A boolean value that determines if Wasm metrics should be collected (no effect here).",
    )


__all__ = ["PrometheusConfig"]
