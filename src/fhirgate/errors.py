"""Typed errors. Each carries what went wrong; rendering happens in one place per dialect
(`fhirgate.gateway.dialect` for the gateway, the CLI for configuration errors)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class FhirgateError(Exception):
    """Base of every error fhirgate raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration, with where it is (`services[0].routes[1].paths[0]`)."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(FhirgateError):
    """A declarative file or node settings that cannot be used. Lists every issue found."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str = "") -> None:
        self.issues = list(issues)
        self.source = source
        super().__init__(self.describe())

    def describe(self) -> str:
        head = f"{self.source}: " if self.source else ""
        lines = [f"{head}{len(self.issues)} error(s) in configuration"]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


@dataclass
class GatewayExit(FhirgateError):
    """Stop processing the request and answer the client now (Kong's `kong.response.exit`).

    `body` is a JSON-able value (dict, list, str) or raw bytes; a dict with a `message` key is
    rendered in the route's error dialect (Kong JSON or FHIR OperationOutcome).
    """

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # FHIR OperationOutcome issue code used when the route speaks FHIR.
    fhir_code: str | None = None

    def __post_init__(self) -> None:
        Exception.__init__(self, f"{self.status}: {self.body!r}")


# Kong's own texts for core gateway errors (kong/tools/http.lua, kong/runloop/handler.lua).
MSG_NO_ROUTE = "no Route matched with those values"
MSG_BAD_GATEWAY = "An invalid response was received from the upstream server"
MSG_TIMEOUT = "The upstream server is timing out"
MSG_UNAVAILABLE = "Service unavailable"
MSG_UNEXPECTED = "An unexpected error occurred"
MSG_BAD_REQUEST = "Bad request"
MSG_URI_TOO_LONG = "Request-URI Too Long"
MSG_HEADERS_TOO_LARGE = "Request Header Fields Too Large"
MSG_REQUEST_TIMEOUT = "Request Timeout"
MSG_PAYLOAD_TOO_LARGE = "Request Entity Too Large"
MSG_NOT_IMPLEMENTED = "Not Implemented"
