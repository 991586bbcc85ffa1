"""SQL injection through every place a client's text reaches a query, on both databases: each is
either refused with the exact error or matched literally, and the store is intact afterwards."""

from __future__ import annotations

import uuid

import pytest

from tests.fhirserver.harness import FHIR_JSON, RunningFhir

PAYLOADS = [
    "x' OR '1'='1",
    "x'); DROP TABLE fhir_resource; --",
    'x" OR 1=1 --',
    "%' OR '%'='",
    "x\\'; SELECT pg_sleep(5); --",
]


def _counts(fhir: RunningFhir) -> tuple[int, int]:
    return (
        fhir.search("Patient?_summary=count")["total"],
        fhir.search("Observation?_summary=count")["total"],
    )


@pytest.mark.parametrize("payload", PAYLOADS)
def test_search_values_are_matched_literally(fhir: RunningFhir, payload: str) -> None:
    marker = uuid.uuid4().hex
    literal = fhir.create(
        {
            "resourceType": "Patient",
            "name": [{"family": f"{marker}{payload}"}],
            "identifier": [{"system": "urn:test:inj", "value": f"{marker}{payload}"}],
        }
    )
    fhir.create({"resourceType": "Patient", "name": [{"family": f"{marker}plain"}]})
    before = _counts(fhir)
    # the resource holding the payload as its value matches, and nothing else ever does
    exact = [literal["id"]]
    for path, params, expected in (
        ("Patient", [("family:exact", f"{marker}{payload}")], exact),
        ("Patient", [("family:contains", payload), ("family", marker)], exact),
        ("Patient", [("identifier", f"urn:test:inj|{marker}{payload}")], exact),
        ("Patient", [("_has:Observation:patient:code", payload), ("family", marker)], []),
        ("Observation", [("subject:Patient.family", payload)], []),
    ):
        r = fhir.client.get(f"/{path}", params=params)
        assert r.status_code == 200, (params, r.text)
        ids = [e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"]
        assert ids == expected, params
    assert _counts(fhir) == before


@pytest.mark.parametrize("payload", PAYLOADS)
def test_identifiers_types_and_sort_keys_are_refused(fhir: RunningFhir, payload: str) -> None:
    before = _counts(fhir)
    r = fhir.client.get(f"/Patient/{payload}")
    assert r.status_code in (400, 404)  # not a valid id, or a path that names nothing
    r = fhir.client.get("/Patient", params={"_sort": payload})
    assert r.status_code == 400
    assert r.json()["issue"][0]["code"] == "invalid"
    r = fhir.client.get(f"/{payload}")
    assert r.status_code in (400, 404)
    assert r.json()["resourceType"] == "OperationOutcome"
    r = fhir.client.put(
        f"/Patient/{payload}", json={"resourceType": "Patient", "id": payload}, headers=FHIR_JSON
    )
    assert r.status_code in (400, 404)
    assert _counts(fhir) == before
    # every table is still there and answering
    assert fhir.client.get("/Patient/_history", params={"_count": 1}).status_code == 200
