"""Structural validation of FHIR R4 (4.0.1) JSON resources on write.

What is checked, against the R4 element model in `data/structure-r4.json.gz` (built from the HL7
StructureDefinitions by `scripts/build_fhir_structure.py`):

* the body is a JSON object whose `resourceType` names a concrete R4 resource type;
* every property is an element of its type (unknown names are reported with close matches);
* arrays exactly where the element repeats (max `*`) and single values elsewhere (json.html);
* primitives: the JSON kind (string, number or boolean, json.html#primitive), the R4 regex of the
  type (datatypes.html#primitive), integer ranges (32 bit; positiveInt >= 1, unsignedInt >= 0) and
  real calendar days for date, dateTime and instant ("dates SHALL be valid dates");
* no empty strings, objects or arrays and no nulls (json.html: absent elements are omitted), except
  the null placeholders that align a primitive array with its `_element` array;
* `_element` siblings of primitives (json.html#primitive): an object (or an aligned array) holding
  only `id` and `extension`;
* at most one type of a choice element `value[x]` (formats.html#choice);
* min cardinality (`Observation.status`, `Extension.url`, ...);
* resources inside resources (`contained`, `Bundle.entry.resource`, `Parameters.parameter.resource`)
  recursively, each naming its own `resourceType`.

Not checked: profiles (`meta.profile` is not enforced), terminology bindings (a `code` is any
well-formed code) and invariants (the FHIRPath constraints such as dom-2 or ext-1). Those need a
full validator; this one only guarantees the JSON is well-formed R4 so storage, indexing and search
can rely on its shape.

Errors are `unprocessable` (422) with the offending element as `expression`: the FHIRPath of the
element, using JSON names for choice types (`Observation.valueQuantity.value`) and the element's own
name for an `_element` sibling (`Patient.birthDate.extension[0].url`).

Speed: the model is loaded once into dicts of precompiled checks, and a valid resource is walked
without building any path: a failure raises `_Invalid`, and each level adds its path segment while
the exception unwinds (try blocks cost nothing until they catch, since CPython 3.11).
"""

from __future__ import annotations

import calendar
import difflib
import functools
import gzip
import json
import math
import re
from collections.abc import Callable, Iterable
from decimal import Decimal
from importlib import resources
from typing import Any

from fhirgate.fhirserver.errors import FhirError, unprocessable

# Kinds of element, dispatched in `_walk` by the most frequent first.
_PRIM = 0  # a single primitive
_OBJ = 1  # a single complex value (datatype or backbone element)
_OBJS = 2  # an array of complex values
_PRIMS = 3  # an array of primitives
_OTHER = 4  # anything rarer: resources, `_element` siblings, resourceType: `check(value, obj, key, spec)`

#: (kind, check, choice group, spec): `check` is the primitive's predicate (for _PRIM/_PRIMS) or a
#: function of (value, obj, key, spec) (for _OTHER); `spec` is the _Prim or _Type of the value.
_Field = tuple[int, Any, str | None, Any]

_INT32 = 2**31 - 1

#: What each primitive looks like, quoted in the diagnostic when a value does not match (datatypes.html).
_HINTS = {
    "base64Binary": "base64: A-Z, a-z, 0-9, '+', '/' and '=' in groups of 4",
    "boolean": "true or false",
    "canonical": "a URL without whitespace",
    "code": "no leading, trailing or repeated whitespace",
    "date": "YYYY, YYYY-MM or YYYY-MM-DD",
    "dateTime": "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.fff] with a time zone (Z or +hh:mm)",
    "decimal": "a JSON number",
    "id": "1 to 64 characters of A-Z, a-z, 0-9, '-' and '.'",
    "instant": "YYYY-MM-DDThh:mm:ss[.fff] with a time zone (Z or +hh:mm)",
    "integer": "a whole number in -2147483648..2147483647",
    "markdown": "no form feed or vertical tab characters",
    "oid": "urn:oid: and a dotted number, e.g. urn:oid:1.2.3",
    "positiveInt": "a whole number in 1..2147483647",
    "string": "no form feed or vertical tab characters",
    "time": "hh:mm:ss[.fff]",
    "unsignedInt": "a whole number in 0..2147483647",
    "uri": "no whitespace",
    "url": "no whitespace",
    "uuid": "urn:uuid: and a lowercase UUID",
    "xhtml": "an XHTML <div>",
}


class _Invalid(Exception):
    """A validation failure on its way up: `template` holds `{path}`, filled in at the top once every
    level has appended its segment to `segs` (innermost first)."""

    def __init__(self, template: str, *values: object, segs: Iterable[str] = ()) -> None:
        super().__init__(template)
        self.template = template
        self.values = values
        self.segs = list(segs)


def _show(value: object) -> str:
    """A value as quoted in a diagnostic: short, and never the whole of a large payload."""
    if isinstance(value, str):
        return "'" + (value if len(value) <= 80 else value[:77] + "...") + "'"
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class _Prim:
    """A primitive type: its JSON kind and a predicate `check(value) -> bool` built once."""

    __slots__ = ("check", "kind", "match", "name")

    def __init__(self, name: str, kind: str, regex: str | None) -> None:
        self.name = name
        self.kind = kind
        self.match = _compile(regex) if regex else None
        self.check: Callable[[object], bool] = _checker(name, kind, regex)

    def problem(self, value: object) -> _Invalid:
        """Why `value` failed `check` (the slow path, only run on failure)."""
        name, kind = self.name, self.kind
        if value is None:
            return _Invalid("{path}: null is not allowed; omit the element instead (json.html)")
        if isinstance(value, list):
            return _Invalid("{path}: expected a single {0} value, not an array", name)
        got = _json_kind(value)
        if got != kind:
            return _Invalid(
                "{path}: {0} must be a JSON {1}, not {2} {3} (json.html#primitive)",
                name,
                kind,
                got,
                _show(value),
            )
        if value == "":
            return _Invalid("{path}: empty string is not allowed; omit the element instead (json.html)")
        if kind == "number":
            return _Invalid("{path}: {0} is not a valid {1} ({2})", _show(value), name, _HINTS[name])
        if name in ("date", "dateTime", "instant") and self.match and self.match(str(value)):
            return _Invalid("{path}: {0} is not a valid {1} (no such day)", _show(value), name)
        return _Invalid("{path}: {0} is not a valid {1} ({2})", _show(value), name, _HINTS.get(name, name))


def _compile(regex: str) -> Callable[[str], re.Match[str] | None]:
    """An R4 primitive regex as Python runs it fastest with the same meaning: ASCII classes (the
    regexes are XML Schema / Java ones, whose \\s and \\d are ASCII) and non-capturing groups (we
    only ask whether it matches; capturing costs up to a third of the time of the dateTime one)."""
    return re.compile(re.sub(r"(?<!\\)\((?!\?)", "(?:", regex), re.ASCII).fullmatch


def _real_day(text: str) -> bool:
    """Whether YYYY-MM-DD... names a real day: the R4 regex lets 02-30 through, the prose does not."""
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    return day <= calendar.monthrange(year, month)[1]


def _checker(name: str, kind: str, regex: str | None) -> Callable[[object], bool]:
    """The predicate of one primitive type; each is a closure over precompiled state, hot path only."""
    if name == "boolean":
        return lambda v: v is True or v is False
    if kind == "number":
        # json.html#primitive: integer types are JSON numbers without fraction (type int: a float such
        # as 1.0 is rejected, and bool, a subclass of int, too); R4 integers are 32 bit.
        lows = {"integer": -_INT32 - 1, "positiveInt": 1, "unsignedInt": 0}
        if name in lows:
            low = lows[name]
            return lambda v: type(v) is int and low <= v <= _INT32
        return lambda v: (
            type(v) is int
            or (type(v) is float and math.isfinite(v))
            or (type(v) is Decimal and v.is_finite())
        )
    if name in ("string", "markdown"):
        # `[ \r\n\t\S]+` (Java's \s, i.e. ASCII whitespace) only rules out "", form feed and
        # vertical tab; two `in` scans are much cheaper than running the regex on every string.
        return lambda v: type(v) is str and v != "" and "\f" not in v and "\x0b" not in v
    if name == "base64Binary":
        # The R4 regex `(\s*([0-9a-zA-Z\+/=]){4}\s*)+` backtracks exponentially on long wrapped
        # payloads that fail; this is the same language (ignoring where whitespace falls) in linear time.
        chars = re.compile(r"[0-9a-zA-Z+/=]+").fullmatch
        space = re.compile(r"\s+", re.ASCII)

        def base64(v: object) -> bool:
            if type(v) is not str:
                return False
            if chars(v):
                return len(v) % 4 == 0
            v = space.sub("", v)
            return bool(v) and chars(v) is not None and len(v) % 4 == 0

        return base64
    if regex is None:  # xhtml: any non-empty string (its content rules are invariants)
        return lambda v: type(v) is str and v != ""
    match = _compile(regex)
    if name in ("code", "uri", "url", "canonical"):
        # Fast path: an ASCII string of printable characters without a space holds no whitespace at
        # all, which these regexes (`[^\s]+(\s[^\s]+)*`, `\S*`) accept; anything else runs the regex.
        return lambda v: (
            type(v) is str
            and (
                (v.isascii() and v.isprintable() and " " not in v and v != "")
                or (v != "" and match(v) is not None)
            )
        )
    if name in ("date", "dateTime", "instant"):
        return lambda v: (
            type(v) is str and match(v) is not None and (len(v) < 10 or v[8:10] <= "28" or _real_day(v))
        )
    return lambda v: type(v) is str and v != "" and match(v) is not None


class _Type:
    """A complex type or backbone element: its elements by JSON name, precompiled."""

    __slots__ = ("choices", "fields", "name", "required")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fields: dict[str, _Field] = {}
        #: (label, names any of which satisfies min 1): a primitive may be present as `_name` only.
        self.required: tuple[tuple[str, tuple[str, ...]], ...] = ()
        #: choice base -> its JSON names (`value` -> valueQuantity, ...), for diagnostics.
        self.choices: dict[str, list[str]] = {}


class _Model:
    def __init__(self, data: dict[str, Any]) -> None:
        self.source: str = data["source"]
        prims = {k: _Prim(k, v["json"], v.get("regex")) for k, v in data["primitives"].items()}
        self.types: dict[str, _Type] = {name: _Type(name) for name in data["types"]}
        element = self.types["Element"]
        for name, elements in data["types"].items():
            t = self.types[name]
            required: list[tuple[str, tuple[str, ...]]] = []
            groups: dict[str, list[str]] = {}
            for key, (code, min_, max_, *choice) in sorted(elements.items()):
                group = choice[0] if choice else None
                array = max_ != "1"
                prim = prims.get(code)
                if prim is not None:
                    t.fields[key] = (_PRIMS if array else _PRIM, prim.check, group, prim)
                    t.fields["_" + key] = (_OTHER, _ext_array if array else _ext_single, None, element)
                elif code == "Resource":
                    t.fields[key] = (_OTHER, _resources if array else _resource, group, None)
                else:
                    t.fields[key] = (_OBJS if array else _OBJ, None, group, self.types[code])
                names: tuple[str, ...] = (key, "_" + key) if prim is not None else (key,)
                if group is not None:
                    groups.setdefault(group, []).append(key)
                    if min_:
                        required.append((group, names))
                elif min_:
                    required.append((key, names))
            merged: dict[str, tuple[str, ...]] = {}
            for label, alternatives in required:  # a required choice's expansions share one entry
                merged[label] = merged.get(label, ()) + alternatives
            t.required = tuple(merged.items())
            t.choices = groups
        self.resources: dict[str, _Type] = {}
        for name in data["resources"]:
            t = self.types[name]
            t.fields["resourceType"] = (_OTHER, _skip, None, None)
            self.resources[name] = t


@functools.cache
def _model() -> _Model:
    blob = resources.files("fhirgate.fhirserver").joinpath("data/structure-r4.json.gz").read_bytes()
    return _Model(json.loads(gzip.decompress(blob)))


def _skip(value: object, obj: dict[str, Any], key: str, spec: object) -> None:
    """`resourceType`: checked (before the walk) by whoever looked the type up."""


def _walk(obj: dict[str, Any], t: _Type) -> None:
    """Validate one JSON object against its type; the hot loop of the module."""
    if not obj:
        raise _Invalid("{path}: empty object is not allowed; omit the element instead (json.html)")
    fields = t.fields
    seen: dict[str, str] | None = None
    key = ""
    try:
        for key, value in obj.items():
            try:
                kind, check, group, spec = fields[key]
            except KeyError:
                raise _unknown(str(key), t) from None
            if group is not None:
                if seen is None:
                    seen = {group: key}
                elif group in seen:
                    raise _Invalid(
                        "{path}: {0}[x] has two values, '{1}' and '{2}'; a choice element takes one type "
                        "(formats.html#choice)",
                        group,
                        seen[group],
                        key,
                    )
                else:
                    seen[group] = key
            if kind == _PRIM:
                if not check(value):
                    raise spec.problem(value)
            elif kind == _OBJ:
                if type(value) is not dict:
                    raise _not_object(value, spec)
                _walk(value, spec)
            elif kind == _OBJS:
                if type(value) is not list or not value:
                    raise _not_array(value, spec.name)
                for item in value:
                    try:
                        if type(item) is not dict:
                            raise _not_object(item, spec)
                        _walk(item, spec)
                    except _Invalid as e:
                        e.segs.append(f"[{_index(value, item)}]")
                        raise
            elif kind == _PRIMS:
                if type(value) is not list or not value:
                    raise _not_array(value, spec.name)
                for item in value:
                    if not check(item):
                        _prims_slow(value, spec, obj, key)
                        break
            else:
                check(value, obj, key, spec)
    except _Invalid as e:
        # An `_element` sibling is reported at its element: FHIRPath has no `_birthDate`.
        name = str(key)  # always a str in parsed JSON; str() keeps a Python caller's odd key reportable
        e.segs.append("." + (name[1:] if name[:1] == "_" and name in fields else name))
        raise
    for label, names in t.required:
        for name in names:
            if name in obj:
                break
        else:
            raise _missing(label, names, t)


def _index(items: list[Any], item: object) -> int:
    """Index of the failing item: found by identity, off the hot path (an identical object earlier in
    the list would have failed first, so the first identical one is the failing one)."""
    return next(i for i, x in enumerate(items) if x is item)


def _prims_slow(items: list[Any], prim: _Prim, obj: dict[str, Any], key: str) -> None:
    """An item of a primitive array failed its check: a null is fine where the aligned `_key` item
    carries the element's id or extensions (json.html#primitive); anything else is an error."""
    ext = obj.get("_" + key)
    for i, item in enumerate(items):
        if item is None:
            if type(ext) is list and i < len(ext) and ext[i] is not None:
                continue
            raise _Invalid(
                "{path}: null in an array is only allowed where '_{0}' has an id or extensions at the same "
                "index (json.html#primitive)",
                key,
                segs=[f"[{i}]"],
            )
        if not prim.check(item):
            error = prim.problem(item)
            error.segs.append(f"[{i}]")
            raise error


def _ext_single(value: object, obj: dict[str, Any], key: str, element: _Type) -> None:
    """`_birthDate`: the id and extensions of a single primitive (json.html#primitive)."""
    if type(value) is not dict:
        raise _Invalid(
            "{path}: '{0}' must be an object with id and/or extension{1} (json.html#primitive)",
            key,
            ", not an array" if type(value) is list else "",
        )
    _walk(value, element)


def _ext_array(value: object, obj: dict[str, Any], key: str, element: _Type) -> None:
    """`_given`: an array aligned with `given`, null where an item has no id or extensions."""
    if type(value) is not list or not value:
        raise _Invalid(
            "{path}: '{0}' must be a non-empty array aligned with '{1}' (json.html#primitive)", key, key[1:]
        )
    values = obj.get(key[1:])
    if values is not None and (type(values) is not list or len(values) != len(value)):
        raise _Invalid("{path}: '{0}' must have as many items as '{1}' (json.html#primitive)", key, key[1:])
    for i, item in enumerate(value):
        if item is None:
            if values is None or values[i] is None:
                raise _Invalid(
                    "{path}: item {0} has neither a value nor an id or extensions", i, segs=[f"[{i}]"]
                )
            continue
        if type(item) is not dict:
            raise _Invalid("{path}: must be an object with id and/or extension, or null", segs=[f"[{i}]"])
        try:
            _walk(item, element)
        except _Invalid as e:
            e.segs.append(f"[{i}]")
            raise


def _resource(value: object, obj: object = None, key: str = "", spec: object = None) -> None:
    """A resource inside a resource (Bundle.entry.resource, Parameters.parameter.resource)."""
    if type(value) is not dict:
        raise _Invalid("{path}: expected a resource (a JSON object), not {0}", _json_kind(value))
    resource_type = value.get("resourceType")
    t = _model().resources.get(resource_type) if type(resource_type) is str else None
    if t is None:
        raise _bad_resource_type(resource_type)
    _walk(value, t)


def _resources(value: object, obj: dict[str, Any], key: str, spec: object) -> None:
    """`contained`: an array of resources."""
    if type(value) is not list or not value:
        raise _not_array(value, "Resource")
    for i, item in enumerate(value):
        try:
            _resource(item)
        except _Invalid as e:
            e.segs.append(f"[{i}]")
            raise


def _bad_resource_type(resource_type: object) -> _Invalid:
    if resource_type is None:
        return _Invalid("{path} has no resourceType; a resource names its type in it (json.html#resources)")
    if type(resource_type) is not str:
        return _Invalid("The resourceType in {path} must be a string, not {0}", _json_kind(resource_type))
    if resource_type in ("Resource", "DomainResource"):
        return _Invalid(
            "{path}: {0} is an abstract type; name a concrete resource type such as Patient", resource_type
        )
    near = difflib.get_close_matches(resource_type, _model().resources, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return _Invalid("Unknown resourceType {0} in {path}{1}", _show(resource_type), hint)


def _not_object(value: object, t: _Type) -> _Invalid:
    if type(value) is list:
        return _Invalid("{path}: expected a single {0}, not an array", _type_label(t))
    if value is None:
        return _Invalid("{path}: null is not allowed; omit the element instead (json.html)")
    return _Invalid(
        "{path}: expected a {0} (a JSON object), not {1} {2}", _type_label(t), _json_kind(value), _show(value)
    )


def _not_array(value: object, type_name: str) -> _Invalid:
    if value is None:
        return _Invalid("{path}: null is not allowed; omit the element instead (json.html)")
    if type(value) is list:
        return _Invalid("{path}: empty array is not allowed; omit the element instead (json.html)")
    return _Invalid(
        "{path}: this element repeats, so its value must be a JSON array of {0}, not a single {1} "
        "(json.html#arrays)",
        type_name.rsplit(".", 1)[-1],
        _json_kind(value),
    )


def _type_label(t: _Type) -> str:
    return "backbone element" if "." in t.name else t.name


def _missing(label: str, names: tuple[str, ...], t: _Type) -> _Invalid:
    if label in t.choices:
        alternatives = ", ".join(t.choices[label])
        return _Invalid(
            "{path} is required (min cardinality 1): give one of {0}", alternatives, segs=["." + label]
        )
    return _Invalid("{path} is required (min cardinality 1)", segs=["." + label])


def _unknown(key: str, t: _Type) -> _Invalid:
    """An unknown property, with the most helpful hint we can find cheaply (only run on error)."""
    if key[:1] == "_" and key[1:] in t.fields:
        return _Invalid(
            "Unknown element {0} at {path}: '_' siblings exist only for primitive elements, and '{1}' is "
            "not one (json.html#primitive)",
            _show(key),
            key[1:],
        )
    if key == "resourceType":
        return _Invalid("Unknown element 'resourceType' at {path}: only a resource names its resourceType")
    known = [k for k in t.fields if k[:1] != "_" and k != "resourceType"]
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
    if near:  # a typo of an existing name is the likeliest mistake
        return _Invalid(
            "Unknown element {0} at {path} (did you mean {1}?)",
            _show(key),
            " or ".join(f"'{n}'" for n in near),
        )
    for base, names in t.choices.items():
        if key == base or (key.startswith(base) and key[len(base) : len(base) + 1].isupper()):
            return _Invalid(
                "Unknown element {0} at {path}: {1}[x] is a choice element; use one of {2} "
                "(formats.html#choice)",
                _show(key),
                base,
                ", ".join(names),
            )
    near = difflib.get_close_matches(key, known, n=3)
    hint = " (did you mean " + " or ".join(f"'{n}'" for n in near) + "?)" if near else ""
    return _Invalid("Unknown element {0} at {path}{1}", _show(key), hint)


def validate_resource(resource: object, expected_type: str | None = None) -> None:
    """Raise a 422 `FhirError` naming the offending element if `resource` is not structurally valid
    FHIR R4 JSON; a 400 if its resourceType is not `expected_type` (the type in the request URL)."""
    if type(resource) is not dict:
        raise unprocessable(
            f"The resource must be a JSON object, not {_json_kind(resource)} (json.html#resources)"
        )
    resource_type = resource.get("resourceType")
    if expected_type is not None and type(resource_type) is str and resource_type != expected_type:
        raise FhirError(
            400,
            f"The body's resourceType '{resource_type}' does not match the URL's resource type "
            f"'{expected_type}'",
            "invalid",
        )
    t = _model().resources.get(resource_type) if type(resource_type) is str else None
    try:
        if t is None:
            raise _bad_resource_type(resource_type)
        _walk(resource, t)
    except _Invalid as e:
        path = (t.name if t is not None else "") + "".join(reversed(e.segs))
        diagnostics = e.template.format(*e.values, path=path or "the resource")
        raise unprocessable(diagnostics[0].upper() + diagnostics[1:], path or None) from None
    except RecursionError:
        raise unprocessable("The resource is nested too deeply to validate") from None
