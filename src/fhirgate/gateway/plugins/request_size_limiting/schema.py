"""Config of the `request-size-limiting` plugin (Kong's
`kong/plugins/request-size-limiting/schema.lua`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from fhirgate.gateway.plugins.base import PluginConfig

SizeUnit = Literal["megabytes", "kilobytes", "bytes"]
SIZE_UNITS: tuple[SizeUnit, ...] = ("megabytes", "kilobytes", "bytes")
UNIT_FACTOR: dict[str, int] = {"bytes": 1, "kilobytes": 1024, "megabytes": 1024 * 1024}


def _one_of_units(value: object) -> object:
    if isinstance(value, str) and value not in SIZE_UNITS:
        raise ValueError(f"expected one of: {', '.join(SIZE_UNITS)}")
    return value


class RequestSizeLimitingConfig(PluginConfig):
    allowed_payload_size: int = Field(
        default=128,
        ge=0,
        description="Largest request body allowed, in `size_unit`s (default 128 megabytes).",
    )
    size_unit: Annotated[SizeUnit, BeforeValidator(_one_of_units)] = Field(
        default="megabytes",
        description="Unit of `allowed_payload_size`: `megabytes` (2^20 B), `kilobytes` (2^10 B) or `bytes`.",
    )
    require_content_length: bool = Field(
        default=False,
        description="Refuse requests without a `Content-Length` header (411) instead of reading their body.",
    )

    @property
    def limit_bytes(self) -> int:
        return self.allowed_payload_size * UNIT_FACTOR[self.size_unit]


__all__ = ["SIZE_UNITS", "UNIT_FACTOR", "RequestSizeLimitingConfig"]
