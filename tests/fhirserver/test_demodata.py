"""`fhirserver.demodata`: deterministic, Synthea-shaped, valid R4 transaction Bundles whose
references all resolve (in the bundle, or conditionally against the provider directory bundle)."""

from __future__ import annotations

import collections
import re
import statistics
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from fhirgate.fhirserver import demodata
from fhirgate.fhirserver.demodata import NPI_SYSTEM, SYNTHEA_SYSTEM, generate
from fhirgate.fhirserver.validation import validate_resource

OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
DIRECTORY_TYPES = {"Organization", "Location", "Practitioner", "PractitionerRole"}
PATIENT_TYPES = {
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "Immunization",
    "AllergyIntolerance",
    "Procedure",
    "DiagnosticReport",
}
CONDITIONAL = re.compile(r"^(Organization|Location|Practitioner)\?identifier=([^|]+)\|(.+)$")
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00$")


Bundles = list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def bundles() -> Bundles:
    return list(generate(40, 3))


def resources(bundle: dict[str, Any], rtype: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if rtype is None or e["resource"]["resourceType"] == rtype]


def references(value: Any) -> Iterator[str]:
    """Every Reference.reference string anywhere inside `value`."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def codes(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in concept["coding"]}


# ---- determinism ------------------------------------------------------------------------------


def dumped(patients: int, seed: int) -> list[tuple[str, bytes]]:
    return [(name, orjson.dumps(bundle)) for name, bundle in generate(patients, seed)]


def test_same_seed_gives_identical_bytes() -> None:
    assert dumped(4, 11) == dumped(4, 11)


def test_different_seed_gives_different_data() -> None:
    one, two = dumped(3, 1), dumped(3, 2)
    assert [name for name, _ in one[1:]] != [name for name, _ in two[1:]]
    assert all(a != b for (_, a), (_, b) in zip(one, two, strict=True))


def test_patient_i_does_not_depend_on_the_number_of_patients() -> None:
    assert dumped(6, 5)[:3] == dumped(2, 5)


def test_no_patients_gives_the_directory_only() -> None:
    out = list(generate(0, 1))
    assert len(out) == 1
    assert out[0][0] == demodata.directory_filename(1)


def test_negative_patients_is_an_error() -> None:
    with pytest.raises(ValueError, match="patients"):
        list(generate(-1, 1))


# ---- bundle shape -----------------------------------------------------------------------------


def test_first_bundle_is_the_directory_of_conditional_updates(bundles: Bundles) -> None:
    name, directory = bundles[0]
    assert name.startswith("hospitalInformation")
    assert directory["resourceType"] == "Bundle"
    assert directory["type"] == "transaction"
    types = collections.Counter(r["resourceType"] for r in resources(directory))
    assert set(types) == DIRECTORY_TYPES
    assert types["Organization"] >= 10
    assert types["Practitioner"] == types["PractitionerRole"] >= types["Organization"]
    for entry in directory["entry"]:
        resource = entry["resource"]
        assert entry["request"]["method"] == "PUT"
        match = re.fullmatch(r"(\w+)\?identifier=([^|]+)\|(.+)", entry["request"]["url"])
        assert match is not None, entry["request"]["url"]
        rtype, system, value = match.groups()
        assert rtype == resource["resourceType"]
        assert {"system": system, "value": value} in resource["identifier"]
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
    # Conditional update urls must each select one resource.
    urls = [e["request"]["url"] for e in directory["entry"]]
    assert len(urls) == len(set(urls))
    npis = [r["identifier"][0]["value"] for r in resources(directory, "Practitioner")]
    assert all(re.fullmatch(r"\d{10}", npi) for npi in npis)


def test_patient_bundles_are_transactions_of_posts_with_unique_fullurls(bundles: Bundles) -> None:
    seen: set[str] = set()
    for name, bundle in bundles[1:]:
        assert bundle["resourceType"] == "Bundle"
        assert bundle["type"] == "transaction"
        patient = bundle["entry"][0]["resource"]
        assert patient["resourceType"] == "Patient"
        given, family = patient["name"][0]["given"][0], patient["name"][0]["family"]
        assert name == f"{given}_{family.replace(chr(39), '')}_{patient['id']}.json"
        for entry in bundle["entry"]:
            resource = entry["resource"]
            assert resource["resourceType"] in PATIENT_TYPES
            assert entry["request"] == {"method": "POST", "url": resource["resourceType"]}
            assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
            assert re.fullmatch(
                r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", resource["id"]
            )
            assert entry["fullUrl"] not in seen, "fullUrls are unique across all bundles"
            seen.add(entry["fullUrl"])


def test_every_reference_resolves(bundles: Bundles) -> None:
    directory = resources(bundles[0][1])
    known = {
        (r["resourceType"], ident["system"], ident["value"])
        for r in directory
        if r["resourceType"] != "PractitionerRole"
        for ident in r["identifier"]
    }
    directory_urns = {f"urn:uuid:{r['id']}" for r in directory}
    for ref in references(directory):
        assert ref in directory_urns
    conditional = 0
    for _, bundle in bundles[1:]:
        by_urn = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
        for ref in references(bundle):
            if ref.startswith("urn:uuid:"):
                assert ref in by_urn, ref
                continue
            match = CONDITIONAL.match(ref)
            assert match is not None, f"unexpected reference form {ref}"
            assert match.groups() in known, ref
            conditional += 1
    assert conditional > 0


def test_clinical_resources_point_at_their_patient_and_encounter(bundles: Bundles) -> None:
    for _, bundle in bundles[1:]:
        by_urn = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
        patient_urn = bundle["entry"][0]["fullUrl"]
        for resource in resources(bundle):
            rtype = resource["resourceType"]
            if rtype == "Patient":
                continue
            owner = resource.get("subject") or resource.get("patient")
            assert owner is not None, rtype
            assert owner["reference"] == patient_urn, rtype
            if "encounter" in resource:
                assert by_urn[resource["encounter"]["reference"]]["resourceType"] == "Encounter"
            elif rtype != "Encounter":
                pytest.fail(f"{rtype} without encounter")
        for report in resources(bundle, "DiagnosticReport"):
            assert report["result"]
            for result in report["result"]:
                target = by_urn[result["reference"]]
                assert target["resourceType"] == "Observation"
                assert target["category"][0]["coding"][0]["code"] == "laboratory"
                assert target["encounter"] == report["encounter"]
        for request in resources(bundle, "MedicationRequest"):
            for reason in request["reasonReference"]:
                assert by_urn[reason["reference"]]["resourceType"] in ("Condition", "AllergyIntolerance")


def test_every_resource_is_valid_r4(bundles: Bundles) -> None:
    for _, bundle in bundles:
        validate_resource(bundle)
        for resource in resources(bundle):
            validate_resource(resource)


def test_required_elements_are_present(bundles: Bundles) -> None:
    required = {
        "Observation": ("status", "code", "subject", "effectiveDateTime", "category"),
        "Encounter": ("status", "class", "subject", "period"),
        "Condition": ("subject", "code", "clinicalStatus", "verificationStatus"),
        "MedicationRequest": ("status", "intent", "medicationCodeableConcept", "subject", "authoredOn"),
        "Immunization": ("status", "vaccineCode", "patient", "occurrenceDateTime"),
        "Procedure": ("status", "subject", "code"),
        "DiagnosticReport": ("status", "code", "subject", "result"),
        "AllergyIntolerance": ("patient", "code"),
        "Patient": ("name", "gender", "birthDate", "address", "telecom", "identifier"),
    }
    for _, bundle in bundles[1:]:
        for resource in resources(bundle):
            for element in required[resource["resourceType"]]:
                assert element in resource, (resource["resourceType"], element)
            assert resource["meta"]["profile"], resource["resourceType"]


def test_patient_demographics(bundles: Bundles) -> None:
    us_core = "http://hl7.org/fhir/us/core/StructureDefinition/"
    for _, bundle in bundles[1:]:
        patient = bundle["entry"][0]["resource"]
        assert patient["meta"]["profile"] == [us_core + "us-core-patient"]
        mrn = [
            i for i in patient["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "MR"
        ]
        assert len(mrn) == 1
        assert mrn[0]["system"].startswith("http")
        assert mrn[0]["value"]
        extensions = {e["url"]: e for e in patient["extension"]}
        for name in ("us-core-race", "us-core-ethnicity"):
            parts = {x["url"]: x for x in extensions[us_core + name]["extension"]}
            assert parts["ombCategory"]["valueCoding"]["system"] == "urn:oid:2.16.840.1.113883.6.238"
            assert parts["text"]["valueString"]
        assert extensions[us_core + "us-core-birthsex"]["valueCode"] in ("F", "M")
        assert patient["gender"] in ("female", "male")
        assert patient["name"][0]["family"]
        assert patient["name"][0]["given"]
        assert patient["address"][0]["state"] == "MA"
        assert patient["generalPractitioner"][0]["reference"].startswith(
            f"Practitioner?identifier={NPI_SYSTEM}|"
        )
        assert patient["managingOrganization"]["reference"].startswith(
            f"Organization?identifier={SYNTHEA_SYSTEM}|"
        )


def test_observations_look_like_synthea(bundles: Bundles) -> None:
    categories: collections.Counter[str] = collections.Counter()
    coded_labs = 0
    for _, bundle in bundles[1:]:
        patient_categories = set()
        for obs in resources(bundle, "Observation"):
            (category,) = obs["category"]
            (coding,) = category["coding"]
            assert coding["system"] == OBS_CATEGORY
            patient_categories.add(coding["code"])
            assert obs["code"]["coding"][0]["system"] == LOINC
            assert obs["status"] == "final"
            quantity = obs.get("valueQuantity")
            if quantity is not None:
                assert quantity["system"] == UCUM
                assert quantity["code"] == quantity["unit"]
                assert isinstance(quantity["value"], int | float)
            if coding["code"] == "laboratory" and "valueCodeableConcept" in obs:
                coded_labs += 1
                assert obs["valueCodeableConcept"]["coding"][0]["system"] == SNOMED
            if (LOINC, "85354-9") in codes(obs["code"]):
                components = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in obs["component"]}
                assert set(components) == {"8480-6", "8462-4"}
                assert all(q["code"] == "mm[Hg]" for q in components.values())
                assert components["8480-6"]["value"] > components["8462-4"]["value"]
                assert "valueQuantity" not in obs
        assert "vital-signs" in patient_categories
        categories.update(patient_categories)
    assert categories["laboratory"] >= len(bundles) // 2
    assert {"vital-signs", "laboratory", "social-history", "survey"} <= set(categories)
    assert coded_labs > 0
    vital_codes = {
        c
        for _, bundle in bundles[1:]
        for obs in resources(bundle, "Observation")
        for c in codes(obs["code"])
        if obs["category"][0]["coding"][0]["code"] == "vital-signs"
    }
    for code in ("8302-2", "29463-7", "39156-5", "85354-9", "8867-4"):
        assert (LOINC, code) in vital_codes


def test_code_systems(bundles: Bundles) -> None:
    systems = {
        "MedicationRequest": ("medicationCodeableConcept", RXNORM),
        "Immunization": ("vaccineCode", CVX),
        "Procedure": ("code", SNOMED),
        "Condition": ("code", SNOMED),
        "AllergyIntolerance": ("code", SNOMED),
        "DiagnosticReport": ("code", LOINC),
        "Encounter": ("type", SNOMED),
    }
    seen: set[str] = set()
    for _, bundle in bundles[1:]:
        for resource in resources(bundle):
            rule = systems.get(resource["resourceType"])
            if rule is None:
                continue
            seen.add(resource["resourceType"])
            concept = resource[rule[0]]
            concept = concept[0] if isinstance(concept, list) else concept
            assert concept["coding"][0]["system"] == rule[1]
            assert concept["coding"][0]["display"]
            assert concept["text"]
    assert seen == set(systems)


def test_chronic_medications_end_active_and_history_is_before_the_reference_date(bundles: Bundles) -> None:
    end = f"{demodata.REFERENCE_DATE.isoformat()}T00:00:00+00:00"
    active = 0
    for _, bundle in bundles[1:]:
        birth = bundle["entry"][0]["resource"]["birthDate"]
        for resource in resources(bundle):
            for key in (
                "effectiveDateTime",
                "authoredOn",
                "occurrenceDateTime",
                "onsetDateTime",
                "recordedDate",
            ):
                if key in resource:
                    assert DATETIME.match(resource[key]), resource[key]
                    assert birth <= resource[key][:10]
                    assert resource[key] < end
            if "period" in resource:
                assert resource["period"]["start"] < resource["period"]["end"] < end
        active += sum(1 for r in resources(bundle, "MedicationRequest") if r["status"] == "active")
        for condition in resources(bundle, "Condition"):
            status = condition["clinicalStatus"]["coding"][0]["code"]
            assert ("abatementDateTime" in condition) == (status == "resolved")
    assert active > 0


def test_resource_counts_and_mix(bundles: Bundles) -> None:
    sizes = [len(bundle["entry"]) for _, bundle in bundles[1:]]
    assert all(demodata.MIN_RESOURCES <= n <= demodata.MAX_RESOURCES for n in sizes), sizes
    assert 200 <= statistics.mean(sizes) <= 450
    types = collections.Counter(r["resourceType"] for _, b in bundles[1:] for r in resources(b))
    assert set(types) == PATIENT_TYPES
    assert types["Observation"] > 0.6 * sum(types.values())
    assert types["Patient"] == len(bundles) - 1


def test_generation_is_fast() -> None:
    started = time.perf_counter()
    total = sum(len(orjson.dumps(bundle)) for _, bundle in generate(50, 9))
    elapsed = time.perf_counter() - started
    assert total > 1_000_000
    assert elapsed < 10, f"50 patients took {elapsed:.1f} s"  # about 0.4 s; 1,000 take about 7 s
