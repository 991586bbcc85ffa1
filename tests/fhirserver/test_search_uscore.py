"""US Core 3.1.1 / 6.1 required searches (the SHALL search parameters and combinations of the
Patient and Observation profiles, and the `patient` searches of the others) against one Synthea
patient loaded as a transaction Bundle, over HTTP, on both backends. Expected results are computed
from the Bundle itself."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from tests.fhirserver.harness import FHIR_JSON, SYNTHEA, RunningFhir
from tests.fhirserver.test_search_api import fhir

__all__ = ["fhir"]  # the module-scoped server with a non-keep-alive client

CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
LOINC = "http://loinc.org"
SYNTHEA_ID = "https://github.com/synthetichealth/synthea"


@dataclass
class Loaded:
    pid: str
    patient: dict[str, Any]
    resources: list[dict[str, Any]]  # as in the Bundle, urn:uuid references and all

    def of(self, rtype: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["resourceType"] == rtype]


@pytest.fixture(scope="module")
def carroll(fhir: RunningFhir) -> Loaded:
    paths = sorted(SYNTHEA.glob("Carroll471_*.json")) if SYNTHEA.is_dir() else []
    if not paths:
        pytest.skip(f"no Synthea bundle Carroll471_*.json in {SYNTHEA}")
    bundle = json.loads(paths[0].read_bytes())
    r = fhir.client.post("/", content=json.dumps(bundle), headers=FHIR_JSON)
    assert r.status_code == 200, r.text[:2000]
    answer = r.json()
    assert answer["type"] == "transaction-response"
    patient_entry = next(
        i for i, e in enumerate(bundle["entry"]) if e["resource"]["resourceType"] == "Patient"
    )
    location = answer["entry"][patient_entry]["response"]["location"]  # Patient/<id>/_history/1
    pid = location.split("/")[1]
    resources = [e["resource"] for e in bundle["entry"]]
    return Loaded(pid, resources[patient_entry], resources)


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _codes(concepts: list[dict[str, Any]] | dict[str, Any] | None) -> set[tuple[str | None, str | None]]:
    if concepts is None:
        return set()
    items = concepts if isinstance(concepts, list) else [concepts]
    return {(c.get("system"), c.get("code")) for cc in items for c in cc.get("coding", [])}


def count(fhir: RunningFhir, query: str) -> int:
    """Matches of `query`, checking `_total=accurate` against the entries actually served."""
    sep = "&" if "?" in query else "?"
    bundle = fhir.search(f"{query}{sep}_total=accurate&_count=1000")
    matches = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    assert bundle["total"] == len(matches)
    ids = [e["resource"]["id"] for e in matches]
    assert len(set(ids)) == len(ids)
    return len(matches)


# ---- Patient ------------------------------------------------------------------------------------


def test_patient_identifier_and_name(fhir: RunningFhir, carroll: Loaded) -> None:
    p = carroll.patient
    for ident in p["identifier"]:
        assert fhir.ids(f"Patient?identifier={quote(ident['system'], safe='')}|{ident['value']}") == [
            carroll.pid
        ]
    assert fhir.ids(f"Patient?identifier={SYNTHEA_ID}|no-such-value") == []
    family, given = p["name"][0]["family"], p["name"][0]["given"][0]  # O'Hara248, Carroll471
    for query in (
        f"name={given}",
        f"name={given.lower()}",
        f"name={quote(family)}",
        f"name={quote(family.upper()[:4])}",
        f"family={quote(family)}",
        f"family:exact={quote(family)}",
        f"given={given}",
        "name=mr",  # the prefix Mr.
    ):
        assert carroll.pid in fhir.ids(f"Patient?{query}"), query
    assert fhir.ids(f"Patient?family:exact={quote(family.lower())}") == []


def test_patient_birthdate_and_gender_with_name(fhir: RunningFhir, carroll: Loaded) -> None:
    p = carroll.patient
    given = p["name"][0]["given"][0]
    birth = p["birthDate"]  # 1954-06-13
    assert fhir.ids(f"Patient?birthdate={birth}&name={given}") == [carroll.pid]
    assert fhir.ids(f"Patient?birthdate={birth[:7]}&name={given}") == [carroll.pid]
    assert fhir.ids(f"Patient?birthdate=ge{birth[:4]}&birthdate=lt{int(birth[:4]) + 1}&name={given}") == [
        carroll.pid
    ]
    assert fhir.ids(f"Patient?birthdate=gt{birth}&name={given}") == []
    assert fhir.ids(f"Patient?gender={p['gender']}&name={given}") == [carroll.pid]
    assert fhir.ids(f"Patient?gender=female&name={given}") == []


def test_patient_gender_with_its_code_system(fhir: RunningFhir, carroll: Loaded) -> None:
    given = carroll.patient["name"][0]["given"][0]
    query = f"Patient?gender=http://hl7.org/fhir/administrative-gender|male&name={given}"
    assert fhir.ids(query) == [carroll.pid]


# ---- Observation --------------------------------------------------------------------------------


def _observations(
    carroll: Loaded, category: str | None = None, code: str | None = None
) -> list[dict[str, Any]]:
    out = carroll.of("Observation")
    if category is not None:
        out = [o for o in out if (CATEGORY, category) in _codes(o.get("category"))]
    if code is not None:
        out = [o for o in out if (LOINC, code) in _codes(o["code"])]
    return out


@pytest.mark.parametrize("patient", ["Patient/{pid}", "{pid}", "{base}/Patient/{pid}"])
@pytest.mark.parametrize("category", ["laboratory", "vital-signs", "survey"])
def test_observation_patient_and_category(
    fhir: RunningFhir, carroll: Loaded, patient: str, category: str
) -> None:
    ref = patient.format(pid=carroll.pid, base=fhir.base)
    expected = len(_observations(carroll, category))
    assert expected > 0
    assert count(fhir, f"Observation?patient={ref}&category={CATEGORY}|{category}") == expected
    assert count(fhir, f"Observation?patient={ref}&category={category}") == expected
    assert count(fhir, f"Observation?subject={ref}&category={category}") == expected


def test_observation_patient_and_code(fhir: RunningFhir, carroll: Loaded) -> None:
    ref = f"Patient/{carroll.pid}"
    for code in ("8302-2", "29463-7", "2093-3"):
        expected = len(_observations(carroll, code=code))
        assert expected > 0
        assert count(fhir, f"Observation?patient={ref}&code={LOINC}|{code}") == expected
        assert count(fhir, f"Observation?patient={ref}&code={code}") == expected
    both = len(_observations(carroll, code="8302-2")) + len(_observations(carroll, code="29463-7"))
    assert count(fhir, f"Observation?patient={ref}&code={LOINC}|8302-2,{LOINC}|29463-7") == both
    assert count(fhir, f"Observation?patient={ref}&code=http://snomed.info/sct|8302-2") == 0


@pytest.mark.parametrize(
    ("dates", "low", "high"),
    [
        (["ge2015-01-01"], "2015-01-01", None),
        (["lt2015-01-01"], None, "2015-01-01"),
        (["ge2013-01-01", "lt2016-07-01"], "2013-01-01", "2016-07-01"),
        (["gt2016"], "2017-01-01", None),
        (["le2012"], None, "2013-01-01"),
        (["2017"], "2017-01-01", "2018-01-01"),
    ],
)
def test_observation_patient_category_and_date(
    fhir: RunningFhir, carroll: Loaded, dates: list[str], low: str | None, high: str | None
) -> None:
    def within(o: dict[str, Any]) -> bool:
        when = _when(o["effectiveDateTime"])
        return (low is None or when >= _when(f"{low}T00:00:00Z")) and (
            high is None or when < _when(f"{high}T00:00:00Z")
        )

    date_params = "".join(f"&date={d}" for d in dates)
    for category in ("vital-signs", "laboratory"):
        expected = len([o for o in _observations(carroll, category) if within(o)])
        query = f"Observation?patient=Patient/{carroll.pid}&category={CATEGORY}|{category}{date_params}"
        assert count(fhir, query) == expected, query


def test_observation_sorted_by_date_and_paged(fhir: RunningFhir, carroll: Loaded) -> None:
    query = f"Observation?patient=Patient/{carroll.pid}&category=vital-signs&_sort=-date,_id"
    served: list[dict[str, Any]] = []
    url: str | None = f"/{query}&_count=7"
    while url is not None:
        page = fhir.client.get(url).json()
        served += [e["resource"] for e in page["entry"] if e["search"]["mode"] == "match"]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert len(served) == len(_observations(carroll, "vital-signs"))
    assert len({o["id"] for o in served}) == len(served)
    keys = [(_when(o["effectiveDateTime"]), o["id"]) for o in served]
    assert [k[0] for k in keys] == sorted((k[0] for k in keys), reverse=True)
    for (when_a, id_a), (when_b, id_b) in itertools.pairwise(keys):
        assert when_a > when_b or id_a < id_b  # ties in date ordered by _id


def test_observation_chained_and_reverse_chained(fhir: RunningFhir, carroll: Loaded) -> None:
    labs = len(_observations(carroll, "laboratory"))
    synthea_id = next(i["value"] for i in carroll.patient["identifier"] if i["system"] == SYNTHEA_ID)
    assert (
        count(fhir, f"Observation?patient.identifier={SYNTHEA_ID}|{synthea_id}&category=laboratory") == labs
    )
    assert (
        count(fhir, f"Observation?subject:Patient.identifier={SYNTHEA_ID}|{synthea_id}&category=laboratory")
        == labs
    )
    assert (
        count(fhir, f"Observation?subject.identifier={SYNTHEA_ID}|{synthea_id}&category=laboratory") == labs
    )
    given = carroll.patient["name"][0]["given"][0]
    assert count(fhir, f"Observation?patient.name={given}&code={LOINC}|8302-2") == len(
        _observations(carroll, code="8302-2")
    )
    assert fhir.ids(f"Patient?_has:Observation:patient:code={LOINC}|8302-2&name={given}") == [carroll.pid]
    assert fhir.ids(f"Patient?_has:Observation:patient:code={LOINC}|0000-0&name={given}") == []


def test_compartment_and_revinclude(fhir: RunningFhir, carroll: Loaded) -> None:
    labs = len(_observations(carroll, "laboratory"))
    assert count(fhir, f"Patient/{carroll.pid}/Observation?category=laboratory") == labs
    assert count(fhir, f"Patient/{carroll.pid}/Observation") == len(carroll.of("Observation"))
    assert count(fhir, f"Patient/{carroll.pid}/Encounter") == len(carroll.of("Encounter"))
    bundle = fhir.search(
        f"Patient?_id={carroll.pid}&_revinclude=Observation:patient&_revinclude=Encounter:patient"
    )
    included = [e["resource"]["resourceType"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert included.count("Observation") == len(carroll.of("Observation"))
    assert included.count("Encounter") == len(carroll.of("Encounter"))
    bundle = fhir.search(
        f"Observation?patient={carroll.pid}&code={LOINC}|8302-2&_include=Observation:patient"
    )
    assert [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"] == [carroll.pid]


# ---- the other US Core profiles' patient searches ------------------------------------------------


def _period_ge(start: str, end: str, day: str) -> bool:
    """`date=ge<day>` on a Period (search.html#prefix): ends after the day, or starts within or after it."""
    low = _when(f"{day}T00:00:00Z")
    return _when(end) >= low + timedelta(days=1) or _when(start) >= low


def test_other_profiles_patient_searches(fhir: RunningFhir, carroll: Loaded) -> None:
    ref = f"Patient/{carroll.pid}"
    for rtype in (
        "Condition",
        "Encounter",
        "Immunization",
        "Procedure",
        "MedicationRequest",
        "DiagnosticReport",
        "CarePlan",
        "CareTeam",
    ):
        assert count(fhir, f"{rtype}?patient={ref}") == len(carroll.of(rtype)), rtype
    encounters = [
        e
        for e in carroll.of("Encounter")
        if _period_ge(e["period"]["start"], e["period"]["end"], "2015-01-01")
    ]
    assert count(fhir, f"Encounter?patient={ref}&date=ge2015-01-01") == len(encounters)
    procedures = [
        p
        for p in carroll.of("Procedure")
        if _period_ge(p["performedPeriod"]["start"], p["performedPeriod"]["end"], "2015-01-01")
    ]
    assert count(fhir, f"Procedure?patient={ref}&date=ge2015-01-01") == len(procedures)
    orders = [m for m in carroll.of("MedicationRequest") if m["intent"] == "order"]
    assert count(fhir, f"MedicationRequest?patient={ref}&intent=order") == len(orders)
    assert count(fhir, f"MedicationRequest?patient={ref}&intent=proposal") == 0
    labs = [
        d
        for d in carroll.of("DiagnosticReport")
        if ("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB") in _codes(d.get("category"))
    ]
    assert count(
        fhir, f"DiagnosticReport?patient={ref}&category=http://terminology.hl7.org/CodeSystem/v2-0074|LAB"
    ) == len(labs)
    recent = [
        i
        for i in carroll.of("Immunization")
        if _when(i["occurrenceDateTime"]) >= datetime(2015, 1, 1, tzinfo=UTC)
    ]
    assert count(fhir, f"Immunization?patient={ref}&date=ge2015-01-01") == len(recent)
    statuses = {c["status"] for c in carroll.of("CareTeam")}
    for status in statuses:
        expected = len([c for c in carroll.of("CareTeam") if c["status"] == status])
        assert count(fhir, f"CareTeam?patient={ref}&status={status}") == expected


def test_everything(fhir: RunningFhir, carroll: Loaded) -> None:
    """Patient/$everything: the patient, its compartment and what those reference (here: all)."""
    bundle = fhir.search(f"Patient/{carroll.pid}/$everything?_count=1000")
    served = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert served[0] == "Patient"
    assert sorted(served) == sorted(r["resourceType"] for r in carroll.resources)
    assert bundle["total"] == len(carroll.resources)
    paged = fhir.search(f"Patient/{carroll.pid}/$everything?_type=Observation,Encounter&_count=10")
    assert paged["total"] == len(carroll.of("Observation")) + len(carroll.of("Encounter"))
    assert len(paged["entry"]) == 10
