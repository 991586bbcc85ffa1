"""The write path of search: a resource -> the search index rows (`model.IndexRows`) it owns.

For every resource type the indexer precomputes, once, a flat plan of (compiled branch of a search
parameter's expression, converter) pairs: `fhirpath` compiles each R4 SearchParameter expression
into branches producing values of one known FHIR type, and the converter turns a value of that
type into rows of the parameter's search type, as R4 search.html defines them per type:

- string (search.html#string): string/markdown; HumanName: family, given, prefix, suffix, text;
  Address: line, city, district, state, postalCode, country, text — each its own row, stored
  normalised (case- and accent-folded, `values.normalize_string`) next to the exact text.
- token (search.html#token): Coding (system, code, display); CodeableConcept: a row per coding
  and one with its `text` (for `:text`) unless a coding's display says the same; Identifier
  (system, value, type.text); ContactPoint: its value; code: (the code system "implied by the
  value set binding", value) when a required binding names one system (`Patient.gender` is
  administrative-gender: `gender=http://hl7.org/fhir/administrative-gender|male` matches and
  `gender=|male`, "no system", does not), else (no system, value); string/id/uri: (no system,
  value); boolean: "true"/"false". Texts are normalised like strings.
- reference (search.html#reference): `Type/id` (also `[base]/Type/id` of this server, and with any
  `/_history/n` dropped); other absolute URLs, `urn:uuid:`/`urn:oid:` and anything unparseable by
  URL; `#contained` references are not indexed. A canonical `url|version` also gets a row without
  the version, so a search by the bare URL matches (references.html#canonical).
  `Reference.identifier` is a token of the parameter's `:identifier` modifier, whose param_id is
  `param_id(type, code + ":identifier")`.
- date (search.html#date): date/dateTime/instant and Period as inclusive millisecond intervals (a
  missing Period end is open); Timing: the outer limits of its events and repeat.boundsPeriod.
- number (search.html#number): decimal/integer. quantity (search.html#quantity): Quantity and its
  profiles (Age, Duration...), Money (its currency as a code of urn:iso:std:iso:4217).
- uri (search.html#uri): uri/url/canonical/oid/uuid.

Values of a type a parameter's search type cannot hold (free-text `Procedure.performedString` for
a date, a Range or SampledData for a quantity) are not indexed; `limitation` says which. Composite
and special parameters, `_content`/`_text`/`_query`..., `phonetic` and anything whose expression
cannot be compiled are not indexed at all: `is_indexed` is False and `unsupported_reason` says
why, so search reports them instead of answering wrongly. Patient compartment membership (R4
CompartmentDefinition `patient`) comes from the reference rows of the compartment's parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeAlias

from fhirgate.fhirserver.definitions import (
    RESOURCE_COLUMNS,
    UNSUPPORTED_CODES,
    Definitions,
    SearchParamDef,
    definitions,
    param_id,
)
from fhirgate.fhirserver.fhirpath import FHIRPathUnsupported, compile_strict
from fhirgate.fhirserver.model import IndexRows
from fhirgate.fhirserver.values import DATE_MAX, DATE_MIN, DateFormatError, date_range, normalize_string

#: appends the rows of one value to the IndexRows
Converter: TypeAlias = Callable[[Any, IndexRows], None]
_Plan: TypeAlias = tuple[tuple[Callable[[list[Any]], list[Any]], Converter], ...]

_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ISO_4217 = "urn:iso:std:iso:4217"
_QUANTITY_TYPES = frozenset(
    {"Quantity", "Age", "Count", "Distance", "Duration", "SimpleQuantity", "MoneyQuantity"}
)
#: FHIR types each search parameter type can index (anything else is skipped, see module doc)
INDEXABLE: Mapping[str, frozenset[str]] = {
    "string": frozenset({"string", "markdown", "HumanName", "Address"}),
    "token": frozenset(
        {
            "Coding",
            "CodeableConcept",
            "Identifier",
            "ContactPoint",
            "code",
            "string",
            "id",
            "uri",
            "url",
            "canonical",
            "oid",
            "uuid",
            "boolean",
        }
    ),
    "reference": frozenset({"Reference", "canonical", "uri", "url"}),
    "date": frozenset({"date", "dateTime", "instant", "Period", "Timing"}),
    "number": frozenset({"decimal", "integer", "positiveInt", "unsignedInt"}),
    "quantity": _QUANTITY_TYPES | {"Money"},
    "uri": frozenset({"uri", "url", "canonical", "oid", "uuid"}),
}


#: Parameters whose semantics the index cannot honour, so that they are reported as unsupported
#: rather than answered wrongly.
NOT_INDEXED: Mapping[str, str] = {
    # individual-phonetic (Patient, Person, Practitioner, RelatedPerson): R4 asks for "some kind
    # of phonetic matching algorithm"; plain string matching would silently miss sound-alikes
    "phonetic": "phonetic matching is not implemented",
}


def _normalize(text: str) -> str:
    """`values.normalize_string`, with a fast path for ASCII (most index values), where NFKD
    decomposition and combining-mark removal are the identity and casefold is lower()."""
    if text.isascii():
        return " ".join(text.lower().split())
    return normalize_string(text)


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _norm(v: Any) -> str | None:
    return (_normalize(v) or None) if isinstance(v, str) and v else None


# ---- converters, one per (search parameter type, FHIR type) ------------------------------------


def _string_conv(pid: int, fhir_type: str) -> Converter:
    if fhir_type == "HumanName":
        parts: tuple[tuple[str, bool], ...] = (
            ("family", False),
            ("given", True),
            ("prefix", True),
            ("suffix", True),
            ("text", False),
        )
    elif fhir_type == "Address":
        parts = (
            ("line", True),
            ("city", False),
            ("district", False),
            ("state", False),
            ("postalCode", False),
            ("country", False),
            ("text", False),
        )
    else:

        def plain(v: Any, rows: IndexRows) -> None:
            if isinstance(v, str) and v:
                rows.strings.append((pid, _normalize(v), v))

        return plain

    def complex_(v: Any, rows: IndexRows) -> None:
        out = rows.strings
        for key, repeats in parts:
            x = v.get(key)
            if x is None:
                continue
            for s in x if repeats and isinstance(x, list) else (x,):
                if isinstance(s, str) and s:
                    out.append((pid, _normalize(s), s))

    return complex_


def _token_conv(pid: int, fhir_type: str, system: str | None = None) -> Converter:
    """`system`: the code system of a `code` element's required binding (`Branch.system`)."""
    if fhir_type == "Coding":

        def coding(v: Any, rows: IndexRows) -> None:
            row = (pid, _text(v.get("system")), _text(v.get("code")), _norm(v.get("display")))
            if row[1] or row[2] or row[3]:
                rows.tokens.append(row)

        return coding
    if fhir_type == "CodeableConcept":

        def concept(v: Any, rows: IndexRows) -> None:
            out = rows.tokens
            displays = set()
            for c in v.get("coding") or ():
                row = (pid, _text(c.get("system")), _text(c.get("code")), _norm(c.get("display")))
                if row[1] or row[2] or row[3]:
                    out.append(row)
                    displays.add(row[3])
            # CodeableConcept.text is searched by `:text` too (search.html#token table)
            text = _norm(v.get("text"))
            if text and text not in displays:
                out.append((pid, None, None, text))

        return concept
    if fhir_type == "Identifier":

        def identifier(v: Any, rows: IndexRows) -> None:
            type_ = v.get("type")
            row = (
                pid,
                _text(v.get("system")),
                _text(v.get("value")),
                _norm(type_.get("text")) if isinstance(type_, dict) else None,
            )
            if row[1] or row[2]:
                rows.tokens.append(row)

        return identifier
    if fhir_type == "ContactPoint":
        # the token is ContactPoint.value; its `system` (phone, email...) is not a code system

        def contact(v: Any, rows: IndexRows) -> None:
            value = _text(v.get("value"))
            if value:
                rows.tokens.append((pid, None, value, None))

        return contact
    if fhir_type == "boolean":

        def boolean(v: Any, rows: IndexRows) -> None:
            if v is True or v is False:
                rows.tokens.append((pid, None, "true" if v else "false", None))

        return boolean

    bound = system if fhir_type == "code" else None

    def code(v: Any, rows: IndexRows) -> None:
        if isinstance(v, str) and v:
            rows.tokens.append((pid, bound, v, None))

    return code


def _date_conv(pid: int, fhir_type: str) -> Converter:
    if fhir_type == "Period":

        def period(v: Any, rows: IndexRows) -> None:
            start, end = v.get("start"), v.get("end")
            if not start and not end:
                return
            try:
                low = date_range(start)[0] if start else DATE_MIN
                high = date_range(end)[1] if end else DATE_MAX
            except (DateFormatError, TypeError):
                return
            rows.dates.append((pid, low, high))

        return period
    if fhir_type == "Timing":

        def timing(v: Any, rows: IndexRows) -> None:
            # "only the outer limits matter" (search.html#date): events and repeat.boundsPeriod
            lows: list[int] = []
            highs: list[int] = []
            try:
                for event in v.get("event") or ():
                    low, high = date_range(event)
                    lows.append(low)
                    highs.append(high)
                repeat = v.get("repeat")
                bounds = repeat.get("boundsPeriod") if isinstance(repeat, dict) else None
                if isinstance(bounds, dict) and (bounds.get("start") or bounds.get("end")):
                    start, end = bounds.get("start"), bounds.get("end")
                    lows.append(date_range(start)[0] if start else DATE_MIN)
                    highs.append(date_range(end)[1] if end else DATE_MAX)
            except (DateFormatError, TypeError):
                return
            if lows:
                rows.dates.append((pid, min(lows), max(highs)))

        return timing

    def instant(v: Any, rows: IndexRows) -> None:
        try:
            low, high = date_range(v)
        except (DateFormatError, TypeError):
            return
        rows.dates.append((pid, low, high))

    return instant


def _number_conv(pid: int, fhir_type: str) -> Converter:
    def number(v: Any, rows: IndexRows) -> None:
        if isinstance(v, int | float | Decimal) and not isinstance(v, bool):
            rows.numbers.append((pid, float(v)))

    return number


def _quantity_conv(pid: int, fhir_type: str) -> Converter:
    money = fhir_type == "Money"

    def quantity(v: Any, rows: IndexRows) -> None:
        value = v.get("value")
        if not isinstance(value, int | float | Decimal) or isinstance(value, bool):
            return
        if money:
            rows.quantities.append((pid, _ISO_4217, _text(v.get("currency")), None, float(value)))
        else:
            rows.quantities.append(
                (pid, _text(v.get("system")), _text(v.get("code")), _text(v.get("unit")), float(value))
            )

    return quantity


def _uri_conv(pid: int, fhir_type: str) -> Converter:
    def uri(v: Any, rows: IndexRows) -> None:
        if isinstance(v, str) and v:
            rows.uris.append((pid, v))

    return uri


class _References:
    """Parses reference strings (R4 references.html#literal) relative to this server's base URL."""

    def __init__(self, resource_types: frozenset[str], base_url: str | None) -> None:
        self.resource_types = resource_types
        self.base = base_url.rstrip("/") + "/" if base_url else None

    def parse(self, ref: str) -> tuple[str | None, str | None, str | None] | None:
        """(type, id, None) for a reference to this server, (None, None, url) for any other;
        None for a reference to a contained resource."""
        if not ref or ref[0] == "#":
            return None
        if self.base is not None and ref.startswith(self.base):
            local = ref[len(self.base) :]
        elif "://" in ref or ref.startswith("urn:"):
            return (None, None, ref)
        else:
            local = ref
        parts = local.split("/")
        if len(parts) == 4 and parts[2] == "_history":
            parts = parts[:2]
        if len(parts) == 2 and parts[0] in self.resource_types and _ID_RE.fullmatch(parts[1]):
            return (parts[0], parts[1], None)
        # not a literal reference we understand (e.g. a search URL): matched by its text only
        return (None, None, ref)

    def converter(self, pid: int, identifier_pid: int, fhir_type: str) -> Converter:
        parse = self.parse
        if fhir_type == "Reference":
            identifier = _token_conv(identifier_pid, "Identifier")

            def reference(v: Any, rows: IndexRows) -> None:
                ref = v.get("reference")
                if isinstance(ref, str):
                    parsed = parse(ref)
                    if parsed is not None:
                        rows.references.append((pid, *parsed))
                ident = v.get("identifier")
                if isinstance(ident, dict):
                    identifier(ident, rows)

            return reference

        def canonical(v: Any, rows: IndexRows) -> None:
            if not isinstance(v, str):
                return
            parsed = parse(v)
            if parsed is None:
                return
            rows.references.append((pid, *parsed))
            # a versioned canonical (`url|version`) also matches a search by the bare url
            # (R4 references.html#canonical, search.html#reference)
            if fhir_type == "canonical" and parsed[2] is not None and "|" in v:
                bare = parse(v.split("|", 1)[0])
                if bare is not None:
                    rows.references.append((pid, *bare))

        return canonical


_CONVERTERS: Mapping[str, Callable[[int, str], Converter]] = {
    "string": _string_conv,
    "token": _token_conv,
    "date": _date_conv,
    "number": _number_conv,
    "quantity": _quantity_conv,
    "uri": _uri_conv,
}


class Indexer:
    """Turns resources into search index rows. Build once; `extract` is thread-safe."""

    def __init__(self, defs: Definitions | None = None, base_url: str | None = None) -> None:
        self.defs = defs if defs is not None else definitions()
        self.base_url = base_url
        self._refs = _References(self.defs.resource_types, base_url)
        self._plans: dict[str, _Plan] = {}
        self._indexed: dict[str, dict[str, SearchParamDef]] = {}
        self._reasons: dict[str, dict[str, str]] = {}
        self._limits: dict[str, dict[str, str]] = {}
        self._compartment_pids: dict[str, frozenset[int]] = {}

    # -- planning (once per resource type)

    def _prepare(self, rtype: str) -> _Plan:
        plan: list[tuple[Callable[[list[Any]], list[Any]], Converter]] = []
        indexed: dict[str, SearchParamDef] = {}
        reasons: dict[str, str] = {}
        limits: dict[str, str] = {}
        for code, sp in self.defs.params(rtype).items():
            if code in RESOURCE_COLUMNS:
                continue
            if code in UNSUPPORTED_CODES:
                reasons[code] = f"{code} is not implemented"
                continue
            if not sp.supported:
                reasons[code] = f"search parameters of type {sp.type} are not supported"
                continue
            if code in NOT_INDEXED:
                reasons[code] = NOT_INDEXED[code]
                continue
            try:
                extractor = compile_strict(sp.expression, rtype)
            except FHIRPathUnsupported as e:
                reasons[code] = f"its expression cannot be compiled ({e})"
                continue
            usable = INDEXABLE[sp.type]
            entries = []
            for branch in extractor.branches:
                if branch.type not in usable:
                    continue  # e.g. Procedure.performedString for a date: nothing to index
                if sp.type == "reference":
                    conv = self._refs.converter(
                        sp.param_id, param_id(rtype, code + ":identifier"), branch.type
                    )
                elif sp.type == "token":
                    conv = _token_conv(sp.param_id, branch.type, branch.system)
                else:
                    conv = _CONVERTERS[sp.type](sp.param_id, branch.type)
                entries.append((branch.fn, conv))
            if not entries:
                kinds = ", ".join(sorted(extractor.types))
                reasons[code] = f"its expression selects {kinds}, which a {sp.type} parameter cannot index"
                continue
            plan.extend(entries)
            indexed[code] = sp
            skipped = sorted(extractor.types - usable)
            if skipped:
                limits[code] = f"values of type {', '.join(skipped)} are not indexed"
        compartment = self.defs.compartment_params(rtype)
        self._compartment_pids[rtype] = frozenset(indexed[c].param_id for c in compartment if c in indexed)
        self._indexed[rtype] = indexed
        self._reasons[rtype] = reasons
        self._limits[rtype] = limits
        frozen = tuple(plan)
        self._plans[rtype] = frozen
        return frozen

    def _plan(self, rtype: str) -> _Plan:
        plan = self._plans.get(rtype)
        return plan if plan is not None else self._prepare(rtype)

    # -- public API

    def extract(self, resource: Mapping[str, Any]) -> IndexRows:
        """The index rows of `resource` (a validated R4 resource as JSON). Never raises on odd
        content: a value that cannot be indexed is skipped."""
        rows = IndexRows()
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or rtype not in self.defs.resource_types:
            return rows
        root = [resource]
        for fn, conv in self._plan(rtype):
            try:
                for v in fn(root):
                    conv(v, rows)
            except (AttributeError, TypeError, ValueError, KeyError, IndexError):
                continue  # malformed content (validation is upstream): index what is well-formed
        # `|` is a set union in FHIRPath: the same value reached twice is one row
        lists: tuple[list[Any], ...] = (
            rows.strings,
            rows.tokens,
            rows.dates,
            rows.numbers,
            rows.quantities,
            rows.uris,
            rows.references,
        )
        for lst in lists:
            if len(lst) > 1:
                lst[:] = dict.fromkeys(lst)
        cpids = self._compartment_pids[rtype]
        if cpids:
            for pid, target_type, target_id, _url in rows.references:
                if target_type == "Patient" and pid in cpids and target_id is not None:
                    rows.compartments.add(target_id)
        if rtype == "Patient":
            # the `{def}` rule: a Patient is in its own compartment
            own = resource.get("id")
            if isinstance(own, str) and own:
                rows.compartments.add(own)
        return rows

    def is_indexed(self, resource_type: str, code: str) -> bool:
        """Whether searching `code` on `resource_type` is backed by the index (or, for `_id` and
        `_lastUpdated`, by the resource table)."""
        if resource_type not in self.defs.resource_types:
            return False
        if code in RESOURCE_COLUMNS:
            return code in self.defs.params(resource_type)
        self._plan(resource_type)
        return code in self._indexed[resource_type]

    def indexed_params(self, resource_type: str) -> list[SearchParamDef]:
        """The parameters of `resource_type` that have index rows (not `_id`/`_lastUpdated`)."""
        if resource_type not in self.defs.resource_types:
            return []
        self._plan(resource_type)
        return list(self._indexed[resource_type].values())

    def unsupported_reason(self, resource_type: str, code: str) -> str | None:
        """Why a defined parameter is not indexed (None when it is, or is not defined)."""
        if resource_type not in self.defs.resource_types:
            return None
        self._plan(resource_type)
        return self._reasons[resource_type].get(code)

    def limitation(self, resource_type: str, code: str) -> str | None:
        """What an indexed parameter leaves out, if anything: the values of types its search type
        cannot hold (e.g. `Range` for `Condition.onset-age`, free text for `Procedure.date`)."""
        if resource_type not in self.defs.resource_types:
            return None
        self._plan(resource_type)
        return self._limits[resource_type].get(code)
