"""Parse a FHIR R4 search request into the query AST (`model.SearchQuery`) that storage compiles.

Spec: FHIR R4 search.html (https://hl7.org/fhir/R4/search.html), cited below by its anchors
(`search.html#prefix`, `#modifiers`, `#escaping`, `#chaining`, `#has`, ...).

Policy, in one place:
- Malformed input (a bad date, prefix, number, modifier, `_count`, `_include`, a chain deeper than
  one level, an unknown resource type) is always a 400 naming the parameter and what is expected:
  search.html#errors lets a server reject a search it cannot process, and silently dropping part of
  a query would return more resources than the client asked for.
- An unknown parameter, a defined parameter this server does not index, or one the spec defines
  but this server does not implement (composite, special, `_text`, `_filter`, ...) is a 400 under
  `Prefer: handling=strict` and otherwise ignored and listed in `SearchQuery.ignored`
  (search.html#errors: "servers SHOULD ignore unknown or unsupported parameters").
- A parameter with an empty value is treated the same way (ignored, or a 400 when strict).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from ..definitions import RESOURCE_COLUMNS, UNSUPPORTED_CODES, Definitions, definitions, param_id
from ..errors import FhirError, bad_request, not_found
from ..model import (
    DateValue,
    HasClause,
    Include,
    NumberValue,
    ParamClause,
    QuantityValue,
    ReferenceValue,
    SearchQuery,
    SearchValue,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
)
from ..values import DateFormatError, date_range, normalize_string, number_range

__all__ = ["PREFIXES", "parse_search"]

#: Comparison prefixes of number, date and quantity parameters (search.html#prefix).
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_PREFIX_LIST = ", ".join(PREFIXES)

#: Modifiers this server implements, per parameter type (search.html#modifiers). A reference
#: parameter also takes `:[type]`.
_MODIFIERS: dict[str, tuple[str, ...]] = {
    "string": ("missing", "exact", "contains"),
    "token": ("missing", "not", "text"),
    "reference": ("missing", "identifier"),
    "date": ("missing",),
    "number": ("missing",),
    "quantity": ("missing",),
    "uri": ("missing", "below", "above"),
}
#: Modifiers R4 defines for a type that this server does not implement.
_SPEC_ONLY_MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"above", "below", "in", "not-in", "of-type"}),
    "reference": frozenset({"above", "below"}),
}
#: Every modifier code R4 defines (SearchModifierCode), to tell "wrong type" from "unknown".
_SPEC_MODIFIERS = frozenset(
    {"missing", "exact", "contains", "not", "text", "in", "not-in", "below", "above", "type", "identifier"}
    | {"of-type"}
)

#: Search result parameters (search.html#return) and `_type` (search.html#all), handled here.
_CONTROL = frozenset(
    {"_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_elements", "_type"}
)
#: Given at most once: a second value would make the request ambiguous.
_SINGLE = frozenset({"_count", "_offset", "_sort", "_summary", "_total", "_elements", "_type"})
#: Defined for every interaction (http.html#parameters), not search parameters: accepted, not applied.
_FORMAT_PARAMS = frozenset({"_format", "_pretty"})
#: Defined by R4 (search.html summary table, #query, #filter, #contained, history `_at`) but not
#: implemented by this server.
_NOT_IMPLEMENTED = UNSUPPORTED_CODES | {"_contained", "_containedType", "_at", "_filter", "_query", "_list"}

_SUMMARY = ("true", "text", "data", "count", "false")
_TOTAL = ("none", "estimate", "accurate")
#: Parameter types `_sort` can order by (search.html#sort: composite and special have no order).
_SORTABLE = frozenset({"string", "token", "reference", "date", "number", "quantity", "uri"})

#: A resource id (datatypes.html#id).
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: `Type/id` or `Type/id/_history/vid` (references.html#literal).
_REL_REF_RE = re.compile(r"([A-Z][A-Za-z]*)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")
#: An absolute URI: a scheme, then a colon (`http:`, `https:`, `urn:`).
_ABS_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:.")
#: A FHIR decimal as a search number (search.html#number), exponent allowed.
_NUMBER_RE = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
#: `_elements` entries: a base element name (`name`, `value[x]`), optionally `Type.name`.
_ELEMENT_RE = re.compile(r"(?:([A-Z][A-Za-z]*)\.)?([A-Za-z][A-Za-z0-9_]*(?:\[x\])?)")
#: A `+` of a time-zone offset that arrived URL-decoded as a space (`...T10:00:00 01:00`).
_TZ_SPACE_RE = re.compile(r"(T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?) ([0-9]{2}:[0-9]{2})\Z")

_DATE_FORMAT = "[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.sss]][Z|(+|-)hh:mm]]]]"
_NUMBER_FORMAT = "[prefix]number, e.g. 5.4 or ge1e2"
_QUANTITY_FORMAT = "[prefix]number[|system|code], e.g. 5.4|http://unitsofmeasure.org|mg or 5.4||mg"
_ESCAPABLE = frozenset(",|$\\")
#: Largest `_count`/`_offset` accepted: a signed 64-bit SQL integer.
_MAX_INT = 2**63 - 1


class _Skip(Exception):
    """The parameter is unknown or unsupported: ignored (lenient) or a 400 (strict)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Param:
    """A resolved search parameter. `rtype` is "Resource" in a system-level search."""

    rtype: str
    code: str
    type: str
    targets: tuple[str, ...]
    pid: int


def parse_search(
    resource_type: str | None,
    params: Sequence[tuple[str, str]],
    *,
    supported: Callable[[str, str], bool],
    strict: bool = False,
    default_count: int = 20,
    max_count: int = 1000,
    compartment: str | None = None,
    base_url: str | None = None,
) -> SearchQuery:
    """Parse decoded (name, value) query/form pairs, in request order, into a `SearchQuery`.

    `resource_type` None is a system-level search (search.html#all): `_type` picks the types and
    only the parameters common to every resource (`_id`, `_lastUpdated`, `_tag`, `_profile`,
    `_security`, `_source`) apply; their clauses carry resource type "Resource" and
    `param_id("Resource", code)`. `supported(rtype, code)` says whether a defined parameter is
    indexed (`_id` and `_lastUpdated` always are: they are resource columns). `strict` is
    `Prefer: handling=strict`. `base_url` (this server's base, optional) turns absolute references
    to this server into `Type/id`. Raises `FhirError` (400, or 404 for an unknown resource type).
    """
    defs = definitions()
    if resource_type is not None and resource_type not in defs.resource_types:
        raise not_found(f"Unknown resource type '{resource_type}'")
    types = _scan_types(resource_type, params, defs)
    parser = _Parser(defs, resource_type, types, supported, base_url)

    clauses: list[ParamClause | HasClause] = []
    sort: tuple[SortKey, ...] = ()
    includes: list[Include] = []
    revincludes: list[Include] = []
    ignored: list[tuple[str, str]] = []
    applied: list[tuple[str, str]] = []
    count = max(0, min(default_count, max_count))
    offset = 0
    summary: str | None = None
    total: str | None = None
    elements: tuple[str, ...] | None = None
    seen: set[str] = set()

    for name, value in params:
        if name in _FORMAT_PARAMS:
            continue
        base, colon, modifier = name.partition(":")
        try:
            if value == "":
                raise _Skip(f"parameter '{name}' has an empty value")
            if base not in _CONTROL:
                clauses.append(parser.clause(resource_type, name, value))
                applied.append((name, value))
                continue
            # ---- search result parameters (search.html#return) ----
            if base in _SINGLE:
                if base in seen:
                    raise bad_request(f"Parameter '{base}' is given more than once; give it once")
                seen.add(base)
            if base in ("_include", "_revinclude"):
                include = parser.include(name, modifier if colon else None, value, base == "_revinclude")
                target = revincludes if include.reverse else includes
                if include not in target:
                    target.append(include)
                applied.append((name, value))
                continue
            if colon:
                hint = "; R4 sorts descending with a leading '-', e.g. _sort=-date" if base == "_sort" else ""
                raise bad_request(f"Parameter '{base}' takes no modifier (got '{name}'){hint}")
            if base == "_count":
                # search.html#count: a hint for the page size; we clamp it to the server maximum.
                count = min(_non_negative(base, value), max_count)
                applied.append((name, str(count)))
            elif base == "_offset":
                # Our paging cursor for next/previous links; the API writes it, so not in `applied`.
                offset = _non_negative(base, value)
            elif base == "_sort":
                sort = parser.sort(value)
                applied.append((name, value))
            elif base == "_summary":
                summary = _choice(base, value, _SUMMARY)
                applied.append((name, value))
            elif base == "_total":
                total = _choice(base, value, _TOTAL)
                applied.append((name, value))
            elif base == "_elements":
                elements = parser.elements(value)
                applied.append((name, value))
            else:  # _type: validated by _scan_types
                if resource_type is not None:
                    raise _Skip(
                        f"'_type' applies only to a search across resource types ([base]?_type=...), "
                        f"not to a {resource_type} search"
                    )
                applied.append((name, value))
        except _Skip as skip:
            if strict:
                raise bad_request(
                    f"Parameter '{name}': {skip.reason} "
                    "(rejected: the request asked for Prefer: handling=strict)"
                ) from None
            ignored.append((name, skip.reason))

    return SearchQuery(
        resource_type=resource_type,
        types=types,
        clauses=tuple(clauses),
        count=count,
        offset=offset,
        sort=sort,
        includes=tuple(includes),
        revincludes=tuple(revincludes),
        summary=summary,
        total=total,
        elements=elements,
        ignored=tuple(ignored),
        applied=tuple(applied),
        compartment=compartment,
    )


def _scan_types(
    resource_type: str | None, params: Sequence[tuple[str, str]], defs: Definitions
) -> tuple[str, ...]:
    """`_type` of a system-level search (search.html#all), read first: it decides which
    parameters are common to the types searched, wherever it appears in the request."""
    if resource_type is not None:
        return ()
    types: list[str] = []
    for name, value in params:
        if name.partition(":")[0] != "_type" or value == "":
            continue
        if name != "_type":
            raise bad_request(f"Parameter '_type' takes no modifier (got '{name}')")
        for raw in value.split(","):
            rtype = raw.strip()
            if rtype not in defs.resource_types:
                raise bad_request(
                    f"Parameter '_type': unknown resource type '{rtype}'; expected a comma-separated "
                    "list of R4 resource types, e.g. _type=Patient,Observation"
                )
            if rtype not in types:
                types.append(rtype)
    return tuple(types)


class _Parser:
    def __init__(
        self,
        defs: Definitions,
        resource_type: str | None,
        types: tuple[str, ...],
        supported: Callable[[str, str], bool],
        base_url: str | None,
    ) -> None:
        self.defs = defs
        self.resource_type = resource_type
        self.types = types
        self.supported = supported
        self.base_url = base_url.rstrip("/") + "/" if base_url else None

    # ---- parameter lookup ------------------------------------------------------------------

    def lookup(self, rtype: str | None, code: str) -> _Param:
        """Resolve `code` on `rtype` (None: system-level search) or raise `_Skip`."""
        if rtype is None:
            return self._common(code)
        if code in RESOURCE_COLUMNS:
            # search.html#id, #lastUpdated: columns of the resource table, always searchable.
            return _Param(rtype, code, "token" if code == "_id" else "date", (), param_id(rtype, code))
        if code in _NOT_IMPLEMENTED:
            raise _Skip(f"search parameter '{code}' is not supported by this server")
        spd = self.defs.params(rtype).get(code)
        if spd is None:
            known = [c for c in self.defs.params(rtype) if not c.startswith("_")]
            close = difflib.get_close_matches(code, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _Skip(f"unknown search parameter '{code}' for {rtype}{hint}")
        if not spd.supported:
            raise _Skip(
                f"search parameter '{code}' of {rtype} is of type {spd.type}, which is not supported "
                "by this server"
            )
        if not self.supported(rtype, code):
            raise _Skip(f"search parameter '{code}' of {rtype} is not supported by this server")
        return _Param(rtype, code, spd.type, spd.targets, spd.param_id)

    def _common(self, code: str) -> _Param:
        """A parameter of a system-level search: one every searched type defines (search.html#all)."""
        if code in RESOURCE_COLUMNS:
            return _Param(
                "Resource", code, "token" if code == "_id" else "date", (), param_id("Resource", code)
            )
        if code in _NOT_IMPLEMENTED:
            raise _Skip(f"search parameter '{code}' is not supported by this server")
        scope: Iterable[str] = self.types or sorted(self.defs.resource_types)
        ptype: str | None = None
        for rtype in scope if code.startswith("_") else ():
            spd = self.defs.params(rtype).get(code)
            if spd is None:
                ptype = None
                break
            if not spd.supported or not self.supported(rtype, code):
                raise _Skip(f"search parameter '{code}' of {rtype} is not supported by this server")
            ptype = spd.type
        if ptype is None:
            common = ", ".join(sorted(RESOURCE_COLUMNS | {"_tag", "_profile", "_security", "_source"}))
            raise _Skip(
                f"search parameter '{code}' is not common to every resource type searched; a search "
                f"without a resource type takes only {common}"
            )
        return _Param("Resource", code, ptype, (), param_id("Resource", code))

    # ---- clauses ---------------------------------------------------------------------------

    def clause(self, rtype: str | None, name: str, value: str) -> ParamClause | HasClause:
        """One search parameter occurrence: plain, chained (search.html#chaining) or `_has`."""
        if name == "_has" or name.startswith("_has:"):
            return self._has(rtype, name, value)
        head, dot, tail = name.partition(".")
        if dot:
            if "." in tail:
                raise bad_request(
                    f"Parameter '{name}': only one level of chaining is supported "
                    "(e.g. subject:Patient.name=peter)"
                )
            return self._chain(rtype, name, head, tail, value)
        code, modifier = _split_modifier(name)
        return self._simple(self.lookup(rtype, code), name, modifier, value)

    def _chain(self, rtype: str | None, name: str, head: str, tail: str, value: str) -> ParamClause:
        # search.html#chaining: `ref[:Type].param=value` on the resources `ref` points to.
        code, type_modifier = _split_modifier(head)
        ref = self.lookup(rtype, code)
        if ref.type != "reference":
            raise bad_request(
                f"Parameter '{name}': chaining needs a reference parameter, and '{code}' is a "
                f"{ref.type} parameter"
            )
        tcode, tmodifier = _split_modifier(tail)
        if tcode == "_has" or tcode.startswith("_has:"):
            raise bad_request(f"Parameter '{name}': _has cannot follow a chain")
        if type_modifier is not None:
            self._check_target(name, ref, type_modifier, "before a chain only a :[type] modifier is allowed")
            targets: tuple[str, ...] = (type_modifier,)
        else:
            targets = ref.targets
        if len(targets) == 1:
            chained = self._simple(self.lookup(targets[0], tcode), name, tmodifier, value)
            return ParamClause(
                resource_type=ref.rtype,
                code=ref.code,
                param_id=ref.pid,
                type="reference",
                modifier="type" if type_modifier else None,
                chain=chained,
                chain_type=targets[0],
            )
        # No :[type] and several targets: allowed when every target defines the chained parameter
        # with one type (search.html#chaining); `chain_type` None then means "any target of `ref`"
        # and `chain` is resolved on the first target (storage recomputes its param_id per type).
        if not targets:
            raise bad_request(
                f"Parameter '{name}': '{code}' can reference any resource type; name the target type, "
                f"e.g. {code}:Patient.{tail}"
            )
        found: list[_Param] = []
        lacking: list[str] = []
        skip: _Skip | None = None
        for target in targets:
            try:
                found.append(self.lookup(target, tcode))
            except _Skip as exc:
                lacking.append(target)
                skip = exc
        if not found and skip is not None:
            raise skip
        example = f"{code}:{found[0].rtype}.{tail}"
        if lacking or len({p.type for p in found}) != 1:
            why = (
                f"'{tcode}' is not a supported parameter of {', '.join(lacking)}"
                if lacking
                else f"'{tcode}' has different types on {', '.join(targets)}"
            )
            raise bad_request(
                f"Parameter '{name}': the chain is ambiguous: '{code}' can reference "
                f"{', '.join(targets)} and {why}; name the target type, e.g. "
                f"{example}"
            )
        union = tuple(dict.fromkeys(t for p in found for t in p.targets))
        first = found[0]
        chained = self._simple(
            _Param(first.rtype, first.code, first.type, union, first.pid), name, tmodifier, value
        )
        return ParamClause(
            resource_type=ref.rtype, code=ref.code, param_id=ref.pid, type="reference", chain=chained
        )

    def _has(self, rtype: str | None, name: str, value: str) -> HasClause:
        # search.html#has: `_has:Type:ref:param=value` selects resources that a `Type` matching
        # `param=value` references through its `ref` parameter; `param` may itself be a `_has`.
        if rtype is None:
            raise _Skip("'_has' needs a resource type; a search across resource types cannot use it")
        parts = name.split(":", 3)
        if len(parts) != 4 or not all(parts):
            raise bad_request(
                f"Parameter '{name}': expected _has:[type]:[reference parameter]:[parameter], "
                "e.g. _has:Observation:patient:code=1234-5"
            )
        _, source, ref_code, rest = parts
        if source not in self.defs.resource_types:
            raise bad_request(f"Parameter '{name}': unknown resource type '{source}' in _has")
        ref = self.lookup(source, ref_code)
        if ref.type != "reference":
            raise bad_request(
                f"Parameter '{name}': '{ref_code}' of {source} is a {ref.type} parameter; _has needs a "
                "reference parameter"
            )
        if ref.targets and rtype not in ref.targets:
            raise bad_request(
                f"Parameter '{name}': {source}.{ref_code} references {', '.join(ref.targets)}, never {rtype}"
            )
        return HasClause(
            source_type=source, reference_param_id=ref.pid, clause=self.clause(source, rest, value)
        )

    def _simple(self, p: _Param, name: str, modifier: str | None, value: str) -> ParamClause:
        if modifier == "missing" and self._allows(p, modifier):
            # search.html#missing
            if value not in ("true", "false"):
                raise bad_request(f"Parameter '{name}': :missing takes true or false, not '{value}'")
            return ParamClause(
                resource_type=p.rtype,
                code=p.code,
                param_id=p.pid,
                type=p.type,
                modifier="missing",
                missing=value == "true",
            )
        type_modifier: str | None = None
        pid = p.pid
        if modifier is not None:
            if p.type == "reference" and modifier not in _SPEC_MODIFIERS:
                # search.html#reference: `subject:Patient=123` is `subject=Patient/123`.
                self._check_target(name, p, modifier, "unknown modifier or resource type")
                type_modifier = modifier
                modifier = "type"
            elif not self._allows(p, modifier):
                raise self._bad_modifier(p, name, modifier)
            elif modifier == "identifier":
                # search.html#reference: `:identifier` matches Reference.identifier, indexed as tokens.
                pid = param_id(p.rtype, p.code + ":identifier")
        segments = _split(value, ",")  # search.html#combining: a comma ORs values
        if any(s == "" for s in segments):
            raise bad_request(f"Parameter '{name}': empty value in the comma-separated list '{value}'")
        values = tuple(self._value(p, name, modifier, type_modifier, s) for s in segments)
        return ParamClause(
            resource_type=p.rtype, code=p.code, param_id=pid, type=p.type, modifier=modifier, values=values
        )

    def _value(
        self, p: _Param, name: str, modifier: str | None, type_modifier: str | None, raw: str
    ) -> SearchValue:
        if p.code == "_id":
            ident = _unescape(raw)
            if not _ID_RE.fullmatch(ident):
                raise bad_request(
                    f"Parameter '{name}': '{ident}' is not a resource id (1-64 of A-Z a-z 0-9 - .)"
                )
            return TokenValue(None, ident)
        if p.type == "string":
            # search.html#string: case- and accent-insensitive "starts with"; :exact is verbatim.
            if modifier == "exact":
                return StringValue(_unescape(raw))
            return _normalized(name, raw)
        if p.type == "token":
            if modifier == "text":
                return _normalized(name, raw)  # search.html#token `:text`: string match on the display
            return _token(name, raw)
        if p.type == "reference":
            if modifier == "identifier":
                return _token(name, raw)
            return self._reference(p, name, raw, type_modifier)
        if p.type == "date":
            return _date(name, raw)
        if p.type == "number":
            prefix, number = _prefixed(name, raw, "number", _NUMBER_FORMAT)
            value, low, high = _number(name, raw, number, "number", _NUMBER_FORMAT)
            return NumberValue(prefix, value, low, high)
        if p.type == "quantity":
            return _quantity(name, raw)
        return UriValue(_unescape(raw))  # search.html#uri

    def _reference(self, p: _Param, name: str, raw: str, type_modifier: str | None) -> ReferenceValue:
        # search.html#reference: [type]/[id], [id] or an absolute URL.
        text = _unescape(raw)
        if self.base_url and text.startswith(self.base_url):
            text = text[len(self.base_url) :]
        m = _REL_REF_RE.fullmatch(text)
        if m:
            rtype, rid = m[1], m[2]
            if rtype not in self.defs.resource_types:
                raise bad_request(
                    f"Parameter '{name}': unknown resource type '{rtype}' in reference '{text}'"
                )
            if type_modifier and rtype != type_modifier:
                raise bad_request(
                    f"Parameter '{name}': reference '{text}' contradicts the :{type_modifier} modifier"
                )
            self._check_target(name, p, rtype, "")
            return ReferenceValue(rtype, rid, None)
        if _ID_RE.fullmatch(text):
            rtype_or_none = type_modifier or (p.targets[0] if len(p.targets) == 1 else None)
            return ReferenceValue(rtype_or_none, text, None)
        if _ABS_URI_RE.match(text):
            return ReferenceValue(None, None, text)
        raise bad_request(
            f"Parameter '{name}': '{text}' is not a reference; expected [type]/[id] (e.g. Patient/123), "
            "[id] or an absolute URL"
        )

    def _check_target(self, name: str, p: _Param, rtype: str, unknown: str) -> None:
        if rtype not in self.defs.resource_types:
            raise bad_request(f"Parameter '{name}': {unknown or 'unknown resource type'} ':{rtype}'")
        if p.targets and rtype not in p.targets:
            raise bad_request(
                f"Parameter '{name}': {p.rtype}.{p.code} references {', '.join(p.targets)}, not {rtype}"
            )

    @staticmethod
    def _allows(p: _Param, modifier: str) -> bool:
        if p.code == "_id":
            return modifier == "not"
        if p.code == "_lastUpdated":
            return False
        return modifier in _MODIFIERS.get(p.type, ())

    @staticmethod
    def _bad_modifier(p: _Param, name: str, modifier: str) -> FhirError:
        # search.html#modifiers: a server rejects a modifier it does not support.
        allowed = [":" + m for m in _MODIFIERS.get(p.type, ()) if _Parser._allows(p, m)]
        if p.type == "reference":
            allowed.append(":[type]")
        takes = f"'{p.code}' takes {', '.join(allowed)}" if allowed else f"'{p.code}' takes no modifier"
        if modifier in _SPEC_ONLY_MODIFIERS.get(p.type, ()):
            what = f"the :{modifier} modifier is not supported by this server"
        elif modifier in _SPEC_MODIFIERS:
            what = f"the :{modifier} modifier is not valid for {p.type} parameter '{p.code}'"
        else:
            what = f"unknown modifier ':{modifier}'"
        return bad_request(f"Parameter '{name}': {what} ({takes})")

    # ---- result parameters -----------------------------------------------------------------

    def include(self, name: str, modifier: str | None, value: str, reverse: bool) -> Include:
        # search.html#include: `Type:param[:targetType]`; `:iterate` (R4) or `:recurse` (STU3).
        if modifier not in (None, "iterate", "recurse"):
            raise bad_request(f"Parameter '{name}': unknown modifier ':{modifier}' (expected :iterate)")
        iterate = modifier is not None
        base = "_revinclude" if reverse else "_include"
        if "*" in value:
            raise bad_request(f"Parameter '{name}': the wildcard '{value}' is not supported by this server")
        parts = value.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise bad_request(
                f"Parameter '{name}': '{value}' is not [type]:[parameter][:targetType], "
                f"e.g. {base}=Observation:patient"
            )
        source, code = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if source not in self.defs.resource_types:
            raise bad_request(f"Parameter '{name}': unknown resource type '{source}'")
        ref = self.lookup(source, code)
        if ref.type != "reference":
            raise bad_request(
                f"Parameter '{name}': '{code}' of {source} is a {ref.type} parameter; {base} needs a "
                "reference parameter"
            )
        if target is not None:
            self._check_target(name, ref, target, "")
        if not iterate:
            # Without :iterate an include starts from the matches, so it must fit the search.
            searched = (self.resource_type,) if self.resource_type else self.types
            if searched and not reverse and source not in searched:
                raise _Skip(
                    f"'{value}' starts from {source}, which this search does not return "
                    f"({', '.join(searched)}); use {base}:iterate to include from included resources"
                )
            if searched and reverse:
                points_to = (target,) if target else ref.targets
                if points_to and not set(points_to) & set(searched):
                    raise _Skip(
                        f"'{value}' adds {source} resources that reference {', '.join(points_to)}, which "
                        f"this search does not return ({', '.join(searched)}); use {base}:iterate to "
                        "start from included resources"
                    )
        return Include(
            source_type=source,
            code=code,
            param_id=ref.pid,
            target_type=target,
            iterate=iterate,
            reverse=reverse,
        )

    def sort(self, value: str) -> tuple[SortKey, ...]:
        # search.html#sort: comma-separated keys, `-` for descending, applied in order.
        keys: list[SortKey] = []
        for raw in value.split(","):
            descending = raw.startswith("-")
            code = raw[1:] if descending else raw
            if not code:
                raise bad_request(f"Parameter '_sort': empty sort key in '{value}'")
            if any(k.code == code for k in keys):
                raise bad_request(f"Parameter '_sort': '{code}' appears more than once")
            if code in RESOURCE_COLUMNS:
                keys.append(SortKey(code, param_id(self.resource_type or "Resource", code), code, descending))
                continue
            if self.resource_type is None:
                raise bad_request(
                    f"Parameter '_sort': a search without a resource type sorts only by _id or _lastUpdated, "
                    f"not '{code}'"
                )
            try:
                p = self.lookup(self.resource_type, code)
            except _Skip as skip:
                raise bad_request(f"Parameter '_sort': {skip.reason}") from None
            if p.type not in _SORTABLE:
                raise bad_request(f"Parameter '_sort': cannot sort by {p.type} parameter '{code}'")
            keys.append(SortKey(code, p.pid, p.type, descending))
        return tuple(keys)

    def elements(self, value: str) -> tuple[str, ...]:
        # search.html#elements: base element names; `Patient.name` is accepted as `name` in a
        # Patient search.
        searched = (self.resource_type,) if self.resource_type else self.types or self.defs.resource_types
        names: list[str] = []
        for raw in value.split(","):
            m = _ELEMENT_RE.fullmatch(raw.strip())
            if m is None or (m[1] is not None and m[1] not in searched):
                raise bad_request(
                    f"Parameter '_elements': '{raw}' is not an element name; expected a comma-separated "
                    "list such as _elements=identifier,name"
                )
            if m[2] not in names:
                names.append(m[2])
        return tuple(names)


# ---- value syntax -----------------------------------------------------------------------------


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` where it is not escaped with a backslash (search.html#escaping); the pieces
    keep their escapes so that a second split (`|` after `,`) sees them."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    """`\\,` `\\|` `\\$` `\\\\` -> the character (search.html#escaping); other backslashes stay."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _split_modifier(name: str) -> tuple[str, str | None]:
    code, colon, modifier = name.partition(":")
    if not code:
        raise bad_request(f"Parameter '{name}' has no name before ':'")
    if not colon:
        return code, None
    if not modifier or ":" in modifier:
        raise bad_request(f"Parameter '{name}': expected [name] or [name]:[modifier] (one modifier)")
    return code, modifier


def _normalized(name: str, raw: str) -> StringValue:
    text = normalize_string(_unescape(raw))
    if not text:
        raise bad_request(f"Parameter '{name}': '{raw}' has no searchable characters")
    return StringValue(text)


def _token(name: str, raw: str) -> TokenValue:
    # search.html#token: [code], [system]|[code], |[code] (no system), [system]| (any code).
    parts = _split(raw, "|")
    if len(parts) == 1:
        return TokenValue(None, _unescape(raw))
    if len(parts) == 2:
        system, code = _unescape(parts[0]), _unescape(parts[1])
        if not system and not code:
            raise bad_request(f"Parameter '{name}': '|' needs a system or a code")
        return TokenValue(system, code or None)
    raise bad_request(
        f"Parameter '{name}': '{raw}' has more than one '|'; expected [system]|[code] "
        "(escape a literal '|' as '\\|')"
    )


def _prefixed(name: str, raw: str, kind: str, fmt: str) -> tuple[str, str]:
    """Split a search.html#prefix comparison prefix (default `eq`) off a number, date or quantity."""
    head = raw[:2]
    if len(raw) > 2 and head.isascii() and head.isalpha():
        if head not in PREFIXES:
            raise bad_request(
                f"Parameter '{name}': '{raw}' is not a valid {kind}: unknown prefix '{head}'; expected "
                f"{fmt}, where prefix is one of {_PREFIX_LIST}"
            )
        return head, raw[2:]
    return "eq", raw


def _date(name: str, raw: str) -> DateValue:
    # search.html#date: an implicit range from the precision given, compared with the prefix.
    prefix, text = _prefixed(name, raw, "date", _DATE_FORMAT)
    text = _TZ_SPACE_RE.sub(r"\1+\2", text)  # `+01:00` decoded from a query string as ` 01:00`
    try:
        low, high = date_range(text)
    except DateFormatError as exc:
        raise bad_request(
            f"Parameter '{name}': {exc}; expected {_DATE_FORMAT}, where prefix is one of {_PREFIX_LIST}"
        ) from None
    return DateValue(prefix, low, high)


def _number(name: str, raw: str, text: str, kind: str, fmt: str) -> tuple[Decimal, Decimal, Decimal]:
    if not _NUMBER_RE.fullmatch(text):
        raise bad_request(f"Parameter '{name}': '{raw}' is not a valid {kind}; expected {fmt}")
    return number_range(text)


def _quantity(name: str, raw: str) -> QuantityValue:
    # search.html#quantity: [prefix][number]|[system]|[code]; `||unit` matches code or unit.
    parts = _split(raw, "|")
    if len(parts) not in (1, 3):
        raise bad_request(f"Parameter '{name}': '{raw}' is not a valid quantity; expected {_QUANTITY_FORMAT}")
    prefix, number = _prefixed(name, parts[0], "quantity", _QUANTITY_FORMAT)
    value, low, high = _number(name, raw, number, "quantity", _QUANTITY_FORMAT)
    system: str | None = None
    code: str | None = None
    if len(parts) == 3:
        system = _unescape(parts[1]) or None
        code = _unescape(parts[2]) or None
    return QuantityValue(prefix, value, low, high, system, code)


def _non_negative(name: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise bad_request(f"Parameter '{name}': '{value}' is not a non-negative integer")
    number = int(value)
    if number > _MAX_INT:
        raise bad_request(f"Parameter '{name}': {value} is too large (at most {_MAX_INT})")
    return number


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise bad_request(f"Parameter '{name}': '{value}' is not one of {', '.join(allowed)}")
    return value


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]
