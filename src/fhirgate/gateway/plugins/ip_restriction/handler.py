"""Kong's `ip-restriction` plugin (`kong/plugins/ip-restriction/handler.lua`, priority 990).

The client address is `kong.client.get_forwarded_ip()` (Kong uses nginx's `remote_addr` after the
real-IP module, i.e. `X-Forwarded-For`/`X-Real-IP` only from trusted proxies). The deny list is
checked first, then the allow list: an address in both is refused; with only a deny list every
other address passes; with an allow list every address outside it is refused.

The lists are compiled once into sorted, merged integer ranges per address family, so a request
costs one address parse and one binary search per list, whatever the list sizes.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.ip_restriction.schema import IpRestrictionConfig, parse_ip_or_cidr

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK

DEFAULT_STATUS = 403
MSG_NOT_ALLOWED = "IP address not allowed: {}"


class RangeSet:
    """A set of IP addresses as sorted, non-overlapping [first, last] integer ranges per family."""

    __slots__ = ("_v4_firsts", "_v4_lasts", "_v6_firsts", "_v6_lasts")

    def __init__(self, entries: Iterable[str]) -> None:
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for entry in entries:
            net = parse_ip_or_cidr(entry)
            ranges[net.version].append((int(net.network_address), int(net.broadcast_address)))
        self._v4_firsts, self._v4_lasts = self._merge(ranges[4])
        self._v6_firsts, self._v6_lasts = self._merge(ranges[6])

    @staticmethod
    def _merge(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        firsts: list[int] = []
        lasts: list[int] = []
        for first, last in sorted(ranges):
            if lasts and first <= lasts[-1] + 1:
                lasts[-1] = max(lasts[-1], last)
            else:
                firsts.append(first)
                lasts.append(last)
        return firsts, lasts

    def __bool__(self) -> bool:
        return bool(self._v4_firsts or self._v6_firsts)

    def __contains__(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if addr.version == 4:
            firsts, lasts = self._v4_firsts, self._v4_lasts
        else:
            firsts, lasts = self._v6_firsts, self._v6_lasts
        value = int(addr)
        i = bisect_right(firsts, value) - 1
        return i >= 0 and value <= lasts[i]


def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address to check, or None if `ip` is not one. An IPv4-mapped IPv6 address
    (`::ffff:10.0.0.1`, from a dual-stack listener) is checked as the IPv4 address it carries."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Handler(Plugin):
    name = "ip-restriction"
    priority = 990
    Config = IpRestrictionConfig
    description = "Allow or deny requests by client IP address or CIDR range."

    config: IpRestrictionConfig

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        if not isinstance(config, IpRestrictionConfig):
            raise TypeError(f"ip-restriction: expected IpRestrictionConfig, got {type(config).__name__}")
        super().__init__(config, instance_id)
        self.config = config
        self._deny = RangeSet(config.deny or ())
        self._allow = RangeSet(config.allow or ())
        self._has_allow = bool(config.allow)
        self._status = config.status or DEFAULT_STATUS

    def access(self, kong: PDK) -> None:
        ip = kong.client.get_forwarded_ip()
        addr = client_address(ip)
        if addr is None:
            # Not an IP address (e.g. a malformed header from a trusted proxy): fail closed.
            self._refuse(kong, ip)
        elif addr in self._deny or (self._has_allow and addr not in self._allow):
            self._refuse(kong, ip)

    def _refuse(self, kong: PDK, ip: str) -> None:
        message = self.config.message
        if message is None:
            message = MSG_NOT_ALLOWED.format(ip)
        kong.log.warn("ip-restriction: %s", message)
        kong.response.error(self._status, message)


__all__ = ["MSG_NOT_ALLOWED", "Handler", "RangeSet", "client_address"]
