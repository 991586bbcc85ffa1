"""Plugins registered by name (never an if-chain). A plugin package registers itself by being
listed in `_BUILTIN`; the module path is `fhirgate.gateway.plugins.<module>.handler` and its
handler class is the module's `Handler`."""

from __future__ import annotations

import importlib
from functools import cache

from fhirgate.gateway.plugins.base import Plugin

# Kong name -> package under fhirgate.gateway.plugins
_BUILTIN: dict[str, str] = {
    "cors": "cors",
    "correlation-id": "correlation_id",
    "file-log": "file_log",
    "ip-restriction": "ip_restriction",
    "jwt": "jwt",
    "key-auth": "key_auth",
    "openid-connect": "openid_connect",
    "prometheus": "prometheus",
    "rate-limiting": "rate_limiting",
    "request-size-limiting": "request_size_limiting",
}


@cache
def _load(module: str) -> type[Plugin] | None:
    try:
        mod = importlib.import_module(f"fhirgate.gateway.plugins.{module}.handler")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(f"fhirgate.gateway.plugins.{module}"):
            return None  # listed but not shipped yet
        raise
    handler: type[Plugin] = mod.Handler
    return handler


def get_plugin_class(name: str) -> type[Plugin] | None:
    """The handler class of the plugin called `name` (Kong's name), or None if fhirgate lacks it."""
    module = _BUILTIN.get(name)
    return _load(module) if module else None


def available_plugins() -> list[str]:
    """Names of the plugins this build implements, sorted."""
    return sorted(name for name, module in _BUILTIN.items() if _load(module) is not None)
