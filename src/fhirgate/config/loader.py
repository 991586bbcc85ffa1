"""Load Kong's declarative configuration (DB-less `kong.yml`) into a validated `GatewayConfig`.

Implements Kong 3.x's declarative format (`kong/db/schema/others/declarative_config.lua`;
docs: "DB-less and Declarative Configuration"): `_format_version` "1.1", "2.1" or "3.0"; top-level
`services` (with nested `routes` and `plugins`; routes nest `plugins` too), `routes` (with
`service: <name or id>`), `consumers` (nested `plugins` and credential collections such as
`jwt_secrets`, `acls`, `keyauth_credentials`, kept raw for the plugins that own them), `plugins`
(global, or scoped with `service` / `route` / `consumer` by name or id), and entities kept but not
acted on (`upstreams`, `targets`, `certificates`, `ca_certificates`, `snis`, `vaults`, ...).

Every problem is collected with its location (`services[0].routes[1].paths[0]`) and reported
together in one `ConfigError`; loading never stops at the first problem.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ValidationError

from fhirgate.config.model import (
    Consumer,
    GatewayConfig,
    JSONValue,
    PluginInstance,
    Route,
    Service,
    empty_config,
)
from fhirgate.config.safety import collect_warnings
from fhirgate.config.schema import ConsumerIn, ForeignRef, PluginIn, RouteIn, ServiceIn
from fhirgate.errors import ConfigError, ConfigIssue
from fhirgate.gateway.plugins.base import PluginConfig
from fhirgate.gateway.plugins.registry import available_plugins, get_plugin_class

__all__ = ["FORMAT_VERSIONS", "empty_config", "load_config_dict", "load_config_file", "parse_document"]

FORMAT_VERSIONS = ("1.1", "2.1", "3.0")

# Entities of Kong's declarative format that fhirgate keeps but does not act on (yet).
KEPT_ENTITIES = frozenset(
    {
        "upstreams",
        "targets",
        "certificates",
        "ca_certificates",
        "snis",
        "vaults",
        "consumer_groups",
        "key_sets",
        "keys",
        "parameters",
        "filter_chains",
        "licenses",
    }
)
KEPT_META = frozenset({"_transform", "_comment", "_workspace", "_info", "_konnect"})
# Credential collections of Kong's plugins (`kong/plugins/*/daos.lua`), nested in a consumer or at
# the top level with `consumer: <username or id>`.
CREDENTIAL_COLLECTIONS = frozenset(
    {
        "jwt_secrets",
        "acls",
        "keyauth_credentials",
        "basicauth_credentials",
        "hmacauth_credentials",
        "oauth2_credentials",
        "mtls_auth_credentials",
        "keyauth_ldap_credentials",
    }
)

# Fixed namespace so generated ids stay the same across reloads and nodes.
_ID_NAMESPACE = uuid.UUID("9b1c8c1e-4a4e-5f0e-9a39-6f68697267a7")

_M = TypeVar("_M", bound=BaseModel)


def _is_credential_collection(key: str) -> bool:
    return key in CREDENTIAL_COLLECTIONS or key.endswith("_credentials")


def _stable_id(kind: str, key: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{key}"))


def format_loc(prefix: str, loc: Sequence[int | str]) -> str:
    """`services[0]` + ``("routes", 1, "paths", 0)`` -> ``services[0].routes[1].paths[0]``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# Extra entries pydantic puts in an error location (union members, validator wrappers).
_LOC_NOISE = frozenset(
    {"str", "int", "float", "bool", "none", "dict", "list", "ForeignRef", "CidrPort", "[key]"}
)


def _loc_part_is_noise(part: int | str) -> bool:
    return isinstance(part, str) and (part in _LOC_NOISE or part.startswith(("function-", "literal[")))


def _pydantic_issues(prefix: str, exc: ValidationError) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not _loc_part_is_noise(p)]
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "required field missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        issues.append(ConfigIssue(format_loc(prefix, loc), msg))
    return _dedupe(issues)


def _dedupe(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    seen: set[ConfigIssue] = set()
    out = []
    for issue in issues:
        if issue not in seen:
            seen.add(issue)
            out.append(issue)
    return out


def _ref_key(ref: str | ForeignRef | None) -> str | None:
    if ref is None or isinstance(ref, str):
        return ref
    return ref.key()


@dataclass
class _PendingRoute:
    loc: str
    data: RouteIn
    parent_service: int | None  # index into _Loader.services when nested


@dataclass
class _Loader:
    source: str
    issues: list[ConfigIssue] = field(default_factory=list)
    services: list[tuple[str, Service]] = field(default_factory=list)
    routes: list[tuple[str, Route]] = field(default_factory=list)
    consumers: list[tuple[str, Consumer]] = field(default_factory=list)
    pending_routes: list[_PendingRoute] = field(default_factory=list)
    # Route built from pending_routes[i], or None when it failed (plugins nested in it are skipped).
    resolved_routes: list[Route | None] = field(default_factory=list)
    # (location, plugin, parent kind -> parent index) for every plugin, nested or not.
    pending_plugins: list[tuple[str, PluginIn, dict[str, int | None]]] = field(default_factory=list)
    extra: dict[str, JSONValue] = field(default_factory=dict)

    def error(self, loc: str, msg: str) -> None:
        self.issues.append(ConfigIssue(loc, msg))

    def validate(self, model: type[_M], raw: object, loc: str) -> _M | None:
        if not isinstance(raw, Mapping):
            self.error(loc, f"expected an object, got {_type_name(raw)}")
            return None
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            self.issues += _pydantic_issues(loc, exc)
            return None

    def list_of(self, raw: object, loc: str) -> list[object]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.error(loc, f"expected a list, got {_type_name(raw)}")
            return []
        return raw

    # -- top level -----------------------------------------------------------------------------

    def load(self, data: object) -> GatewayConfig:
        if not isinstance(data, Mapping):
            self.error("", f"expected a mapping at the top level, got {_type_name(data)}")
            raise ConfigError(self.issues, source=self.source)
        version = self._format_version(data.get("_format_version"))
        for key, value in data.items():
            if key in ("_format_version", "services", "routes", "consumers", "plugins"):
                continue
            if not isinstance(key, str):
                self.error("", f"unknown top-level key {key!r}")
            elif key in KEPT_ENTITIES or key in KEPT_META:
                self.extra[key] = value
            elif _is_credential_collection(key):
                self.list_of(value, key)
                self.extra[key] = value
            else:
                self.error(key, "unknown field")

        for i, raw in enumerate(self.list_of(data.get("services"), "services")):
            self._service(raw, f"services[{i}]")
        for i, raw in enumerate(self.list_of(data.get("routes"), "routes")):
            self._route_raw(raw, f"routes[{i}]", parent_service=None)
        for i, raw in enumerate(self.list_of(data.get("consumers"), "consumers")):
            self._consumer(raw, f"consumers[{i}]")
        for i, raw in enumerate(self.list_of(data.get("plugins"), "plugins")):
            self._plugin_raw(raw, f"plugins[{i}]", parents={})

        self._check_unique_services_consumers()
        self._resolve_routes()
        plugins = self._resolve_plugins()
        if self.issues:
            raise ConfigError(self.issues, source=self.source)
        warnings = collect_warnings(self.services, self.routes, self.consumers, plugins)
        config = GatewayConfig(
            format_version=version,
            services=tuple(s for _, s in self.services),
            routes=tuple(r for _, r in self.routes),
            consumers=tuple(c for _, c in self.consumers),
            plugins=tuple(plugins),
            extra=MappingProxyType(self.extra),
            warnings=tuple(warnings),
            source=self.source,
        )
        self._bind_plugins(config)
        return config

    def _bind_plugins(self, config: GatewayConfig) -> None:
        """Checks that need the whole configuration (a plugin's credentials: duplicate keys,
        unparseable public keys): each configured plugin's `bind_config`, run once here so that
        `fhirgate config check` reports what the gateway would refuse at start."""
        seen: set[type] = set()
        issues: list[ConfigIssue] = []
        for plugin in config.plugins:
            cls = plugin.plugin_class
            if cls in seen:
                continue
            seen.add(cls)
            try:
                cls(plugin.config, plugin.id).bind_config(config)
            except ConfigError as exc:
                issues += [i for i in exc.issues if i not in issues]
        if issues:
            raise ConfigError(issues, source=self.source)

    def _format_version(self, raw: object) -> str:
        if raw is None:
            self.error("_format_version", f"required field missing (one of {', '.join(FORMAT_VERSIONS)})")
            return "3.0"
        version = f"{raw:.1f}" if isinstance(raw, float) else str(raw)
        if version not in FORMAT_VERSIONS:
            self.error("_format_version", f"unsupported version {raw!r}: expected one of {FORMAT_VERSIONS}")
        return version

    # -- services ------------------------------------------------------------------------------

    def _service(self, raw: object, loc: str) -> None:
        nested_routes: object = None
        nested_plugins: object = None
        if isinstance(raw, Mapping):
            body = dict(raw)
            nested_routes = body.pop("routes", None)
            nested_plugins = body.pop("plugins", None)
            raw = body
        data = self.validate(ServiceIn, raw, loc)
        index: int | None = None
        if data is not None:
            service = self._build_service(data, loc)
            if service is not None:
                index = len(self.services)
                self.services.append((loc, service))
        for i, r in enumerate(self.list_of(nested_routes, f"{loc}.routes")):
            self._route_raw(r, f"{loc}.routes[{i}]", parent_service=index, nested=True)
        for i, p in enumerate(self.list_of(nested_plugins, f"{loc}.plugins")):
            self._plugin_raw(p, f"{loc}.plugins[{i}]", parents={"service": index})

    def _build_service(self, data: ServiceIn, loc: str) -> Service | None:
        protocol, host, port, path = data.protocol, data.host, data.port, data.path
        if data.url is not None:
            clash = [f for f in ("protocol", "host", "port", "path") if getattr(data, f) is not None]
            if clash:
                self.error(f"{loc}.url", f"'url' cannot be combined with {', '.join(clash)}")
                return None
            parsed = self._parse_url(data.url, f"{loc}.url")
            if parsed is None:
                return None
            protocol, host, port, path = parsed
        if host is None:
            self.error(f"{loc}.host", "required field missing (set 'host' or 'url')")
            return None
        protocol = protocol or "http"
        if port is None:
            port = 443 if protocol == "https" else 80
        name = data.name
        return Service(
            id=data.id or _stable_id("services", name or loc),
            name=name,
            protocol=protocol,
            host=host,
            port=port,
            path=path,
            retries=data.retries,
            connect_timeout=data.connect_timeout,
            write_timeout=data.write_timeout,
            read_timeout=data.read_timeout,
            tags=tuple(data.tags),
            enabled=data.enabled,
            tls_verify=data.tls_verify,
            tls_verify_depth=data.tls_verify_depth,
            ca_certificates=tuple(data.ca_certificates) if data.ca_certificates is not None else None,
            client_certificate=_ref_key(data.client_certificate),
        )

    def _parse_url(self, url: str, loc: str) -> tuple[Any, str, int | None, str | None] | None:
        # Kong's `url` shorthand (services.lua `shorthand_fields`): sets protocol, host, port, path.
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            self.error(loc, f"invalid url '{url}': {exc}")
            return None
        if parts.scheme not in ("http", "https"):
            self.error(loc, f"invalid url '{url}': scheme must be http or https")
            return None
        if not parts.hostname:
            self.error(loc, f"invalid url '{url}': missing host")
            return None
        if parts.query or parts.fragment or parts.username or parts.password:
            self.error(loc, f"invalid url '{url}': no query, fragment or credentials allowed")
            return None
        payload = {"host": parts.hostname, "path": parts.path or None}
        try:
            checked = ServiceIn.model_validate({k: v for k, v in payload.items() if v is not None})
        except ValidationError as exc:
            for issue in _pydantic_issues("", exc):
                self.error(loc, f"invalid url '{url}': {issue}")
            return None
        return parts.scheme, checked.host or parts.hostname, port, checked.path

    # -- routes --------------------------------------------------------------------------------

    def _route_raw(self, raw: object, loc: str, parent_service: int | None, nested: bool = False) -> None:
        nested_plugins: object = None
        if isinstance(raw, Mapping):
            body = dict(raw)
            nested_plugins = body.pop("plugins", None)
            raw = body
        data = self.validate(RouteIn, raw, loc)
        route_index: int | None = None
        if data is not None and self._check_route(data, loc, nested):
            route_index = len(self.pending_routes)
            self.pending_routes.append(_PendingRoute(loc, data, parent_service))
        for i, p in enumerate(self.list_of(nested_plugins, f"{loc}.plugins")):
            self._plugin_raw(p, f"{loc}.plugins[{i}]", parents={"route": route_index})

    def _check_route(self, data: RouteIn, loc: str, nested: bool) -> bool:
        ok = True
        if nested and data.service is not None:
            self.error(f"{loc}.service", "a route nested in a service takes its service from its parent")
            ok = False
        if not (data.methods or data.hosts or data.paths or data.headers or data.snis):
            self.error(
                loc,
                "must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http'"
                + (" (or 'snis' for 'https')" if "https" in data.protocols else ""),
            )
            ok = False
        if data.snis and "https" not in data.protocols:
            self.error(f"{loc}.snis", "'snis' can only be set when 'protocols' is 'https'")
            ok = False
        for fname in ("sources", "destinations"):
            if getattr(data, fname):
                self.error(
                    f"{loc}.{fname}", f"'{fname}' matching is not supported by fhirgate on http routes"
                )
                ok = False
        return ok

    def _resolve_routes(self) -> None:
        by_key = self._index_services()
        seen_names: dict[str, str] = {}
        seen_ids: dict[str, str] = {}
        for pending in self.pending_routes:
            data, loc = pending.data, pending.loc
            service: Service | None = None
            if pending.parent_service is not None:
                service = self.services[pending.parent_service][1]
            elif data.service is not None:
                key = _ref_key(data.service)
                service = by_key.get(key) if key else None
                if service is None:
                    self.error(f"{loc}.service", f"unknown service '{key}'")
                    self.resolved_routes.append(None)
                    continue
            route_id = data.id or _stable_id("routes", data.name or loc)
            if data.name is not None:
                if data.name in seen_names:
                    self.error(
                        f"{loc}.name",
                        f"duplicate route name '{data.name}' (first at {seen_names[data.name]})",
                    )
                seen_names[data.name] = seen_names.get(data.name, loc)
            if route_id in seen_ids:
                self.error(f"{loc}.id", f"duplicate route id '{route_id}' (first at {seen_ids[route_id]})")
            seen_ids.setdefault(route_id, loc)
            tags = tuple(data.tags)
            route = Route(
                id=route_id,
                name=data.name,
                service=service,
                protocols=tuple(data.protocols),
                methods=tuple(data.methods or ()),
                hosts=tuple(data.hosts or ()),
                paths=tuple(data.paths or ()),
                headers=MappingProxyType({k.lower(): tuple(v) for k, v in (data.headers or {}).items()}),
                snis=tuple(data.snis or ()),
                https_redirect_status_code=data.https_redirect_status_code,
                regex_priority=data.regex_priority,
                strip_path=data.strip_path,
                path_handling=data.path_handling,
                preserve_host=data.preserve_host,
                request_buffering=data.request_buffering,
                response_buffering=data.response_buffering,
                tags=tags,
                is_fhir="fhir" in tags or (service is not None and service.is_fhir),
            )
            self.routes.append((loc, route))
            self.resolved_routes.append(route)

    def _index_services(self) -> dict[str, Service]:
        index: dict[str, Service] = {}
        for _, s in self.services:
            index.setdefault(s.id, s)
            if s.name:
                index.setdefault(s.name, s)
        return index

    def _check_unique_services_consumers(self) -> None:
        for kind, entities, keys in (
            ("service", self.services, ("id", "name")),
            ("consumer", self.consumers, ("id", "username", "custom_id")),
        ):
            for key in keys:
                seen: dict[str, str] = {}
                for loc, entity in entities:
                    value = getattr(entity, key)
                    if value is None:
                        continue
                    if value in seen:
                        self.error(
                            f"{loc}.{key}", f"duplicate {kind} {key} '{value}' (first at {seen[value]})"
                        )
                    else:
                        seen[value] = loc

    # -- consumers -----------------------------------------------------------------------------

    def _consumer(self, raw: object, loc: str) -> None:
        nested_plugins: object = None
        credentials: dict[str, tuple[Mapping[str, JSONValue], ...]] = {}
        if isinstance(raw, Mapping):
            body = dict(raw)
            nested_plugins = body.pop("plugins", None)
            for key in list(body):
                if isinstance(key, str) and _is_credential_collection(key):
                    items = self.list_of(body.pop(key), f"{loc}.{key}")
                    kept = []
                    for j, item in enumerate(items):
                        if isinstance(item, Mapping):
                            kept.append(MappingProxyType(dict(item)))
                        else:
                            self.error(f"{loc}.{key}[{j}]", f"expected an object, got {_type_name(item)}")
                    credentials[key] = tuple(kept)
            raw = body
        data = self.validate(ConsumerIn, raw, loc)
        index: int | None = None
        if data is not None:
            if data.username is None and data.custom_id is None:
                self.error(loc, "at least one of these fields must be non-empty: 'custom_id', 'username'")
            else:
                index = len(self.consumers)
                key = data.username or f"custom_id:{data.custom_id}"
                self.consumers.append(
                    (
                        loc,
                        Consumer(
                            id=data.id or _stable_id("consumers", key),
                            username=data.username,
                            custom_id=data.custom_id,
                            tags=tuple(data.tags),
                            credentials=MappingProxyType(credentials),
                        ),
                    )
                )
        for i, p in enumerate(self.list_of(nested_plugins, f"{loc}.plugins")):
            self._plugin_raw(p, f"{loc}.plugins[{i}]", parents={"consumer": index})

    # -- plugins -------------------------------------------------------------------------------

    def _plugin_raw(self, raw: object, loc: str, parents: Mapping[str, int | None]) -> None:
        data = self.validate(PluginIn, raw, loc)
        if data is None:
            return
        for field_name in parents:
            if getattr(data, field_name) is not None:
                self.error(
                    f"{loc}.{field_name}",
                    f"a plugin nested in a {field_name} takes its {field_name} from its parent",
                )
                return
        if any(index is None for index in parents.values()):
            return  # the parent itself is invalid and already reported
        self.pending_plugins.append((loc, data, dict(parents)))

    def _resolve_plugins(self) -> list[PluginInstance]:
        services = self._index_services()
        routes: dict[str, Route] = {}
        for _, r in self.routes:
            routes.setdefault(r.id, r)
            if r.name:
                routes.setdefault(r.name, r)
        consumers: dict[str, Consumer] = {}
        for _, c in self.consumers:
            consumers.setdefault(c.id, c)
            if c.username:
                consumers.setdefault(c.username, c)
        known = available_plugins()
        out: list[PluginInstance] = []
        seen_scopes: dict[tuple[str, str | None, str | None, str | None], str] = {}
        seen_ids: dict[str, str] = {}
        for loc, data, parents in self.pending_plugins:
            ok = True
            service_id: str | None = None
            route_id: str | None = None
            consumer_id: str | None = None
            parent_service, parent_route = parents.get("service"), parents.get("route")
            parent_consumer = parents.get("consumer")
            if parent_service is not None:
                service_id = self.services[parent_service][1].id
            elif data.service is not None:
                key = _ref_key(data.service)
                svc = services.get(key) if key else None
                if svc is None:
                    self.error(f"{loc}.service", f"unknown service '{key}'")
                    ok = False
                else:
                    service_id = svc.id
            if parent_route is not None:
                nested_route = self.resolved_routes[parent_route]
                if nested_route is None:
                    continue  # route failed to resolve; already reported
                route_id = nested_route.id
            elif data.route is not None:
                key = _ref_key(data.route)
                rt = routes.get(key) if key else None
                if rt is None:
                    self.error(f"{loc}.route", f"unknown route '{key}'")
                    ok = False
                else:
                    route_id = rt.id
            if parent_consumer is not None:
                consumer_id = self.consumers[parent_consumer][1].id
            elif data.consumer is not None:
                key = _ref_key(data.consumer)
                cons = consumers.get(key) if key else None
                if cons is None:
                    self.error(f"{loc}.consumer", f"unknown consumer '{key}'")
                    ok = False
                else:
                    consumer_id = cons.id

            plugin_class = get_plugin_class(data.name)
            if plugin_class is None:
                listed = ", ".join(known) if known else "none"
                self.error(
                    f"{loc}.name",
                    f"plugin '{data.name}' is not implemented by fhirgate (available: {listed})",
                )
                continue
            config: PluginConfig | None = None
            try:
                config = plugin_class.validate_config(data.config)
            except ValidationError as exc:
                self.issues += _pydantic_issues(f"{loc}.config", exc)
                ok = False
            except ValueError as exc:
                self.error(f"{loc}.config", str(exc))
                ok = False
            if consumer_id is not None and plugin_class.no_consumer:
                self.error(
                    f"{loc}.consumer" if "consumer" not in parents else loc,
                    f"plugin '{data.name}' cannot be applied to a consumer",
                )
                ok = False
            scope = (data.name, service_id, route_id, consumer_id)
            if ok and scope in seen_scopes:
                self.error(
                    loc,
                    f"plugin '{data.name}' is already configured for this scope (at {seen_scopes[scope]}); "
                    "only one instance per service/route/consumer combination is allowed",
                )
                ok = False
            if not ok or config is None:
                continue
            seen_scopes[scope] = loc
            plugin_id = data.id or _stable_id(
                "plugins", f"{data.name}|{service_id}|{route_id}|{consumer_id}|{data.instance_name or ''}"
            )
            if plugin_id in seen_ids:
                self.error(f"{loc}.id", f"duplicate plugin id '{plugin_id}' (first at {seen_ids[plugin_id]})")
                continue
            seen_ids[plugin_id] = loc
            out.append(
                PluginInstance(
                    id=plugin_id,
                    name=data.name,
                    plugin_class=plugin_class,
                    config=config,
                    enabled=data.enabled,
                    instance_name=data.instance_name,
                    protocols=tuple(data.protocols),
                    service_id=service_id,
                    route_id=route_id,
                    consumer_id=consumer_id,
                    tags=tuple(data.tags),
                    ordering=MappingProxyType(data.ordering) if data.ordering is not None else None,
                    location=loc,
                )
            )
        return out


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def parse_document(text: str, source: str = "") -> object:
    """Parse YAML or JSON (JSON is YAML 1.2; a document starting with `{` is read as JSON first).

    Raises `ConfigError` with the line and column of a syntax error.
    """
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                [ConfigIssue(f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}")],
                source=source,
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError([ConfigIssue(where, f"invalid YAML: {problem}")], source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue("", f"invalid YAML: {exc}")], source=source) from None


def load_config_dict(data: object, source: str = "") -> GatewayConfig:
    """Validate an already-parsed declarative document. Raises `ConfigError` listing every issue."""
    return _Loader(source).load(data)


def load_config_file(path: str | Path) -> GatewayConfig:
    """Read, parse and validate a declarative file (YAML or JSON, detected from its content)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"cannot read file: {exc}")], source=source) from None
    return load_config_dict(parse_document(text, source), source=source)
