"""Data shapes shared by indexing (write path), search parsing and storage (read path).

Index rows are keyed by `param_id` (see `definitions.param_id`). Dates are inclusive millisecond
intervals (`values.date_range`); strings are stored normalised (`values.normalize_string`) and
exact; tokens as (system, code) with an optional normalised display/text for `:text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeAlias


@dataclass(slots=True)
class IndexRows:
    """Everything the search index stores for one resource version."""

    #: (param_id, normalised value, exact value)
    strings: list[tuple[int, str, str]] = field(default_factory=list)
    #: (param_id, system or None, code or None, normalised display/text or None)
    tokens: list[tuple[int, str | None, str | None, str | None]] = field(default_factory=list)
    #: (param_id, low ms, high ms), both inclusive
    dates: list[tuple[int, int, int]] = field(default_factory=list)
    #: (param_id, value)
    numbers: list[tuple[int, float]] = field(default_factory=list)
    #: (param_id, system or None, code or None, unit or None, value)
    quantities: list[tuple[int, str | None, str | None, str | None, float]] = field(default_factory=list)
    #: (param_id, value)
    uris: list[tuple[int, str]] = field(default_factory=list)
    #: (param_id, target type or None, target id or None, absolute URL or None)
    references: list[tuple[int, str | None, str | None, str | None]] = field(default_factory=list)
    #: ids of the Patients whose compartment holds this resource (R4 Patient CompartmentDefinition)
    compartments: set[str] = field(default_factory=set)


# ---- search query AST: what `search.parse` produces and `storage` compiles to SQL ----------------


@dataclass(frozen=True, slots=True)
class StringValue:
    text: str  # normalised, except under :exact (raw)


@dataclass(frozen=True, slots=True)
class TokenValue:
    system: str | None  # None: any system; "": no system (`|code`)
    code: str | None  # None: any code in `system` (`system|`)


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    target_type: str | None  # None when the search gave a bare id and no :[type] modifier
    target_id: str | None
    url: str | None  # an absolute URL that is not this server's


@dataclass(frozen=True, slots=True)
class DateValue:
    prefix: str  # eq ne gt lt ge le sa eb ap
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class NumberValue:
    prefix: str
    value: Decimal
    low: Decimal
    high: Decimal


@dataclass(frozen=True, slots=True)
class QuantityValue:
    prefix: str
    value: Decimal
    low: Decimal
    high: Decimal
    system: str | None
    code: str | None  # matches the Quantity's code, or its unit when no system is given


@dataclass(frozen=True, slots=True)
class UriValue:
    value: str


SearchValue: TypeAlias = (
    StringValue | TokenValue | ReferenceValue | DateValue | NumberValue | QuantityValue | UriValue
)


@dataclass(frozen=True, slots=True)
class ParamClause:
    """One occurrence of a search parameter. Its values are ORed (comma); clauses are ANDed.

    `modifier` is one of: None, "missing", "exact", "contains", "not", "text", "identifier",
    "below", "above", or "type" (a `:[type]` modifier, already folded into ReferenceValue's
    target_type). For `:missing`, `missing` holds the boolean and `values` is empty. A chained
    parameter (`subject:Patient.name=x`) is a reference clause with `chain` set to the clause on
    the target type (`chain_type`) and no values.
    """

    resource_type: str
    code: str
    param_id: int
    type: str
    modifier: str | None = None
    values: tuple[SearchValue, ...] = ()
    missing: bool | None = None
    chain: ParamClause | None = None
    chain_type: str | None = None


@dataclass(frozen=True, slots=True)
class HasClause:
    """`_has:Observation:patient:code=x`: resources referenced by an Observation (through its
    `patient` parameter) that matches `clause` (which may itself be a HasClause)."""

    source_type: str
    reference_param_id: int
    clause: ParamClause | HasClause


@dataclass(frozen=True, slots=True)
class Include:
    """`_include=Observation:patient[:Patient]` or `_revinclude=Provenance:target` (`reverse`)."""

    source_type: str
    code: str
    param_id: int
    target_type: str | None
    iterate: bool
    reverse: bool


@dataclass(frozen=True, slots=True)
class SortKey:
    code: str
    param_id: int
    type: str  # a search parameter type, or "_id" / "_lastUpdated"
    descending: bool


@dataclass(slots=True)
class SearchQuery:
    """A parsed search. `resource_type` None = system search over `types` (all when empty)."""

    resource_type: str | None
    types: tuple[str, ...] = ()
    clauses: tuple[ParamClause | HasClause, ...] = ()
    count: int = 20
    offset: int = 0
    sort: tuple[SortKey, ...] = ()
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    summary: str | None = None  # true, text, data, count, false
    total: str | None = None  # none, estimate, accurate
    elements: tuple[str, ...] | None = None
    #: parameters ignored (unknown or unsupported), each with why; reported in the Bundle
    ignored: tuple[tuple[str, str], ...] = ()
    #: (name, value) pairs actually applied, in request order, for the Bundle's `self` link
    applied: tuple[tuple[str, str], ...] = ()
    #: the Patient id of a compartment search (`Patient/123/Observation`) or None
    compartment: str | None = None
