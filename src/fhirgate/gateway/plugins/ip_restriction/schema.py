"""Config of the `ip-restriction` plugin (Kong's `kong/plugins/ip-restriction/schema.lua`)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Self

from pydantic import AfterValidator, Field, model_validator

from fhirgate.gateway.plugins.base import PluginConfig

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip_or_cidr(value: str) -> IPNetwork:
    """`10.0.0.1`, `10.0.0.0/8`, `::1` or `2001:db8::/32` as a network (host bits ignored, as
    Kong's `ipmatcher` does); raises ValueError otherwise."""
    return ipaddress.ip_network(value.strip(), strict=False)


def _ip_or_cidr(value: str) -> str:
    # Kong: `typedefs.ip_or_cidr`.
    try:
        parse_ip_or_cidr(value)
    except ValueError:
        raise ValueError(f"invalid ip or cidr range: '{value}'") from None
    return value


IpOrCidr = Annotated[str, AfterValidator(_ip_or_cidr)]


class IpRestrictionConfig(PluginConfig):
    allow: list[IpOrCidr] | None = Field(
        default=None,
        description="IPs or CIDR ranges to allow. One of `allow` or `deny` must be specified.",
    )
    deny: list[IpOrCidr] | None = Field(
        default=None,
        description="IPs or CIDR ranges to deny. One of `allow` or `deny` must be specified.",
    )
    status: int | None = Field(
        default=None,
        ge=100,
        le=599,
        description="HTTP status of refused requests (default 403).",
    )
    message: str | None = Field(
        default=None,
        description="Message of refused requests (default `IP address not allowed: <address>`).",
    )

    @model_validator(mode="after")
    def _at_least_one_list(self) -> Self:
        # Kong: `at_least_one_of = { "config.allow", "config.deny" }` (empty arrays count as unset).
        if not self.allow and not self.deny:
            raise ValueError("at least one of these fields must be non-empty: 'config.allow', 'config.deny'")
        return self


__all__ = ["IPNetwork", "IpRestrictionConfig", "parse_ip_or_cidr"]
