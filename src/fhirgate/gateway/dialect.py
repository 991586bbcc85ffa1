"""Error bodies, rendered in one place: Kong's JSON shape or a FHIR OperationOutcome.

DECISIONS.md "Error bodies": Kong's `{"message": "..."}` by default; on FHIR routes (route or
service tagged `fhir`, or where `smart-on-fhir` runs) and for clients whose `Accept` prefers
`application/fhir+json`, the same status and headers with an OperationOutcome whose
`diagnostics` carries the same message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fhirgate.errors import GatewayExit

KONG_JSON = "application/json; charset=utf-8"
FHIR_JSON = "application/fhir+json; charset=utf-8"

# HTTP status -> FHIR IssueType (http://hl7.org/fhir/R4/valueset-issue-type.html)
_FHIR_CODES: dict[int, str] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    408: "timeout",
    411: "invalid",
    413: "too-costly",
    414: "too-long",
    417: "invalid",
    429: "throttled",
    431: "too-long",
    501: "not-supported",
    502: "exception",
    503: "transient",
    504: "timeout",
}


def fhir_issue_code(status: int) -> str:
    if status in _FHIR_CODES:
        return _FHIR_CODES[status]
    return "exception" if status >= 500 else "processing"


def wants_fhir(accept: str | None) -> bool:
    """True when the client's Accept header prefers a FHIR JSON representation."""
    if not accept:
        return False
    best_q = -1.0
    best_fhir = False
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        is_fhir = media in ("application/fhir+json", "application/json+fhir")
        if q > best_q or (q == best_q and is_fhir):
            best_q, best_fhir = q, is_fhir
    return best_fhir


def operation_outcome(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error" if status >= 400 else "information",
                "code": code or fhir_issue_code(status),
                "diagnostics": message,
            }
        ],
    }


def _message_of(body: Any) -> str:
    if isinstance(body, Mapping):
        if "message" in body and len(body) <= 2:
            return str(body["message"])
        return json.dumps(body, separators=(",", ":"))
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return str(body)


def render(exit_: GatewayExit, fhir: bool) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body bytes for a gateway-made response."""
    headers: list[tuple[str, str]] = []
    content_type_set = False
    for name, value in exit_.headers.items():
        if name.lower() == "content-type":
            content_type_set = True
        headers.append((name, value))
    body = exit_.body
    if body is None:
        payload = b""
    elif fhir and not content_type_set and exit_.status >= 400:
        oo = operation_outcome(exit_.status, _message_of(body), exit_.fhir_code)
        payload = json.dumps(oo, separators=(",", ":")).encode()
        headers.append(("Content-Type", FHIR_JSON))
    elif isinstance(body, bytes):
        payload = body
    elif isinstance(body, str) and content_type_set:
        payload = body.encode()
    else:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        if not content_type_set:
            headers.append(("Content-Type", KONG_JSON))
    return exit_.status, headers, payload
