"""Config of the `rate-limiting` plugin (Kong's `kong/plugins/rate-limiting/schema.lua`, with the
Redis sub-record of `kong/tools/redis/schema.lua`).

Policies: `local` counts exactly per node in shared memory (`fhirgate.gateway.shm`). `redis`
(cross-node) and `cluster` (database counters) are refused at load time for now, with a message
saying so, instead of silently counting per node.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fhirgate.gateway.plugins.base import PluginConfig

#: Kong's ORDERED_PERIODS, shortest first.
PERIODS: tuple[str, ...] = ("second", "minute", "hour", "day", "month", "year")
SYNC_RATE_REALTIME = -1.0

MSG_AT_LEAST_ONE = "at least one of these fields must be non-empty: " + ", ".join(
    f"'config.{p}'" for p in PERIODS
)
MSG_GT_ZERO = "value must be greater than 0"
MSG_SYNC_RATE_LOCAL = "sync_rate can only be used with the redis policy"
MSG_SYNC_RATE_MIN = "sync_rate must be greater than 0.02, or -1 to disable"
MSG_POLICY_LATER = (
    "policy '{policy}' is not available yet in fhirgate: use 'local' (counts exactly per node, "
    "shared by all its workers); 'redis' (counts across nodes) arrives in a later release"
)
MSG_REQUIRED = "required field missing"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

# Kong 2.x/3.x top-level Redis fields, translated into `redis.*` (Kong's shorthand_fields).
_REDIS_SHORTHANDS = {
    "redis_host": "host",
    "redis_port": "port",
    "redis_password": "password",
    "redis_username": "username",
    "redis_ssl": "ssl",
    "redis_ssl_verify": "ssl_verify",
    "redis_server_name": "server_name",
    "redis_timeout": "timeout",
    "redis_database": "database",
}


class RedisConfig(PluginConfig):
    """Kong's shared Redis record (`kong/tools/redis/schema.lua`). Parsed and kept."""

    host: str | None = Field(None, description="A string representing a host name, such as example.com.")
    port: int = Field(6379, ge=0, le=65535, description="An integer representing a port number.")
    timeout: int = Field(
        2000, ge=0, description="Connection timeout in ms (deprecated, use the three below)."
    )
    connect_timeout: int = Field(2000, ge=0, description="Timeout in ms to connect to Redis.")
    send_timeout: int = Field(2000, ge=0, description="Timeout in ms to send to Redis.")
    read_timeout: int = Field(2000, ge=0, description="Timeout in ms to read from Redis.")
    username: str | None = Field(None, description="Username for Redis ACL authentication (Redis 6+).")
    password: str | None = Field(None, description="Password to authenticate to Redis.")
    database: int = Field(0, description="The Redis database to use.")
    keepalive_pool_size: int = Field(256, ge=1, description="Connections kept alive per pool.")
    keepalive_backlog: int | None = Field(
        None, ge=0, description="Queued connection requests when the pool is full."
    )
    ssl: bool = Field(False, description="Connect to Redis over TLS.")
    ssl_verify: bool = Field(False, description="Verify the Redis server's TLS certificate.")
    server_name: str | None = Field(None, description="SNI server name for the TLS connection.")


def _field_error(field: str, message: str, value: Any) -> ValidationError:
    """A validation error located at `config.<field>` (a model-level check about one field)."""
    return ValidationError.from_exception_data(
        "RateLimitingConfig",
        [InitErrorDetails(type=PydanticCustomError("rate_limiting", message), loc=(field,), input=value)],
    )


class RateLimitingConfig(PluginConfig):
    second: float | None = Field(None, description="The number of HTTP requests that can be made per second.")
    minute: float | None = Field(None, description="The number of HTTP requests that can be made per minute.")
    hour: float | None = Field(None, description="The number of HTTP requests that can be made per hour.")
    day: float | None = Field(None, description="The number of HTTP requests that can be made per day.")
    month: float | None = Field(None, description="The number of HTTP requests that can be made per month.")
    year: float | None = Field(None, description="The number of HTTP requests that can be made per year.")
    limit_by: Literal["consumer", "credential", "ip", "service", "header", "path"] = Field(
        "consumer",
        description=(
            "The entity that is used when aggregating the limits. When it cannot be determined "
            "(no consumer, no credential, header absent, other path) the client IP is used."
        ),
    )
    header_name: str | None = Field(None, description="A string representing an HTTP header name.")
    path: str | None = Field(None, description="A string representing a URL path, such as /path/to/resource.")
    policy: Literal["local", "cluster", "redis"] = Field(
        "local",
        description=(
            "The rate-limiting policies to use for retrieving and incrementing the limits. `local` "
            "counts exactly per node (all workers share the counters)."
        ),
    )
    fault_tolerant: bool = Field(
        True,
        description=(
            "Proxy requests even if the counter store cannot be used (rate limiting is then off "
            "until it works again). If false, clients get `500` errors."
        ),
    )
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis configuration.")
    hide_client_headers: bool = Field(False, description="Optionally hide informative response headers.")
    error_code: int = Field(
        429, description="Set a custom error code to return when the rate limit is exceeded."
    )
    error_message: str = Field(
        "API rate limit exceeded",
        description="Set a custom error message to return when the rate limit is exceeded.",
    )
    sync_rate: float = Field(
        SYNC_RATE_REALTIME,
        description=(
            "How often to sync counter data to the central data store. A value of -1 results in "
            "synchronous behavior."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        # Kong's deprecated `redis_host`, `redis_port`, ... -> `redis.host`, `redis.port`, ...
        if not isinstance(data, dict) or not any(k in data for k in _REDIS_SHORTHANDS):
            return data
        data = dict(data)
        redis = dict(data.get("redis") or {})
        for old, new in _REDIS_SHORTHANDS.items():
            if old in data:
                value = data.pop(old)
                if value is not None:
                    redis[new] = value
        data["redis"] = redis
        return data

    @field_validator("second", "minute", "hour", "day", "month", "year")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(MSG_GT_ZERO)
        return v

    @field_validator("error_code")
    @classmethod
    def _status(cls, v: int) -> int:
        # Kong only asks for a number > 0; a status line needs three digits (RFC 9110 15).
        if not 100 <= v <= 599:
            raise ValueError("value should be an HTTP status code between 100 and 599")
        return v

    @field_validator("header_name")
    @classmethod
    def _header_name(cls, v: str | None) -> str | None:
        # Kong: typedefs.header_name (`validate_header_name`).
        if v is not None and not _HEADER_NAME.match(v):
            raise ValueError(f"bad header name '{v}', allowed characters are A-Z, a-z, 0-9, '_', and '-'")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        # Kong: typedefs.path.
        if v is not None and not v.startswith("/"):
            raise ValueError("should start with: /")
        return v

    @model_validator(mode="after")
    def _checks(self) -> Self:
        limits = [(p, getattr(self, p)) for p in PERIODS]
        if all(v is None for _, v in limits):
            raise ValueError(MSG_AT_LEAST_ONE)
        # Kong's validate_periods_order: a longer period may not allow fewer requests.
        for i, (lower, v1) in enumerate(limits):
            if v1 is None:
                continue
            for upper, v2 in limits[i + 1 :]:
                if v2 is not None and v2 < v1:
                    raise ValueError(
                        f"The limit for {upper}({v2:.1f}) cannot be lower than "
                        f"the limit for {lower}({v1:.1f})"
                    )
        if self.policy != "redis" and self.sync_rate != SYNC_RATE_REALTIME:
            raise ValueError(MSG_SYNC_RATE_LOCAL)
        if self.policy == "redis" and self.sync_rate != SYNC_RATE_REALTIME and self.sync_rate < 0.02:
            raise ValueError(MSG_SYNC_RATE_MIN)
        if self.limit_by == "header" and self.header_name is None:
            raise _field_error("header_name", MSG_REQUIRED, None)
        if self.limit_by == "path" and self.path is None:
            raise _field_error("path", MSG_REQUIRED, None)
        if self.policy != "local":
            raise _field_error("policy", MSG_POLICY_LATER.format(policy=self.policy), self.policy)
        return self

    def limits(self) -> list[tuple[int, str, float]]:
        """The configured limits as ``(period index, period, limit)``, shortest period first."""
        return [(i, p, v) for i, p in enumerate(PERIODS) if (v := getattr(self, p)) is not None]


__all__ = ["PERIODS", "RateLimitingConfig", "RedisConfig"]
