"""Typed FHIR errors, rendered in one place as an OperationOutcome (R4 §3.1.0.5, http.html).

Handlers raise `FhirError` (or a subclass); `api` turns it into a response. Nothing else builds an
OperationOutcome for an error by hand.
"""

from __future__ import annotations

from typing import Any


class FhirError(Exception):
    """An error a FHIR client sees: HTTP status, IssueType code, a diagnostic saying what is wrong
    and how to fix it, and (for invalid resources) the FHIRPath of the offending element."""

    def __init__(
        self,
        status: int,
        diagnostics: str,
        code: str = "invalid",
        expression: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = code
        self.expression = expression
        self.headers = headers or {}

    def outcome(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": "error" if self.status < 500 else "fatal",
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return {"resourceType": "OperationOutcome", "issue": [issue]}


def bad_request(diagnostics: str, expression: str | None = None) -> FhirError:
    return FhirError(400, diagnostics, "invalid", expression)


def not_found(diagnostics: str) -> FhirError:
    return FhirError(404, diagnostics, "not-found")


def gone(diagnostics: str) -> FhirError:
    return FhirError(410, diagnostics, "deleted")


def conflict(status: int, diagnostics: str) -> FhirError:
    """409 (version conflict without If-Match) or 412 (If-Match / conditional precondition)."""
    return FhirError(status, diagnostics, "conflict")


def unprocessable(diagnostics: str, expression: str | None = None, code: str = "structure") -> FhirError:
    """422: the resource is not valid FHIR R4 (validation failure names the element path)."""
    return FhirError(422, diagnostics, code, expression)


def outcome(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    """A one-issue OperationOutcome for non-error uses (warnings in a search Bundle, delete)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
