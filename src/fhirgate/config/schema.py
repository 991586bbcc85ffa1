"""Input schemas of Kong's declarative entities (one pydantic model per entity, nested lists excluded).

Field names, types, defaults and limits follow Kong 3.x (`kong/db/schema/entities/services.lua`,
`routes.lua`, `consumers.lua`, `plugins.lua`, `kong/db/schema/typedefs.lua`). Unknown fields are
errors. Nested collections (a service's `routes` and `plugins`, a consumer's credentials) are taken
out by the loader before these models run, so each nested entity is validated on its own and its
errors carry its own location.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from fhirgate.config.model import JSONValue
from fhirgate.gateway.normalize import BadPathError, normalize_path

__all__ = [
    "ConsumerIn",
    "ForeignRef",
    "PluginIn",
    "RouteIn",
    "ServiceIn",
    "compile_route_regex",
]

MAX_TIMEOUT = 2**31 - 2  # Kong's `typedefs.timeout`: between 1 and 2^31-2 ms.

_NAME_RE = re.compile(r"^[\w.~-]+$")  # Kong's `typedefs.utf8_name`
_HOST_LABELS_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
_IPV6_RE = re.compile(r"^\[[0-9a-f:.]+\]$")
_METHOD_RE = re.compile(r"^[A-Z]+$")
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # RFC 9110 token
# Kong (PCRE) writes named groups `(?<name>...)`; Python's `re` needs `(?P<name>...)`.
_PCRE_NAMED_GROUP_RE = re.compile(r"\(\?<(?![=!])")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _check_uuid(value: str) -> str:
    try:
        uuid.UUID(value)
    except ValueError:
        raise ValueError("expected a valid UUID") from None
    return value


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError("invalid name: letters, digits, '.', '-', '_' and '~' only")
    return value


def _check_port(value: str, port: str) -> None:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port number in '{value}'")


def check_hostname(value: str, *, wildcard: bool, port: bool) -> str:
    """Kong's `typedefs.host` / `typedefs.host_with_optional_port` / `typedefs.wildcard_host`."""
    host = value.lower()
    if host.startswith("["):  # IPv6 literal, optionally with a port
        ipv6, bracket, rest = host.partition("]")
        if not bracket or not _IPV6_RE.match(ipv6 + "]"):
            raise ValueError(f"invalid hostname '{value}'")
        if rest:
            if not (port and rest.startswith(":")):
                raise ValueError(f"invalid hostname '{value}'")
            _check_port(value, rest[1:])
        return value
    if ":" in host:
        if not port:
            raise ValueError(f"invalid hostname '{value}': no port allowed here")
        host, _, port_part = host.rpartition(":")
        _check_port(value, port_part)
    if wildcard and host.count("*") == 1:
        if host.startswith("*."):
            host = host[2:]
        elif host.endswith(".*"):
            host = host[:-2]
        else:
            raise ValueError(f"invalid wildcard '{value}': the '*' must be the first or last label")
    elif "*" in host:
        detail = ": only one wildcard is allowed" if wildcard else ""
        raise ValueError(f"invalid hostname '{value}'{detail}")
    if not host or not _HOST_LABELS_RE.match(host):
        raise ValueError(f"invalid hostname '{value}'")
    return value


def _check_service_host(value: str) -> str:
    return check_hostname(value, wildcard=False, port=False)


def _check_route_host(value: str) -> str:
    return check_hostname(value, wildcard=True, port=True)


def _check_service_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("should start with: /")
    try:
        normalize_path(value)
    except BadPathError as exc:
        raise ValueError(f"invalid path: {exc}") from None
    return value


def compile_route_regex(path: str) -> re.Pattern[str]:
    """Compile a Kong regex path (``~/...``) as Kong's router uses it: anchored at the start."""
    body = _PCRE_NAMED_GROUP_RE.sub("(?P<", path[1:])
    return re.compile(body)


def _check_route_path(value: str) -> str:
    if value.startswith("~"):
        try:
            compile_route_regex(value)
        except re.error as exc:
            raise ValueError(f"invalid regex '{value[1:]}': {exc}") from None
        return value
    if not value.startswith("/"):
        raise ValueError("should start with: / (fixed path) or ~/ (regex path)")
    try:
        normalize_path(value)
    except BadPathError as exc:
        raise ValueError(f"invalid path: {exc}") from None
    return value


def _check_method(value: str) -> str:
    if not _METHOD_RE.match(value):
        raise ValueError(f"invalid method '{value}': must be uppercase letters (e.g. GET)")
    return value


def _check_header_name(value: str) -> str:
    if not _HEADER_NAME_RE.match(value):
        raise ValueError(f"invalid header name '{value}'")
    if value.lower() == "host":
        raise ValueError("cannot contain 'host' header, which must be specified in the 'hosts' attribute")
    return value


Uuid = Annotated[str, AfterValidator(_check_uuid)]
Name = Annotated[str, AfterValidator(_check_name)]
Tags = list[Annotated[str, Field(min_length=1)]]
Port = Annotated[int, Field(ge=0, le=65535)]
Timeout = Annotated[int, Field(ge=1, le=MAX_TIMEOUT)]
RoutePath = Annotated[str, AfterValidator(_check_route_path)]
RouteHost = Annotated[str, AfterValidator(_check_route_host)]
Method = Annotated[str, AfterValidator(_check_method)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
Sni = Annotated[str, AfterValidator(lambda v: check_hostname(v, wildcard=True, port=False))]


class ForeignRef(_Strict):
    """A reference written as an object (``service: {id: ...}`` or ``{name: ...}``)."""

    id: str | None = None
    name: str | None = None
    username: str | None = None

    def key(self) -> str | None:
        return self.id or self.name or self.username


Ref = str | ForeignRef


class CidrPort(_Strict):
    ip: str | None = None
    port: Port | None = None


class ServiceIn(_Strict):
    id: Uuid | None = None
    name: Name | None = None
    url: str | None = None
    protocol: Literal["http", "https"] | None = None
    host: Annotated[str, AfterValidator(_check_service_host)] | None = None
    port: Port | None = None
    path: Annotated[str, AfterValidator(_check_service_path)] | None = None
    retries: Annotated[int, Field(ge=0, le=32767)] = 5
    connect_timeout: Timeout = 60000
    write_timeout: Timeout = 60000
    read_timeout: Timeout = 60000
    tags: Tags = []
    enabled: bool = True
    tls_verify: bool | None = None
    tls_verify_depth: Annotated[int, Field(ge=0, le=64)] | None = None
    ca_certificates: list[Uuid] | None = None
    client_certificate: Ref | None = None
    created_at: int | None = None
    updated_at: int | None = None


class RouteIn(_Strict):
    id: Uuid | None = None
    name: Name | None = None
    protocols: Annotated[list[Literal["http", "https"]], Field(min_length=1)] = ["http", "https"]
    methods: list[Method] | None = None
    hosts: list[RouteHost] | None = None
    paths: list[RoutePath] | None = None
    headers: dict[HeaderName, Annotated[list[str], Field(min_length=1)]] | None = None
    snis: list[Sni] | None = None
    sources: list[CidrPort] | None = None
    destinations: list[CidrPort] | None = None
    https_redirect_status_code: Literal[426, 301, 302, 307, 308] = 426
    regex_priority: int = 0
    strip_path: bool = True
    path_handling: Literal["v0", "v1"] = "v0"
    preserve_host: bool = False
    request_buffering: bool = True
    response_buffering: bool = True
    tags: Tags = []
    service: Ref | None = None
    created_at: int | None = None
    updated_at: int | None = None


class ConsumerIn(_Strict):
    id: Uuid | None = None
    username: Annotated[str, Field(min_length=1)] | None = None
    custom_id: Annotated[str, Field(min_length=1)] | None = None
    tags: Tags = []
    created_at: int | None = None
    updated_at: int | None = None


_PROTOCOLS = Literal["grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp", "ws", "wss"]


class PluginIn(_Strict):
    id: Uuid | None = None
    name: Annotated[str, Field(min_length=1)]
    instance_name: Name | None = None
    config: dict[str, JSONValue] | None = None
    enabled: bool = True
    protocols: Annotated[list[_PROTOCOLS], Field(min_length=1)] = ["grpc", "grpcs", "http", "https"]
    service: Ref | None = None
    route: Ref | None = None
    consumer: Ref | None = None
    tags: Tags = []
    ordering: dict[str, JSONValue] | None = None
    created_at: int | None = None
    updated_at: int | None = None
