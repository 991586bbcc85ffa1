"""Warnings (never errors) for settings that are valid in Kong but unsafe for patient data.

See `DECISIONS.md`, "Kong compatibility versus safe defaults": `fhirgate config check` warns about
query-string tokens, `jwt` without `exp` in `claims_to_verify`, `openid-connect` without
`audience_required`, HS* algorithms with short secrets and FHIR routes without `smart-on-fhir`.

How a plugin adds its own warnings (either works; both run):

1. Register a function by plugin name here::

       @plugin_safety_check("my-plugin")
       def _my_plugin(config: Mapping[str, Any]) -> list[str]: ...

   `config` is the validated plugin config dumped to plain JSON values (Kong field names).
2. Or give the plugin handler class a classmethod ``config_warnings(config) -> Sequence[str]``
   receiving the parsed `PluginConfig`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fhirgate.config.model import Consumer, PluginInstance, Route, Service
from fhirgate.errors import ConfigIssue

__all__ = ["SafetyCheck", "collect_warnings", "plugin_safety_check"]

SafetyCheck = Callable[[Mapping[str, Any]], list[str]]

_PLUGIN_CHECKS: dict[str, SafetyCheck] = {}

# RFC 7518 section 3.2: an HMAC key must be at least as long as the hash output.
_HS_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

SMART_PLUGIN = "smart-on-fhir"


def plugin_safety_check(name: str) -> Callable[[SafetyCheck], SafetyCheck]:
    """Register `fn` as the unsafe-settings check of the plugin called `name` (Kong's name)."""

    def register(fn: SafetyCheck) -> SafetyCheck:
        _PLUGIN_CHECKS[name] = fn
        return fn

    return register


@plugin_safety_check("jwt")
def _jwt(config: Mapping[str, Any]) -> list[str]:
    out = []
    if config.get("uri_param_names", ["jwt"]):
        out.append(
            "jwt accepts tokens in the query string (uri_param_names); URLs end up in logs and "
            "browser history: set uri_param_names: []"
        )
    if "exp" not in (config.get("claims_to_verify") or []):
        out.append("jwt does not verify token expiry: add 'exp' to claims_to_verify")
    return out


@plugin_safety_check("key-auth")
def _key_auth(config: Mapping[str, Any]) -> list[str]:
    if config.get("key_in_query", True):
        return ["key-auth accepts keys in the query string (key_in_query): set key_in_query: false"]
    return []


@plugin_safety_check("openid-connect")
def _openid_connect(config: Mapping[str, Any]) -> list[str]:
    out = []
    if not config.get("audience_required"):
        out.append(
            "openid-connect does not require an audience: set audience_required so tokens "
            "issued for other APIs are refused"
        )
    param_types = config.get("bearer_token_param_type") or []
    if "query" in param_types:
        out.append("openid-connect accepts tokens in the query string (bearer_token_param_type: query)")
    return out


def _plugin_warnings(plugin: PluginInstance) -> list[str]:
    out: list[str] = []
    check = _PLUGIN_CHECKS.get(plugin.name)
    if check is not None:
        out += check(plugin.config.model_dump(mode="json"))
    hook: Callable[[Any], Sequence[str]] | None = getattr(plugin.plugin_class, "config_warnings", None)
    if hook is not None:
        out += list(hook(plugin.config))
    return out


def _covered_by_smart(route: Route, plugins: Sequence[PluginInstance]) -> bool:
    service_id = route.service.id if route.service else None
    for p in plugins:
        if p.name != SMART_PLUGIN or not p.enabled or p.consumer_id is not None:
            continue
        if p.route_id is None and p.service_id is None:
            return True
        if p.route_id not in (None, route.id):
            continue
        if p.service_id not in (None, service_id):
            continue
        return True
    return False


def collect_warnings(
    services: Sequence[tuple[str, Service]],
    routes: Sequence[tuple[str, Route]],
    consumers: Sequence[tuple[str, Consumer]],
    plugins: Sequence[PluginInstance],
) -> list[ConfigIssue]:
    """Every unsafe-setting warning of a loaded configuration; each entity comes with its location."""
    warnings: list[ConfigIssue] = []
    for loc, service in services:
        if service.protocol == "https" and service.tls_verify is False:
            warnings.append(
                ConfigIssue(
                    f"{loc}.tls_verify",
                    "the upstream's TLS certificate is not verified (tls_verify: false)",
                )
            )
    for loc, route in routes:
        if route.path_handling == "v1":
            warnings.append(
                ConfigIssue(
                    f"{loc}.path_handling",
                    "path_handling 'v1' is deprecated; Kong 3.x's default router ignores it "
                    "(fhirgate applies it as Kong's traditional router did)",
                )
            )
        if route.is_fhir and not _covered_by_smart(route, plugins):
            warnings.append(
                ConfigIssue(
                    loc,
                    f"FHIR route (tagged 'fhir') without the {SMART_PLUGIN} plugin: "
                    "SMART scopes and patient compartments are not enforced",
                )
            )
    for loc, consumer in consumers:
        for i, secret in enumerate(consumer.credentials.get("jwt_secrets", ())):
            algorithm = secret.get("algorithm") or "HS256"
            value = secret.get("secret")
            minimum = _HS_MIN_SECRET_BYTES.get(str(algorithm))
            if minimum and isinstance(value, str) and len(value.encode()) < minimum:
                warnings.append(
                    ConfigIssue(
                        f"{loc}.jwt_secrets[{i}].secret",
                        f"{algorithm} secret is shorter than {minimum} bytes (RFC 7518 section 3.2)",
                    )
                )
    for plugin in plugins:
        warnings += [ConfigIssue(plugin.location, msg) for msg in _plugin_warnings(plugin)]
    return warnings
