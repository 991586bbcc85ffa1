"""The SearchParameter FHIRPath compiler: unit tests of the tricky shapes, and a differential test
against fhirpathpy (an independent FHIRPath engine) over every supported R4 search parameter of
all 147 resource types, on generated resources and on the Synthea sample data."""

from __future__ import annotations

import copy
import decimal
import functools
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fhirpathpy
import pytest
from fhirpathpy.models import models

from fhirgate.fhirserver.definitions import definitions
from fhirgate.fhirserver.fhirpath import (
    Extractor,
    FHIRPathUnsupported,
    _type_map,
    compile_expression,
    compile_strict,
    reference_type,
    resource_types,
)

SYNTHEA = Path(__file__).resolve().parents[3] / "shared/data/synthea"


def run(expression: str, resource: dict[str, Any]) -> list[tuple[Any, str]]:
    extractor = compile_expression(expression, resource["resourceType"])
    assert extractor is not None, expression
    return extractor(resource)


def values(expression: str, resource: dict[str, Any]) -> list[Any]:
    return [v for v, _t in run(expression, resource)]


# ---- unit tests ----------------------------------------------------------------------------------


def test_path_flattens_arrays_and_reports_types() -> None:
    patient = {
        "resourceType": "Patient",
        "name": [{"family": "Doe", "given": ["John", "Q"]}, {"given": ["Johnny"]}],
        "birthDate": "1970-01-01",
        "active": True,
    }
    assert run("Patient.name.given", patient) == [("John", "string"), ("Q", "string"), ("Johnny", "string")]
    assert run("Patient.name", patient) == [(n, "HumanName") for n in patient["name"]]
    assert run("Patient.birthDate", patient) == [("1970-01-01", "date")]
    assert run("Patient.active", patient) == [(True, "boolean")]
    assert run("Patient.gender", patient) == []
    assert run("Resource.id", {"resourceType": "Patient", "id": "p1"}) == [("p1", "string")]


def test_primitive_array_with_extension_only_entries() -> None:
    # R4 json.html#primitive: `null` holds the place of a value that only has an extension
    patient = {"resourceType": "Patient", "name": [{"given": ["A", None, "B"]}]}
    assert values("Patient.name.given", patient) == ["A", "B"]


def test_choice_element_every_type_and_as() -> None:
    obs = {"resourceType": "Observation", "valueQuantity": {"value": 1.5, "unit": "mg"}}
    assert run("Observation.value", obs) == [({"value": 1.5, "unit": "mg"}, "Quantity")]
    assert run("(Observation.value as Quantity) | (Observation.value as SampledData)", obs) == [
        ({"value": 1.5, "unit": "mg"}, "Quantity")
    ]
    assert run("(Observation.value as CodeableConcept)", obs) == []
    assert run("Observation.value.ofType(Quantity)", obs) == [({"value": 1.5, "unit": "mg"}, "Quantity")]
    text = {"resourceType": "Observation", "valueString": "positive"}
    assert run("(Observation.value as string) | (Observation.value as CodeableConcept).text", text) == [
        ("positive", "string")
    ]
    cond = {"resourceType": "Condition", "onsetDateTime": "2020-01-02", "abatementString": "later"}
    assert run("Condition.onset.as(dateTime) | Condition.onset.as(Period)", cond) == [
        ("2020-01-02", "dateTime")
    ]
    assert values("Condition.abatement.as(string)", cond) == ["later"]
    assert values("Condition.abatement.as(dateTime)", cond) == []


def test_as_is_exact_so_uri_does_not_match_canonical() -> None:
    cm = {"resourceType": "ConceptMap", "sourceCanonical": "http://x/ValueSet/a"}
    assert values("(ConceptMap.source as uri)", cm) == []
    assert run("(ConceptMap.source as canonical)", cm) == [("http://x/ValueSet/a", "canonical")]


def test_as_on_each_item_of_a_collection() -> None:
    # strict FHIRPath wants a singleton left of `as`; R4 search expressions rely on it per item
    obs = {
        "resourceType": "Observation",
        "component": [{"valueQuantity": {"value": 1}}, {"valueString": "x"}, {"valueQuantity": {"value": 2}}],
    }
    assert values("(Observation.component.value as Quantity)", obs) == [{"value": 1}, {"value": 2}]


def test_union_keeps_only_the_branches_of_the_indexed_type() -> None:
    expression = "AllergyIntolerance.code | AllergyIntolerance.reaction.substance | Condition.code"
    extractor = compile_strict(expression, "Condition")
    assert len(extractor.branches) == 1
    allergy = compile_strict(expression, "AllergyIntolerance")
    assert allergy.types == {"CodeableConcept"}
    assert len(allergy.branches) == 2
    with pytest.raises(FHIRPathUnsupported, match="selects nothing"):
        compile_strict(expression, "Observation")


def test_where_resolve_is_type() -> None:
    expression = "Observation.subject.where(resolve() is Patient)"
    for ref, expected in [
        ("Patient/1", True),
        ("Patient/1/_history/3", True),
        ("http://other.org/fhir/Patient/1", True),
        ("http://other.org/fhir/Patient/1/_history/2", True),
        ("Group/1", False),
        ("#contained", False),
        ("urn:uuid:9a0d7938-4f49-43f6-8eea-b22e1bbe1b74", False),
    ]:
        obs = {"resourceType": "Observation", "subject": {"reference": ref}}
        assert bool(values(expression, obs)) is expected, ref
    # a logical reference says what it points at with `type`
    logical = {"resourceType": "Observation", "subject": {"type": "Patient", "identifier": {"value": "x"}}}
    assert values(expression, logical) == [logical["subject"]]
    assert values("Observation.subject.where(resolve() is Group)", logical) == []
    assert values("Observation.subject.where(resolve() is Resource)", logical) == [logical["subject"]]


def test_reference_type() -> None:
    assert reference_type("Patient/1") == "Patient"
    assert reference_type("https://h/fhir/Encounter/e/_history/1") == "Encounter"
    assert reference_type("#x") is None
    assert reference_type("urn:oid:1.2.3") is None
    assert reference_type("nothing") is None


def test_where_with_literal_comparisons() -> None:
    patient = {
        "resourceType": "Patient",
        "telecom": [
            {"system": "phone", "value": "555"},
            {"system": "email", "value": "a@b.c"},
            {"value": "no-system"},
        ],
    }
    assert values("Patient.telecom.where(system='email')", patient) == [{"system": "email", "value": "a@b.c"}]
    assert values("Patient.telecom.where(system != 'email').value", patient) == ["555"]
    assert values("Patient.telecom.where(system = 'fax')", patient) == []


def test_extension_paths() -> None:
    race = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
    patient = {
        "resourceType": "Patient",
        "extension": [
            {
                "url": race,
                "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16", "code": "2106-3"}},
                    {"url": "detailed", "valueCoding": {"code": "2108-9"}},
                    {"url": "text", "valueString": "White"},
                ],
            },
            {"url": "http://other", "valueCode": "nope"},
        ],
    }
    expression = f"Patient.extension.where(url = '{race}').extension.value.code"
    assert run(expression, patient) == [("2106-3", "code"), ("2108-9", "code")]
    condition = {
        "resourceType": "Condition",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/condition-assertedDate",
                "valueDateTime": "2020-02-02",
            }
        ],
    }
    asserted = (
        "Condition.extension.where(url = "
        "'http://hl7.org/fhir/StructureDefinition/condition-assertedDate').valueDateTime"
    )
    assert run(asserted, condition) == [("2020-02-02", "dateTime")]


def test_deceased_boolean_expression() -> None:
    expression = "Patient.deceased.exists() and Patient.deceased != false"
    cases = [
        ({}, [False]),  # `false and {}` is false (three-valued logic)
        ({"deceasedBoolean": False}, [False]),
        ({"deceasedBoolean": True}, [True]),
        ({"deceasedDateTime": "2020-01-01"}, [True]),
    ]
    for extra, expected in cases:
        result = run(expression, {"resourceType": "Patient", **extra})
        assert result == [(e, "boolean") for e in expected], extra


def test_logic_and_functions() -> None:
    patient = {"resourceType": "Patient", "active": True, "name": [{"family": "A"}, {"family": "B"}]}
    assert values("Patient.active or Patient.gender.exists()", patient) == [True]
    assert values("Patient.gender.exists() or Patient.gender.exists()", patient) == [False]
    assert values("Patient.gender.empty()", patient) == [True]
    assert values("Patient.name.exists(family = 'B')", patient) == [True]
    assert values("Patient.name.first().family", patient) == ["A"]
    assert values("Patient.name[1].family", patient) == ["B"]
    assert values("Patient.name.family = 'A'", patient) == [False]  # two items vs one
    assert values("Patient.gender = 'male'", patient) == []
    assert values("Patient.active is boolean", patient) == [True]
    assert values("Patient.name.where($this.family = 'B').family", patient) == ["B"]


def test_choice_prefix_evaluated_once_per_resource_and_never_stale() -> None:
    expression = "Observation.component.value"
    a = {"resourceType": "Observation", "component": [{"valueString": "a"}, {"valueInteger": 1}]}
    b = {"resourceType": "Observation", "component": [{"valueString": "b"}]}
    assert sorted(map(str, values(expression, a))) == ["1", "a"]
    assert values(expression, b) == ["b"]
    assert sorted(map(str, values(expression, a))) == ["1", "a"]


@pytest.mark.parametrize(
    "expression",
    [
        "Patient.name.select(family)",
        "Patient.birthDate > @2020",
        "Patient.name.family + 'x'",
        "%resource.id",
        "Bundle.entry[0].resource.id",
        "Patient.nosuchelement",
        "Patient.name as Nonsense",
        "Patient.gender in ('a' | 'b')",
        "Patient.link.other.resolve().name",
        "Patient.name.where(",
        "Patient.name.family.id",
    ],
)
def test_unsupported_expressions_are_not_compiled(expression: str) -> None:
    rtype = expression.split(".")[0] if expression[0].isupper() else "Patient"
    assert compile_expression(expression, rtype) is None
    with pytest.raises(FHIRPathUnsupported):
        compile_strict(expression, rtype)


def test_compiled_once() -> None:
    first = compile_expression("Observation.code", "Observation")
    assert first is not None
    assert compile_expression("Observation.code", "Observation") is first
    assert compile_expression("Observation.code", "NoSuchType") is None


def test_every_supported_r4_expression_compiles() -> None:
    defs = definitions()
    assert resource_types() - {"Resource", "DomainResource"} == defs.resource_types
    failures = []
    for rtype in sorted(defs.resource_types):
        for code, sp in defs.params(rtype).items():
            if sp.supported and sp.expression and compile_expression(sp.expression, rtype) is None:
                failures.append(f"{rtype}.{code}")
    assert failures == []


# ---- differential test against fhirpathpy -------------------------------------------------------

_MODEL = models["r4"]


def _fhirpathpy_expression(expression: str) -> str:
    """The same expression in the subset fhirpathpy evaluates like we do: fhirpathpy has no
    `resolve()` (decided here, as in the index, from the reference text or `type`), rejects `as`
    on collections (R4 search expressions apply it per item, which is `ofType`), and does not see
    that an Observation is a `Resource` at the start of a path (`Resource.id` is just `id`)."""
    expression = re.sub(
        r"\.where\(resolve\(\) is (\w+)\)",
        r".where(reference.startsWith('\1/') or reference.contains('/\1/') "
        r"or (reference.empty() and (type = '\1' or type.endsWith('/\1'))))",
        expression,
    )
    expression = re.sub(r"^(Resource|DomainResource)\.", "", expression)
    expression = re.sub(r"\(([^()]*?) as (\w+)\)", r"(\1.ofType(\2))", expression)
    return expression.replace(".as(", ".ofType(")


@functools.cache
def _fhirpathpy_compiled(expression: str) -> Callable[[Any], list[Any]]:
    fn: Callable[[Any], list[Any]] = fhirpathpy.compile(expression, _MODEL)
    return fn


def _strip(v: Any) -> Any:
    # fhirpathpy drops extension-only objects from complex results; extensions are compared where
    # an expression navigates them (race, ethnicity, assertedDate...), as primitive values
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k != "extension"}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def _canonical(v: Any) -> str:
    return json.dumps(
        _strip(v), sort_keys=True, default=lambda x: float(x) if isinstance(x, decimal.Decimal) else str(x)
    )


def _differences(rtype: str, resources: list[dict[str, Any]]) -> tuple[int, int, list[str]]:
    """(evaluations, evaluations with a non-empty result, differences) over every supported
    parameter of `rtype`."""
    evaluations = non_empty = 0
    diffs = []
    for code, sp in definitions().params(rtype).items():
        if not sp.supported or not sp.expression:
            continue
        extractor = compile_expression(sp.expression, rtype)
        assert extractor is not None
        theirs_fn = _fhirpathpy_compiled(_fhirpathpy_expression(sp.expression))
        for resource in resources:
            ours = [c for v, _t in extractor(resource) if (c := _canonical(v)) != "{}"]
            theirs = [c for v in theirs_fn(copy.deepcopy(resource)) if (c := _canonical(v)) != "{}"]
            evaluations += 1
            non_empty += bool(ours)
            # `|` is a set union (FHIRPath §6.4.1); our branches also come in expression order,
            # not document order, so compare without order
            same = set(ours) == set(theirs) if "|" in sp.expression else sorted(ours) == sorted(theirs)
            if not same:
                diffs.append(
                    f"{rtype}.{code} on {resource.get('id')}: ours {ours[:3]} fhirpathpy {theirs[:3]}"
                )
    return evaluations, non_empty, diffs


# -- generated resources: every element of every type, with the literals the expressions test for

_LITERALS = sorted(
    {
        lit
        for rtype in definitions().resource_types
        for sp in definitions().params(rtype).values()
        for lit in re.findall(r"'([^']*)'", sp.expression)
    }
)
_REFERENCES = [
    "Patient/p1",
    "Patient/p2/_history/3",
    "Practitioner/d1",
    "Location/l1",
    "Organization/o1",
    "Group/g1",
    "RelatedPerson/r1",
    "http://other.org/fhir/Patient/p9",
    "#c1",
    "urn:uuid:9a0d7938-4f49-43f6-8eea-b22e1bbe1b74",
]


def _primitive(type_name: str, rnd: random.Random) -> Any:
    if type_name == "boolean":
        return rnd.random() < 0.5
    if type_name in ("integer", "positiveInt", "unsignedInt"):
        return rnd.randint(1, 99)
    if type_name == "decimal":
        return rnd.choice([1.5, 20, 0.25])
    if type_name == "date":
        return rnd.choice(["2020-03-04", "2021", "2019-07"])
    if type_name == "dateTime":
        return rnd.choice(["2020-03-04T10:00:00Z", "2020-03-04", "2018-01-02T03:04:05+02:00"])
    if type_name == "instant":
        return "2020-03-04T10:00:00.123Z"
    if type_name == "time":
        return "10:00:00"
    if type_name in ("base64Binary", "xhtml"):
        return "aGVsbG8="
    if rnd.random() < 0.4:
        return rnd.choice(_LITERALS)
    if type_name in ("uri", "url", "canonical"):
        return rnd.choice(
            ["http://example.org/fhir/ValueSet/x", "http://example.org/Q/1|2.0", "urn:oid:1.2.3"]
        )
    return rnd.choice(["Élodie", "abc", "x-1", "Müller"])


def _generate(owner: str, rnd: random.Random, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, declared in _type_map().elements[owner].items():
        if name in ("id", "contained", "modifierExtension"):
            continue
        if name == "extension" and not (depth == 0 or (owner == "Extension" and depth == 1)):
            continue
        if rnd.random() > (0.75 if depth < 2 else 0.45 if depth < 4 else 0.0):
            continue
        if isinstance(declared, list):  # a choice: one of its types, named after it
            type_name = rnd.choice(declared)
            key = name[:-3] + type_name[0].upper() + type_name[1:]
        else:
            type_name, key = declared, name
        if type_name == "Resource":
            continue
        items = []
        for _ in range(2 if rnd.random() < 0.3 and owner != "Reference" else 1):
            if owner == "Reference" and name == "reference":
                items.append(rnd.choice(_REFERENCES))
            elif type_name in _type_map().elements:
                if child := _generate(type_name, rnd, depth + 1):
                    items.append(child)
            else:
                items.append(_primitive(type_name, rnd))
        if items:
            out[key] = items if len(items) > 1 else items[0]
    return out


def test_differential_generated_resources_all_types() -> None:
    evaluations = non_empty = 0
    diffs: list[str] = []
    for rtype in sorted(definitions().resource_types):
        rnd = random.Random(rtype)
        resources = [
            {"resourceType": rtype, "id": f"{rtype}-{i}", **_generate(rtype, rnd, 0)} for i in range(3)
        ]
        e, n, d = _differences(rtype, resources)
        evaluations, non_empty, diffs = evaluations + e, non_empty + n, diffs + d
    assert diffs == []
    assert evaluations > 6000
    assert non_empty > evaluations // 3  # the generated data reaches most expressions


# -- Synthea -------------------------------------------------------------------------------------


def _synthea_resources() -> Iterator[dict[str, Any]]:
    if not SYNTHEA.is_dir():
        pytest.skip(f"Synthea sample data not found at {SYNTHEA}")
    bundles = [json.loads(p.read_text()) for p in sorted(SYNTHEA.glob("*.json"))]
    local = {
        e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for b in bundles
        for e in b["entry"]
    }

    def localise(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: local.get(v, v) if k == "reference" and isinstance(v, str) else localise(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [localise(x) for x in node]
        return node

    for bundle in bundles:
        for entry in bundle["entry"]:
            yield localise(entry["resource"])


def _sample(resources: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Up to `size` resources: one of each distinct shape (set of element names) first."""
    shapes: dict[str, dict[str, Any]] = {}
    for r in resources:
        shapes.setdefault(_canonical(sorted(_keys(r))), r)
    chosen = list(shapes.values())[:size]
    rest = [r for r in resources if all(r is not c for c in chosen)]
    step = max(1, len(rest) // max(1, size - len(chosen)))
    return chosen + rest[::step][: size - len(chosen)]


def _keys(node: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(prefix + k)
            keys |= _keys(v, prefix + k + ".")
    elif isinstance(node, list):
        for x in node:
            keys |= _keys(x, prefix)
    return keys


def test_differential_synthea() -> None:
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in _synthea_resources():
        by_type.setdefault(r["resourceType"], []).append(r)
    assert len(by_type) >= 10
    evaluations = non_empty = 0
    diffs: list[str] = []
    for rtype, resources in sorted(by_type.items()):
        e, n, d = _differences(rtype, _sample(resources, 12))
        evaluations, non_empty, diffs = evaluations + e, non_empty + n, diffs + d
    assert diffs == []
    assert non_empty > 500


def test_extractor_on_synthea_matches_types() -> None:
    # every value an extractor returns is of the FHIR type it claims
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str),
        "code": lambda v: isinstance(v, str),
        "dateTime": lambda v: isinstance(v, str) and v[:4].isdigit(),
        "boolean": lambda v: isinstance(v, bool),
        "Reference": lambda v: isinstance(v, dict),
        "CodeableConcept": lambda v: isinstance(v, dict) and ("coding" in v or "text" in v),
        "Coding": lambda v: isinstance(v, dict) and ("code" in v or "display" in v),
        "Quantity": lambda v: isinstance(v, dict) and "value" in v,
        "Period": lambda v: isinstance(v, dict) and ("start" in v or "end" in v),
    }
    seen = set()
    for r in _synthea_resources():
        for sp in definitions().params(r["resourceType"]).values():
            extractor: Extractor | None = compile_expression(sp.expression, r["resourceType"])
            if extractor is None:
                continue
            for v, t in extractor(r):
                if t in checks:
                    seen.add(t)
                    assert checks[t](v), (sp.code, t, v)
    assert seen == set(checks)
