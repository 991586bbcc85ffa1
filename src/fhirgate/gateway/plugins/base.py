"""What a plugin is: a typed config schema plus a handler with phase hooks and a priority.

A plugin package `fhirgate.gateway.plugins.<module>` holds `schema.py` (a `PluginConfig`
subclass; every field typed, defaulted as in Kong and described) and `handler.py` (a `Plugin`
subclass). Handlers touch the request only through the PDK (`fhirgate.gateway.pdk`).

Phase hooks are optional; define only those the plugin needs. Each may be a plain method or an
`async def`; the pipeline decides which at configuration time, never per request.

- ``rewrite(kong)``: before routing; only global plugins run here (as in Kong).
- ``access(kong)``: after routing, before the upstream is contacted. `kong.response.exit(...)`
  stops the request here.
- ``header_filter(kong)``: the response status and headers are known; change them.
- ``body_filter(kong, chunk, eof) -> bytes``: each response body chunk (rarely needed: defining
  it makes the response go through the plugin chunk by chunk).
- ``log(kong)``: after the response has been sent, off the client's latency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from fhirgate.config import GatewayConfig
    from fhirgate.gateway.pdk import PDK

PHASES = ("rewrite", "access", "header_filter", "body_filter", "log")


class PluginConfig(BaseModel):
    """Base of every plugin's config schema: unknown fields are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Plugin:
    """Base of every plugin handler."""

    #: Kong's plugin name, e.g. ``"rate-limiting"``.
    name: ClassVar[str]
    #: Kong's PRIORITY: higher runs first.
    priority: ClassVar[int]
    version: ClassVar[str] = "0.1.0"
    #: The config schema.
    Config: ClassVar[type[PluginConfig]]
    #: True for plugins that cannot be scoped to a consumer (Kong's ``typedefs.no_consumer``).
    no_consumer: ClassVar[bool] = False
    #: One-line description (shown by `fhirgate config check` and the docs).
    description: ClassVar[str] = ""

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        self.config = config
        self.instance_id = instance_id

    def bind_config(self, config: GatewayConfig) -> None:
        """Called once when the configuration holding this instance is compiled, with the whole
        configuration: build indexes here (e.g. credentials by key), never per request."""

    def init_worker(self) -> None:
        """Called once per worker process after the event loop starts."""

    def close(self) -> None:
        """Called when the configuration that holds this instance is replaced or on shutdown."""

    @classmethod
    def implements(cls, phase: str) -> bool:
        return getattr(cls, phase, None) is not None

    # Phase hooks are looked up with getattr; they are declared for type checkers only.
    if TYPE_CHECKING:
        rewrite: Any
        access: Any
        header_filter: Any
        body_filter: Any
        log: Any

    @classmethod
    def validate_config(cls, raw: Any) -> PluginConfig:
        return cls.Config.model_validate(raw if raw is not None else {})


def phase_hook(plugin: Plugin, phase: str) -> Any:
    """The bound hook of `plugin` for `phase`, or None."""
    return getattr(plugin, phase, None)


__all__ = ["PDK", "PHASES", "Plugin", "PluginConfig", "phase_hook"]
