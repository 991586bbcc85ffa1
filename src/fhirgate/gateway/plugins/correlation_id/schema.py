"""Config of the `correlation-id` plugin (Kong's `kong/plugins/correlation-id/schema.lua`)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from fhirgate.gateway.plugins.base import PluginConfig

Generator = Literal["uuid", "uuid#counter", "tracker"]
GENERATORS: tuple[Generator, ...] = ("uuid", "uuid#counter", "tracker")

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 5.1 token


def _header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"bad header name '{value}': must be an HTTP token (RFC 9110 5.1)")
    return value


def _one_of_generators(value: object) -> object:
    if isinstance(value, str) and value not in GENERATORS:
        raise ValueError(f"expected one of: {', '.join(GENERATORS)}")
    return value


class CorrelationIdConfig(PluginConfig):
    header_name: Annotated[str, AfterValidator(_header_name)] = Field(
        default="Kong-Request-ID",
        description="The HTTP header that carries the correlation ID.",
    )
    generator: Annotated[Generator, BeforeValidator(_one_of_generators)] = Field(
        default="uuid#counter",
        description=(
            "How IDs are made: `uuid` (a random UUID per request), `uuid#counter` (one UUID per "
            "worker, then `#` and a per-worker counter) or `tracker` (where and when the request "
            "was received)."
        ),
    )
    echo_downstream: bool = Field(
        default=False,
        description="Also send the header back to the client in the response.",
    )


__all__ = ["GENERATORS", "CorrelationIdConfig"]
