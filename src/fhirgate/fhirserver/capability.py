"""The CapabilityStatement (R4 capabilitystatement.html), generated from what is implemented.

Search parameters are listed only where the indexer compiled their expression; `_include` and
`_revinclude` values are derived from the reference parameters that are indexed. Nothing is
declared that the server does not do.
"""

from __future__ import annotations

from typing import Any

from fhirgate import __version__, clock
from fhirgate.fhirserver.definitions import Definitions
from fhirgate.fhirserver.storage.store import iso_instant

_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
_RESULT_PARAMS = (
    ("_count", "number", "Page size (clamped to the server's maximum)"),
    ("_sort", "string", "Sort keys, comma-separated, '-' for descending"),
    ("_include", "special", "Include referenced resources (with :iterate)"),
    ("_revinclude", "special", "Include referencing resources (with :iterate)"),
    ("_summary", "token", "true | text | data | count | false"),
    ("_total", "token", "none | estimate | accurate"),
    ("_elements", "string", "Return only these top-level elements"),
    ("_has", "special", "Reverse chaining"),
)


#: SMART App Launch 2.2 §"FHIR Authorization Endpoint and Capabilities Discovery" (the
#: CapabilityStatement form, kept for clients that read it instead of smart-configuration).
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
_OAUTH_ENDPOINTS = (
    ("authorize", "/authorize"),
    ("token", "/token"),
    ("register", "/register"),
    ("manage", "/manage"),
    ("introspect", "/introspect"),
    ("revoke", "/revoke"),
)


def security(issuer: str) -> dict[str, Any]:
    """`rest.security` for a server protected by fhirgate's authorization server at `issuer`."""
    issuer = issuer.rstrip("/")
    return {
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth 2.0 with SMART App Launch 2.2",
            }
        ],
        "extension": [
            {
                "url": OAUTH_URIS,
                "extension": [{"url": name, "valueUri": issuer + path} for name, path in _OAUTH_ENDPOINTS],
            }
        ],
        "description": f"Tokens from {issuer}; discovery at .well-known/smart-configuration under this base.",
    }


def build(base: str, indexer: Any, defs: Definitions, auth_issuer: str | None = None) -> dict[str, Any]:
    reverse: dict[str, list[str]] = {}
    resources = []
    for rtype in sorted(defs.resource_types):
        params = [p for p in defs.params(rtype).values() if indexer.is_indexed(rtype, p.code)]
        includes = []
        for p in params:
            if p.type == "reference":
                includes.append(f"{rtype}:{p.code}")
                for target in p.targets:
                    reverse.setdefault(target, []).append(f"{rtype}:{p.code}")
        search_params = [
            {"name": p.code, "definition": p.url, "type": p.type, "documentation": p.description}
            for p in sorted(params, key=lambda p: p.code)
        ]
        search_params += [{"name": n, "type": t, "documentation": d} for n, t, d in _RESULT_PARAMS]
        entry: dict[str, Any] = {
            "type": rtype,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
            "interaction": [{"code": code} for code in _INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "not-supported",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "referencePolicy": ["literal", "logical"],
            "searchInclude": sorted(includes),
            "searchParam": search_params,
        }
        if rtype == "Patient":
            entry["operation"] = [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                }
            ]
        resources.append(entry)
    for entry in resources:
        entry["searchRevInclude"] = sorted(reverse.get(entry["type"], []) + reverse.get("Resource", []))
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "Search parameters from the FHIR R4 SearchParameter definitions "
        f"({defs.source}). Dates without a time zone are taken as UTC.",
    }
    if auth_issuer:
        rest["security"] = security(auth_issuer)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": iso_instant(int(clock.now() * 1000))[:10],
        "publisher": "fhirgate",
        "kind": "instance",
        "software": {"name": "fhirgate", "version": __version__},
        "implementation": {"description": "fhirgate built-in FHIR R4 server", "url": base},
        "fhirVersion": defs.fhir_version,
        "format": ["json", "application/fhir+json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                **rest,
                "resource": resources,
                "interaction": [
                    {"code": "transaction"},
                    {"code": "batch"},
                    {"code": "search-system"},
                    {"code": "history-system"},
                ],
                "searchParam": [
                    {"name": "_id", "type": "token"},
                    {"name": "_lastUpdated", "type": "date"},
                    {"name": "_type", "type": "token"},
                ],
            }
        ],
    }
