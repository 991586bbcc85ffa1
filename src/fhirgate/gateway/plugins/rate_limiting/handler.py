"""Kong's `rate-limiting` plugin (`kong/plugins/rate-limiting/handler.lua`, 3.x).

Fixed windows aligned on UTC calendar boundaries as in `kong/tools/timestamp.lua`
(`get_timestamps`): the second, minute, hour, day, the first of the month, the first of January.
Counters are per plugin instance and identifier (Kong keys them by the plugin's route and
service). With policy `local` every window of a request is checked and incremented atomically in
the node's shared-memory table, so all workers together admit exactly the limit; a refused
request does not count.

Headers (unless `hide_client_headers`): `X-RateLimit-Limit-<Period>` and
`X-RateLimit-Remaining-<Period>` for each configured period, and `RateLimit-Limit`,
`RateLimit-Remaining`, `RateLimit-Reset` for the most restrictive one (fewest remaining; on a tie
the longer period). A refused request gets `error_code` / `error_message` and `Retry-After`.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from fhirgate import clock
from fhirgate.errors import MSG_UNEXPECTED
from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.rate_limiting.schema import PERIODS, RateLimitingConfig
from fhirgate.gateway.shm import SharedMemoryError, counter_key, derive_key, node_counters

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK

#: Kong's EXPIRATION (`kong/plugins/rate-limiting/expiration.lua`): seconds per period, used for
#: `RateLimit-Reset` (a month counts as 30 days, a year as 365).
EXPIRATION: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 2592000,
    "year": 31536000,
}

RATELIMIT_LIMIT = "RateLimit-Limit"
RATELIMIT_REMAINING = "RateLimit-Remaining"
RATELIMIT_RESET = "RateLimit-Reset"
RETRY_AFTER = "Retry-After"
X_RATELIMIT_LIMIT = {p: f"X-RateLimit-Limit-{p.capitalize()}" for p in PERIODS}
X_RATELIMIT_REMAINING = {p: f"X-RateLimit-Remaining-{p.capitalize()}" for p in PERIODS}

_KEY_CACHE = 10_000  # identifiers whose counter keys are remembered (per worker)

_windows_cache: tuple[int, tuple[int, ...], tuple[int, ...]] = (-1, (), ())


def windows(now: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Start and end (epoch seconds) of the window of each period in `PERIODS` containing `now`
    (Kong's `timestamp.get_timestamps`, UTC). Cached for the current second."""
    global _windows_cache
    cached = _windows_cache
    if cached[0] == now:
        return cached[1], cached[2]
    tm = time.gmtime(now)
    year, month = tm.tm_year, tm.tm_mon
    day = now - now % 86400
    month_start = calendar.timegm((year, month, 1, 0, 0, 0))
    next_month = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
    year_start = calendar.timegm((year, 1, 1, 0, 0, 0))
    next_year = calendar.timegm((year + 1, 1, 1, 0, 0, 0))
    minute = now - now % 60
    hour = now - now % 3600
    starts = (now, minute, hour, day, month_start, year_start)
    ends = (now + 1, minute + 60, hour + 3600, day + 86400, next_month, next_year)
    _windows_cache = (now, starts, ends)
    return starts, ends


def _num(value: float) -> str:
    """A number as Kong prints a Lua number in a header (`5`, not `5.0`)."""
    if type(value) is int:
        return str(value)
    return str(int(value)) if float(value).is_integer() else repr(value)


def _id_of(entity: Any) -> str | None:
    if entity is None:
        return None
    value = entity.get("id") if isinstance(entity, Mapping) else getattr(entity, "id", None)
    return str(value) if value is not None else None


class Handler(Plugin):
    name: ClassVar[str] = "rate-limiting"
    priority: ClassVar[int] = 910
    Config: ClassVar[type[PluginConfig]] = RateLimitingConfig
    description: ClassVar[str] = (
        "Limit how many requests a consumer, credential, IP, service, header value or path can "
        "make per second, minute, hour, day, month or year (counted per node)."
    )

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        super().__init__(config, instance_id)
        self.conf = cast(RateLimitingConfig, config)
        self._limits = self.conf.limits()
        self._scope = instance_id or repr(sorted(self.conf.model_dump().items()))
        # Computed once, not per request: counter keys per identifier, header texts per period.
        self._keys: dict[str, list[int]] = {}
        self._limit_text = [_num(limit) for _i, _period, limit in self._limits]

    def _identifier(self, kong: PDK) -> str:
        """Kong's `get_identifier`: the client IP when the configured entity is missing."""
        conf = self.conf
        by = conf.limit_by
        identifier: str | None = None
        if by == "consumer":
            identifier = _id_of(kong.client.get_consumer()) or _id_of(kong.client.get_credential())
        elif by == "credential":
            identifier = _id_of(kong.client.get_credential())
        elif by == "service":
            identifier = _id_of(kong.router.get_service())
        elif by == "header":
            assert conf.header_name is not None
            identifier = kong.request.get_header(conf.header_name)
        elif by == "path":
            path = kong.request.get_path()
            if path == conf.path:
                identifier = path
        return identifier or kong.client.get_forwarded_ip()

    def access(self, kong: PDK) -> None:
        conf = self.conf
        now = int(clock.now())
        starts, ends = windows(now)
        identifier = self._identifier(kong)
        limits = self._limits
        keys = self._keys.get(identifier)
        if keys is None:
            base = counter_key(self._scope, identifier)
            keys = [derive_key(base, i) for i, _, _ in limits]
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            self._keys[identifier] = keys
        counters = [(key, starts[i], ends[i], limit) for key, (i, _, limit) in zip(keys, limits, strict=True)]
        try:
            usage, admitted = node_counters().hit(counters, now)
        except SharedMemoryError as exc:
            if not conf.fault_tolerant:
                kong.log.err("rate-limiting: %s", exc)
                kong.response.error(500, MSG_UNEXPECTED)
            kong.log.err("rate-limiting: failed to get usage: %s", exc)
            return
        if conf.hide_client_headers:
            if not admitted:
                kong.response.error(conf.error_code, conf.error_message)
            return
        headers: dict[str, str] = {}
        best_limit = 0.0
        best_remaining = 0.0
        best_window = 0
        reset = 0
        chosen = False
        for (i, period, limit), used, limit_text in zip(limits, usage, self._limit_text, strict=True):
            remaining = limit - used
            if admitted or remaining <= 0:
                remaining -= 1  # this request
            remaining = max(0.0, remaining)
            window = EXPIRATION[period]
            if (
                not chosen
                or remaining < best_remaining
                or (remaining == best_remaining and window > best_window)
            ):
                chosen = True
                best_limit, best_remaining, best_window = limit, remaining, window
                reset = max(1, window - (now - starts[i]))
            headers[X_RATELIMIT_LIMIT[period]] = limit_text
            headers[X_RATELIMIT_REMAINING[period]] = _num(remaining)
        headers[RATELIMIT_LIMIT] = _num(best_limit)
        headers[RATELIMIT_REMAINING] = _num(best_remaining)
        headers[RATELIMIT_RESET] = str(reset)
        if not admitted:
            headers[RETRY_AFTER] = str(reset)
            kong.response.error(conf.error_code, conf.error_message, headers)
        kong.ctx.plugin["headers"] = headers

    def header_filter(self, kong: PDK) -> None:
        headers: dict[str, str] | None = kong.ctx.plugin.get("headers")
        if headers:
            kong.response.set_headers(headers)


__all__ = ["EXPIRATION", "Handler", "windows"]
