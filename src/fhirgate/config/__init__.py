"""Declarative configuration (Kong's `kong.yml` format): model, loader and safety warnings."""

from fhirgate.config.loader import FORMAT_VERSIONS, load_config_dict, load_config_file, parse_document
from fhirgate.config.model import (
    Consumer,
    GatewayConfig,
    PluginInstance,
    Route,
    Service,
    empty_config,
)
from fhirgate.config.safety import plugin_safety_check

__all__ = [
    "FORMAT_VERSIONS",
    "Consumer",
    "GatewayConfig",
    "PluginInstance",
    "Route",
    "Service",
    "empty_config",
    "load_config_dict",
    "load_config_file",
    "parse_document",
    "plugin_safety_check",
]
