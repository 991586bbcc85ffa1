"""The loaded, validated configuration: immutable objects the data plane reads on the hot path.

Field names and defaults follow Kong's entities (Kong Admin API reference, "Service Object",
"Route Object", "Consumer Object", "Plugin Object"; `kong/db/schema/entities/*.lua`). These objects
are produced only by `fhirgate.config.loader`, which has already validated everything: nothing here
validates again. Entities compare and hash by identity (`eq=False`), so they can key dicts cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from pydantic import JsonValue

from fhirgate.errors import ConfigIssue

if TYPE_CHECKING:
    from fhirgate.gateway.plugins.base import Plugin, PluginConfig

__all__ = [
    "Consumer",
    "GatewayConfig",
    "JSONValue",
    "PathHandling",
    "PluginInstance",
    "Route",
    "Service",
    "empty_config",
]

#: A value as found in a YAML/JSON document.
JSONValue = JsonValue
PathHandling = Literal["v0", "v1"]

_EMPTY: Mapping[str, tuple[str, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Service:
    """Kong's Service: where matched requests go upstream."""

    id: str
    name: str | None
    protocol: Literal["http", "https"]
    host: str
    port: int
    path: str | None
    retries: int = 5
    connect_timeout: int = 60000
    write_timeout: int = 60000
    read_timeout: int = 60000
    tags: tuple[str, ...] = ()
    enabled: bool = True
    tls_verify: bool | None = None
    tls_verify_depth: int | None = None
    ca_certificates: tuple[str, ...] | None = None
    client_certificate: str | None = None

    @property
    def is_fhir(self) -> bool:
        return "fhir" in self.tags


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """Kong's Route (http/https subsystem). `service` is resolved; `is_fhir` is precomputed."""

    id: str
    name: str | None
    service: Service | None
    protocols: tuple[str, ...] = ("http", "https")
    methods: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    snis: tuple[str, ...] = ()
    sources: tuple[Mapping[str, str | int], ...] = ()
    destinations: tuple[Mapping[str, str | int], ...] = ()
    https_redirect_status_code: int = 426
    regex_priority: int = 0
    strip_path: bool = True
    path_handling: PathHandling = "v0"
    preserve_host: bool = False
    request_buffering: bool = True
    response_buffering: bool = True
    tags: tuple[str, ...] = ()
    #: True when the route or its service is tagged `fhir` (FHIR error dialect, FHIR warnings).
    is_fhir: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Consumer:
    """Kong's Consumer. Credential collections (`jwt_secrets`, `acls`, `keyauth_credentials`, ...)
    are kept raw, keyed by collection name, for the plugins that own them."""

    id: str
    username: str | None
    custom_id: str | None
    tags: tuple[str, ...] = ()
    credentials: Mapping[str, tuple[Mapping[str, JSONValue], ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True, slots=True, eq=False)
class PluginInstance:
    """One configured plugin with its scope resolved to ids and its config parsed."""

    id: str
    name: str
    plugin_class: type[Plugin]
    config: PluginConfig
    enabled: bool = True
    instance_name: str | None = None
    protocols: tuple[str, ...] = ("grpc", "grpcs", "http", "https")
    service_id: str | None = None
    route_id: str | None = None
    consumer_id: str | None = None
    tags: tuple[str, ...] = ()
    ordering: Mapping[str, JSONValue] | None = None
    #: Where it was declared, e.g. ``services[0].plugins[1]`` (for messages).
    location: str = ""

    @property
    def is_global(self) -> bool:
        return self.service_id is None and self.route_id is None and self.consumer_id is None


@dataclass(frozen=True, slots=True, eq=False)
class GatewayConfig:
    """A whole declarative configuration, validated. Routes and plugins are flattened."""

    format_version: str
    services: tuple[Service, ...] = ()
    routes: tuple[Route, ...] = ()
    consumers: tuple[Consumer, ...] = ()
    plugins: tuple[PluginInstance, ...] = ()
    #: Entities kept but not acted on (upstreams, targets, certificates, top-level credentials...).
    extra: Mapping[str, JSONValue] = field(default_factory=lambda: MappingProxyType({}))
    warnings: tuple[ConfigIssue, ...] = ()
    source: str = ""

    def service_by_id(self, service_id: str) -> Service | None:
        return next((s for s in self.services if s.id == service_id), None)

    def route_by_id(self, route_id: str) -> Route | None:
        return next((r for r in self.routes if r.id == route_id), None)

    def consumer_by_id(self, consumer_id: str) -> Consumer | None:
        return next((c for c in self.consumers if c.id == consumer_id), None)


def empty_config() -> GatewayConfig:
    """A configuration with nothing in it (what a node serves before its first load)."""
    return GatewayConfig(format_version="3.0")
