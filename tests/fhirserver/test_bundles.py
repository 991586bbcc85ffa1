"""batch and transaction Bundles (http.html §3.1.0.11) on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.fhirserver.harness import FHIR_JSON, SYNTHEA, RunningFhir


def _post(fhir: RunningFhir, bundle: dict[str, Any], **headers: str) -> Any:
    return fhir.client.post("/", json=bundle, headers={**FHIR_JSON, **headers})


def _tx(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _post_entry(resource: dict[str, Any], full_url: str | None = None, **request: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def _marker_patient(marker: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:test:tx", "value": marker}]}


def _count(fhir: RunningFhir, query: str) -> int:
    total: int = fhir.search(f"{query}&_summary=count")["total"]
    return total


def test_transaction_rewrites_urn_uuid_references(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    p_urn, e_urn = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    r = _post(
        fhir,
        _tx(
            _post_entry(
                {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": p_urn},
                    "text": {
                        "status": "generated",
                        "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{p_urn}">p</a></div>',
                    },
                },
                e_urn,
            ),
            _post_entry(_marker_patient(marker), p_urn),
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "201 Created"]
    enc_loc, pat_loc = (e["response"]["location"] for e in body["entry"])
    assert pat_loc.startswith("Patient/")
    assert pat_loc.endswith("/_history/1")
    patient_ref = "/".join(pat_loc.split("/")[:2])
    encounter = fhir.client.get("/" + "/".join(enc_loc.split("/")[:2])).json()
    assert encounter["subject"]["reference"] == patient_ref
    assert patient_ref in encounter["text"]["div"]
    assert fhir.ids(f"Encounter?subject={patient_ref}") == [encounter["id"]]


def test_transaction_resolves_circular_references(fhir: RunningFhir) -> None:
    a, b = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    r = _post(
        fhir,
        _tx(
            _post_entry({"resourceType": "Organization", "name": "A", "partOf": {"reference": b}}, a),
            _post_entry({"resourceType": "Organization", "name": "B", "partOf": {"reference": a}}, b),
        ),
    )
    assert r.status_code == 200, r.text
    loc_a, loc_b = ("/".join(e["response"]["location"].split("/")[:2]) for e in r.json()["entry"])
    assert fhir.client.get(f"/{loc_a}").json()["partOf"]["reference"] == loc_b
    assert fhir.client.get(f"/{loc_b}").json()["partOf"]["reference"] == loc_a


def test_conditional_references_resolve_to_exactly_one(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    patient = fhir.create(_marker_patient(marker))
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "t"},
        "subject": {"reference": f"Patient?identifier=urn:test:tx|{marker}"},
    }
    r = _post(fhir, _tx(_post_entry(obs)))
    assert r.status_code == 200, r.text
    assert len(fhir.ids(f"Observation?subject=Patient/{patient['id']}")) == 1
    missing = {**obs, "subject": {"reference": "Patient?identifier=urn:test:tx|nobody"}}
    r = _post(fhir, _tx(_post_entry(missing)))
    assert r.status_code == 412
    assert "matches no resource" in r.json()["issue"][0]["diagnostics"]
    fhir.create(_marker_patient(marker))
    r = _post(fhir, _tx(_post_entry(obs)))
    assert r.status_code == 412
    assert "more than one" in r.json()["issue"][0]["diagnostics"]
    assert len(fhir.ids(f"Observation?subject=Patient/{patient['id']}")) == 1


def test_transaction_failing_halfway_leaves_nothing(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    existing = fhir.create(_marker_patient(f"{marker}-x"))
    cases = [
        # an invalid resource in the second entry: 422 naming the entry and element
        (
            _tx(
                _post_entry(_marker_patient(marker)),
                _post_entry(
                    {
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"text": "x"},
                        "valueQuantity": {"value": "high"},
                    }
                ),
            ),
            422,
            "Bundle.entry[1]",
        ),
        # a version conflict on a later entry: 412, and the earlier create is rolled back
        (
            _tx(
                _post_entry(_marker_patient(marker)),
                {
                    "resource": existing,
                    "request": {"method": "PUT", "url": f"Patient/{existing['id']}", "ifMatch": 'W/"7"'},
                },
            ),
            412,
            "Bundle.entry[1]",
        ),
        # a reference to a urn:uuid that no entry has
        (
            _tx(
                _post_entry(_marker_patient(marker)),
                _post_entry(
                    {
                        "resourceType": "Encounter",
                        "status": "finished",
                        "class": {"code": "AMB"},
                        "subject": {"reference": f"urn:uuid:{uuid.uuid4()}"},
                    }
                ),
            ),
            400,
            "does not match the fullUrl",
        ),
    ]
    for bundle, status, text in cases:
        r = _post(fhir, bundle)
        assert r.status_code == status, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        assert text in r.json()["issue"][0]["diagnostics"]
        assert _count(fhir, f"Patient?identifier=urn:test:tx|{marker}") == 0
    assert fhir.client.get(f"/Patient/{existing['id']}").json()["meta"]["versionId"] == "1"
    invalid = _post(fhir, cases[0][0]).json()["issue"][0]
    assert invalid["expression"] == ["Bundle.entry[1].resource.valueQuantity.value"]


def test_processing_order_delete_post_put_get(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    doomed = fhir.create(_marker_patient(f"{marker}-doomed"))
    urn = f"urn:uuid:{uuid.uuid4()}"
    put_id = f"tx-{uuid.uuid4().hex[:10]}"
    r = _post(
        fhir,
        _tx(
            {"request": {"method": "GET", "url": f"Patient?identifier=urn:test:tx|{marker}"}},
            {
                "resource": {**_marker_patient(marker), "id": put_id},
                "request": {"method": "PUT", "url": f"Patient/{put_id}"},
            },
            _post_entry(
                {
                    **_marker_patient(marker),
                    "link": [{"other": {"reference": f"Patient/{put_id}"}, "type": "seealso"}],
                },
                urn,
            ),
            {"request": {"method": "DELETE", "url": f"Patient/{doomed['id']}"}},
        ),
    )
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    # responses come back in the request's order; the GET ran last and saw both writes
    assert entries[0]["response"]["status"] == "200 OK"
    assert entries[0]["resource"]["total"] == 2
    assert entries[1]["response"]["status"] == "201 Created"
    assert entries[3]["response"]["status"] == "204 No Content"
    assert fhir.client.get(f"/Patient/{doomed['id']}").status_code == 410


def test_if_none_exist_in_a_transaction_reuses_the_match(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    existing = fhir.create(_marker_patient(marker))
    urn = f"urn:uuid:{uuid.uuid4()}"
    r = _post(
        fhir,
        _tx(
            _post_entry(_marker_patient(marker), urn, ifNoneExist=f"identifier=urn:test:tx|{marker}"),
            _post_entry(
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": urn},
                }
            ),
        ),
    )
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"] == "200 OK"
    assert len(fhir.ids(f"Observation?subject=Patient/{existing['id']}")) == 1
    assert _count(fhir, f"Patient?identifier=urn:test:tx|{marker}") == 1


def test_conditional_put_in_a_transaction_creates_then_updates(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    org = {
        "resourceType": "Organization",
        "identifier": [{"system": "urn:test:tx", "value": marker}],
        "name": "v1",
    }
    entry = {
        "resource": org,
        "request": {"method": "PUT", "url": f"Organization?identifier=urn:test:tx|{marker}"},
    }
    first = _post(fhir, _tx(entry))
    assert first.json()["entry"][0]["response"]["status"] == "201 Created"
    second = _post(fhir, _tx({**entry, "resource": {**org, "name": "v2"}}))
    assert second.json()["entry"][0]["response"]["status"] == "200 OK"
    assert (
        fhir.search(f"Organization?identifier=urn:test:tx|{marker}")["entry"][0]["resource"]["name"] == "v2"
    )


def test_batch_entries_are_independent(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    r = _post(
        fhir,
        _tx(
            _post_entry(_marker_patient(marker)),
            _post_entry({"resourceType": "Patient", "gender": 7}),
            {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
            {"request": {"method": "GET", "url": f"Patient?identifier=urn:test:tx|{marker}"}},
            kind="batch",
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "404 Not Found", "200 OK"]
    assert body["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.gender"
    ]
    assert _count(fhir, f"Patient?identifier=urn:test:tx|{marker}") == 1


@pytest.mark.parametrize(
    ("bundle", "text"),
    [
        ({"resourceType": "Patient"}, "Bundle of type batch or transaction"),
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, "Bundle.type is 'collection'"),
        (
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"resource": {"resourceType": "Patient"}}],
            },
            "Bundle.entry[0].request needs a method",
        ),
        (
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"request": {"method": "POST", "url": "Patient"}}],
            },
            "needs a resource",
        ),
        (
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient"},
                        "request": {"method": "POST", "url": "Observation"},
                    }
                ],
            },
            "does not match",
        ),
    ],
)
def test_malformed_bundles_are_refused(fhir: RunningFhir, bundle: dict[str, Any], text: str) -> None:
    r = _post(fhir, bundle)
    assert r.status_code == 400, r.text
    assert text in r.json()["issue"][0]["diagnostics"]


def test_synthea_bundles_load_unchanged(fresh_fhir: RunningFhir) -> None:
    if not SYNTHEA.is_dir():
        pytest.skip("Synthea test data not present")
    fhir = fresh_fhir
    files = sorted(
        SYNTHEA.glob("*.json"), key=lambda f: (not f.name.startswith(("hospital", "practitioner")), f.name)
    )
    expected: dict[str, int] = {}
    for path in files:
        raw = path.read_bytes()
        bundle = json.loads(raw)
        r = fhir.client.post("/", content=raw, headers=FHIR_JSON)
        assert r.status_code == 200, (path.name, r.text[:500])
        assert all(e["response"]["status"] == "201 Created" for e in r.json()["entry"])
        for e in bundle["entry"]:
            expected[e["resource"]["resourceType"]] = expected.get(e["resource"]["resourceType"], 0) + 1
    for rtype, n in expected.items():
        assert fhir.search(f"{rtype}?_summary=count")["total"] == n, rtype
    patient = fhir.search("Patient?family=o'hara248")["entry"][0]["resource"]
    labs = fhir.search(f"Observation?patient={patient['id']}&category=laboratory&_count=50")
    assert labs["entry"]
    assert all(e["resource"]["subject"]["reference"] == f"Patient/{patient['id']}" for e in labs["entry"])
    everything = fhir.search(f"Patient/{patient['id']}/$everything?_count=1000")
    assert everything["total"] >= 150


def _patch_entry(url: str, data: str) -> dict[str, Any]:
    return {
        "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": data},
        "request": {"method": "PATCH", "url": url},
    }


def test_patch_entries_carry_a_base64_json_patch(fhir: RunningFhir) -> None:
    import base64

    created = fhir.create(_marker_patient(uuid.uuid4().hex))
    url = f"Patient/{created['id']}"
    ops = base64.b64encode(
        json.dumps([{"op": "add", "path": "/gender", "value": "female"}]).encode()
    ).decode()
    r = _post(fhir, _tx(_patch_entry(url, ops)))
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"] == "200 OK"
    assert fhir.client.get(f"/{url}").json()["gender"] == "female"
    # not base64, or not a Binary: the entry is refused with 400 (a whole transaction; one batch entry)
    r = _post(fhir, _tx(_patch_entry(url, "!!not base64!!")))
    assert r.status_code == 400
    assert (
        r.json()["issue"][0]["diagnostics"] == "Bundle.entry[0]: the PATCH entry's Binary.data is not base64"
    )
    batch = _post(
        fhir,
        _tx(
            _patch_entry(url, "!!not base64!!"),
            {"resource": created, "request": {"method": "PATCH", "url": url}},
            kind="batch",
        ),
    )
    assert batch.status_code == 200
    assert [e["response"]["status"] for e in batch.json()["entry"]] == ["400 Bad Request", "400 Bad Request"]
    second = batch.json()["entry"][1]["response"]["outcome"]["issue"][0]["diagnostics"]
    assert second == "Bundle.entry[1]: a PATCH entry carries a Binary resource whose data is the JSON Patch"
    assert fhir.client.get(f"/{url}").json()["meta"]["versionId"] == "2"
