"""The FHIR R4 REST interactions (http.html) over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.fhirserver.harness import FHIR_JSON, RunningFhir

PATCH = {"Content-Type": "application/json-patch+json"}


def _patient(marker: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:rest", "value": marker}],
        "name": [{"family": f"Rest{marker}"}],
        **extra,
    }


def _count(fhir: RunningFhir, marker: str) -> int:
    total: int = fhir.search(f"Patient?identifier=urn:test:rest|{marker}&_summary=count")["total"]
    return total


def _issue(r: Any) -> dict[str, Any]:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    issue: dict[str, Any] = body["issue"][0]
    return issue


# ---- capability ---------------------------------------------------------------------------------


def test_metadata_lists_what_is_implemented(fhir: RunningFhir) -> None:
    r = fhir.client.get("/metadata")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {
        "transaction",
        "batch",
        "search-system",
        "history-system",
    }
    by_type = {r["type"]: r for r in rest["resource"]}
    patient = by_type["Patient"]
    params = {p["name"]: p["type"] for p in patient["searchParam"]}
    assert params["birthdate"] == "date"
    assert params["identifier"] == "token"
    assert "Observation:patient" in by_type["Observation"]["searchInclude"]
    assert "Observation:patient" in patient["searchRevInclude"]
    assert patient["operation"][0]["name"] == "everything"
    # composite parameters are not implemented, so they are not declared
    obs_params = {p["name"] for p in by_type["Observation"]["searchParam"]}
    assert "code-value-quantity" not in obs_params
    assert {"code", "category", "patient", "date"} <= obs_params
    for name in ("Encounter", "Condition", "DiagnosticReport", "Claim", "ExplanationOfBenefit", "Provenance"):
        assert {"read", "create", "update", "delete", "search-type"} <= {
            i["code"] for i in by_type[name]["interaction"]
        }


# ---- create / read ------------------------------------------------------------------------------


def test_create_assigns_id_version_and_location(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    r = fhir.client.post("/Patient", json={**_patient(marker), "id": "client-chosen"}, headers=FHIR_JSON)
    assert r.status_code == 201
    body = r.json()
    assert body["id"] != "client-chosen"  # POST: the server assigns the id (http.html §3.1.0.8)
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    assert r.headers["location"] == f"{fhir.base}/Patient/{body['id']}/_history/1"
    assert r.headers["etag"] == 'W/"1"'
    assert "last-modified" in r.headers
    read = fhir.client.get(f"/Patient/{body['id']}")
    assert read.status_code == 200
    assert read.json() == body


def test_conditional_create_201_200_412(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    cond = {"If-None-Exist": f"identifier=urn:test:rest|{marker}", **FHIR_JSON}
    first = fhir.client.post("/Patient", json=_patient(marker), headers=cond)
    assert first.status_code == 201
    again = fhir.client.post("/Patient", json=_patient(marker), headers=cond)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["meta"]["versionId"] == "1"
    assert _count(fhir, marker) == 1
    fhir.client.post("/Patient", json=_patient(marker), headers=FHIR_JSON)  # a second match
    several = fhir.client.post("/Patient", json=_patient(marker), headers=cond)
    assert several.status_code == 412
    assert "more than one" in _issue(several)["diagnostics"]
    assert _count(fhir, marker) == 2


def test_read_unknown_is_404_and_bad_id_is_400(fhir: RunningFhir) -> None:
    r = fhir.client.get("/Patient/does-not-exist")
    assert r.status_code == 404
    assert _issue(r)["code"] == "not-found"
    r = fhir.client.get("/Patient/bad$id")
    assert r.status_code == 400
    assert "not a valid resource id" in _issue(r)["diagnostics"]
    r = fhir.client.get("/Foo/1")
    assert r.status_code == 404
    assert "Unknown resource type 'Foo'" in _issue(r)["diagnostics"]


# ---- update / versioning ------------------------------------------------------------------------


def test_update_bumps_version_and_if_match_guards_it(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    pid = created["id"]
    changed = {**created, "gender": "female"}
    r = fhir.client.put(f"/Patient/{pid}", json=changed, headers={"If-Match": 'W/"1"', **FHIR_JSON})
    assert r.status_code == 200
    assert r.json()["meta"]["versionId"] == "2"
    assert r.headers["etag"] == 'W/"2"'
    stale = fhir.client.put(f"/Patient/{pid}", json=changed, headers={"If-Match": 'W/"1"', **FHIR_JSON})
    assert stale.status_code == 412
    assert _issue(stale)["code"] == "conflict"
    assert fhir.client.get(f"/Patient/{pid}").json()["meta"]["versionId"] == "2"
    bad = fhir.client.put(f"/Patient/{pid}", json=changed, headers={"If-Match": "yesterday", **FHIR_JSON})
    assert bad.status_code == 400


def test_update_as_create_uses_the_client_id(fhir: RunningFhir) -> None:
    pid = f"client-{uuid.uuid4().hex[:12]}"
    r = fhir.client.put(f"/Patient/{pid}", json={**_patient(pid), "id": pid}, headers=FHIR_JSON)
    assert r.status_code == 201
    assert r.headers["location"] == f"{fhir.base}/Patient/{pid}/_history/1"
    assert fhir.client.get(f"/Patient/{pid}").status_code == 200


def test_update_id_must_match_the_url(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    r = fhir.client.put(f"/Patient/{created['id']}", json={**created, "id": "other"}, headers=FHIR_JSON)
    assert r.status_code == 400
    assert "does not match the URL id" in _issue(r)["diagnostics"]
    no_id = {k: v for k, v in created.items() if k != "id"}
    r = fhir.client.put(f"/Patient/{created['id']}", json=no_id, headers=FHIR_JSON)
    assert r.status_code == 400
    assert fhir.client.get(f"/Patient/{created['id']}").json()["meta"]["versionId"] == "1"


def test_vread_serves_each_version(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    pid = created["id"]
    fhir.client.put(f"/Patient/{pid}", json={**created, "active": True}, headers=FHIR_JSON)
    v1 = fhir.client.get(f"/Patient/{pid}/_history/1")
    assert v1.status_code == 200
    assert "active" not in v1.json()
    assert fhir.client.get(f"/Patient/{pid}/_history/2").json()["active"] is True
    assert fhir.client.get(f"/Patient/{pid}/_history/9").status_code == 404
    assert fhir.client.get(f"/Patient/{pid}/_history/x").status_code == 400


# ---- delete -------------------------------------------------------------------------------------


def test_delete_then_read_is_gone_and_history_keeps_it(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    pid = created["id"]
    r = fhir.client.delete(f"/Patient/{pid}")
    assert r.status_code == 204
    gone = fhir.client.get(f"/Patient/{pid}")
    assert gone.status_code == 410
    assert _issue(gone)["code"] == "deleted"
    assert fhir.client.get(f"/Patient/{pid}/_history/1").status_code == 200
    assert fhir.client.get(f"/Patient/{pid}/_history/2").status_code == 410
    assert fhir.client.delete(f"/Patient/{pid}").status_code == 204  # idempotent
    history = fhir.search(f"Patient/{pid}/_history")
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert fhir.ids(f"Patient?_id={pid}") == []
    again = fhir.client.put(f"/Patient/{pid}", json=created, headers=FHIR_JSON)
    assert again.status_code == 201
    assert again.json()["meta"]["versionId"] == "3"


def test_conditional_delete_and_update(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    url = f"/Patient?identifier=urn:test:rest|{marker}"
    r = fhir.client.put(url, json=_patient(marker), headers=FHIR_JSON)
    assert r.status_code == 201
    pid = r.json()["id"]
    r = fhir.client.put(url, json={**_patient(marker), "active": False}, headers=FHIR_JSON)
    assert r.status_code == 200
    assert r.json()["id"] == pid
    assert r.json()["meta"]["versionId"] == "2"
    assert fhir.client.delete(url).status_code == 204
    assert fhir.client.get(f"/Patient/{pid}").status_code == 410
    fhir.create(_patient(marker))
    fhir.create(_patient(marker))
    assert fhir.client.delete(url).status_code == 412
    assert fhir.client.put(url, json=_patient(marker), headers=FHIR_JSON).status_code == 412
    assert _count(fhir, marker) == 2


# ---- history ------------------------------------------------------------------------------------


def test_instance_history_newest_first_with_paging(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    pid = created["id"]
    for n in range(3):
        fhir.client.put(f"/Patient/{pid}", json={**created, "birthDate": f"200{n}-01-01"}, headers=FHIR_JSON)
    history = fhir.search(f"Patient/{pid}/_history?_count=2")
    assert history["type"] == "history"
    assert history["total"] == 4
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["4", "3"]
    next_url = next(link["url"] for link in history["link"] if link["relation"] == "next")
    rest = fhir.client.get(next_url).json()
    assert [e["resource"]["meta"]["versionId"] for e in rest["entry"]] == ["2", "1"]
    relations = {link["relation"]: link["url"] for link in rest["link"]}
    assert set(relations) == {"self", "first", "previous"}
    assert fhir.client.get(relations["first"]).json()["entry"] == history["entry"]
    assert rest["entry"][1]["request"] == {"method": "POST", "url": "Patient"}


def test_type_and_system_history_and_since(fresh_fhir: RunningFhir) -> None:
    fhir = fresh_fhir
    first = fhir.create(_patient("a"))
    fhir.create({"resourceType": "Organization", "name": "Org"})
    since = fhir.create(_patient("b"))["meta"]["lastUpdated"]
    assert fhir.search("Patient/_history")["total"] == 2
    assert fhir.search("_history")["total"] == 3
    recent = fhir.client.get("/Patient/_history", params={"_since": since}).json()
    assert [e["resource"]["identifier"][0]["value"] for e in recent["entry"]] == ["b"]
    assert first["id"] not in str(recent)
    bad = fhir.client.get("/_history", params={"_since": "yesterday"})
    assert bad.status_code == 400


# ---- patch --------------------------------------------------------------------------------------


def test_json_patch(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    pid = created["id"]
    ops = [
        {"op": "add", "path": "/gender", "value": "other"},
        {"op": "replace", "path": "/name/0/family", "value": "X"},
    ]
    r = fhir.client.patch(f"/Patient/{pid}", json=ops, headers={**PATCH, "If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.json()["gender"] == "other"
    assert r.json()["name"][0]["family"] == "X"
    assert r.json()["meta"]["versionId"] == "2"
    assert fhir.ids(f"Patient?_id={pid}&family=x") == [pid]  # re-indexed
    stale = fhir.client.patch(f"/Patient/{pid}", json=ops, headers={**PATCH, "If-Match": 'W/"1"'})
    assert stale.status_code == 412
    failing = fhir.client.patch(
        f"/Patient/{pid}", json=[{"op": "test", "path": "/gender", "value": "male"}], headers=PATCH
    )
    assert failing.status_code == 422
    invalid = fhir.client.patch(
        f"/Patient/{pid}", json=[{"op": "replace", "path": "/gender", "value": 5}], headers=PATCH
    )
    assert invalid.status_code == 422
    assert _issue(invalid)["expression"] == ["Patient.gender"]
    renamed = fhir.client.patch(
        f"/Patient/{pid}", json=[{"op": "replace", "path": "/id", "value": "zz"}], headers=PATCH
    )
    assert renamed.status_code == 422
    wrong_type = fhir.client.patch(f"/Patient/{pid}", json=ops, headers=FHIR_JSON)
    assert wrong_type.status_code == 415
    assert fhir.client.get(f"/Patient/{pid}").json()["meta"]["versionId"] == "2"


# ---- Prefer, formats and bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefer", "check"),
    [
        ("return=minimal", lambda r: r.content == b""),
        ("return=representation", lambda r: r.json()["resourceType"] == "Patient"),
        ("return=OperationOutcome", lambda r: r.json()["resourceType"] == "OperationOutcome"),
    ],
)
def test_prefer_return(fhir: RunningFhir, prefer: str, check: Any) -> None:
    r = fhir.client.post("/Patient", json=_patient(uuid.uuid4().hex), headers={"Prefer": prefer, **FHIR_JSON})
    assert r.status_code == 201
    assert "location" in r.headers
    assert check(r)


def test_formats(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    path = f"/Patient/{created['id']}"
    assert fhir.client.get(path, params={"_format": "json"}).status_code == 200
    assert fhir.client.get(path, params={"_format": "application/fhir+json"}).status_code == 200
    assert fhir.client.get(path, params={"_format": "xml"}).status_code == 406
    assert fhir.client.get(path, headers={"Accept": "application/fhir+xml"}).status_code == 406
    assert fhir.client.get(path, headers={"Accept": "application/json"}).status_code == 200
    pretty = fhir.client.get(path, params={"_pretty": "true"})
    assert b"\n  " in pretty.content


def test_bad_input_changes_nothing(fhir: RunningFhir) -> None:
    marker = uuid.uuid4().hex
    good = _patient(marker)
    cases = [
        (fhir.client.post("/Patient", content=b"{not json", headers=FHIR_JSON), 400, "not valid JSON"),
        (fhir.client.post("/Patient", content=b"", headers=FHIR_JSON), 400, "empty"),
        (
            fhir.client.post("/Patient", json={**good, "resourceType": "Observation"}, headers=FHIR_JSON),
            400,
            "does not match",
        ),
        (
            fhir.client.post("/Patient", json={**good, "birthDate": "1970-13-01"}, headers=FHIR_JSON),
            422,
            "birthDate",
        ),
        (fhir.client.post("/Patient", json={**good, "nme": "x"}, headers=FHIR_JSON), 422, "nme"),
        (
            fhir.client.post(
                "/Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"}
            ),
            415,
            "Content-Type",
        ),
        (fhir.client.patch("/Patient", json=[]), 405, "PATCH is not allowed"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (status, r.text)
        assert text in _issue(r)["diagnostics"]
        assert r.headers["content-type"].startswith("application/fhir+json")
    assert _issue(cases[3][0])["expression"] == ["Patient.birthDate"]
    assert _count(fhir, marker) == 0


def test_405_names_the_allowed_methods(fhir: RunningFhir) -> None:
    r = fhir.client.delete("/metadata")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"


# ---- compartments and $everything ---------------------------------------------------------------


def _patient_with_data(fhir: RunningFhir) -> tuple[str, str, str]:
    marker = uuid.uuid4().hex
    org = fhir.create({"resourceType": "Organization", "name": f"Org{marker}"})
    pat = fhir.create(
        {**_patient(marker), "managingOrganization": {"reference": f"Organization/{org['id']}"}}
    )
    pid = pat["id"]
    enc = fhir.create(
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{pid}"},
        }
    )
    for code in ("laboratory", "vital-signs"):
        fhir.create(
            {
                "resourceType": "Observation",
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": code,
                            }
                        ]
                    }
                ],
                "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
                "subject": {"reference": f"Patient/{pid}"},
                "encounter": {"reference": f"Encounter/{enc['id']}"},
            }
        )
    other = fhir.create(_patient(uuid.uuid4().hex))
    fhir.create(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": f"Patient/{other['id']}"},
        }
    )
    return pid, org["id"], enc["id"]


def test_compartment_search(fhir: RunningFhir) -> None:
    pid, _, _ = _patient_with_data(fhir)
    assert len(fhir.ids(f"Patient/{pid}/Observation")) == 2
    assert len(fhir.ids(f"Patient/{pid}/Observation?category=laboratory")) == 1
    assert len(fhir.ids(f"Patient/{pid}/Encounter")) == 1
    assert fhir.client.get(f"/Encounter/{pid}/Observation").status_code == 404


def test_everything(fhir: RunningFhir) -> None:
    pid, org_id, enc_id = _patient_with_data(fhir)
    bundle = fhir.search(f"Patient/{pid}/$everything")
    refs = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]]
    assert refs[0] == f"Patient/{pid}"
    assert f"Organization/{org_id}" in refs  # referenced, outside the compartment
    assert f"Encounter/{enc_id}" in refs
    assert sum(r.startswith("Observation/") for r in refs) == 2
    assert bundle["total"] == 5
    only = fhir.search(f"Patient/{pid}/$everything?_type=Observation")
    assert {e["resource"]["resourceType"] for e in only["entry"]} == {"Observation"}
    page = fhir.search(f"Patient/{pid}/$everything?_count=2")
    assert len(page["entry"]) == 2
    next_url = next(link["url"] for link in page["link"] if link["relation"] == "next")
    seen = set(refs[:0])
    while next_url:
        more = fhir.client.get(next_url).json()
        seen |= {e["resource"]["id"] for e in more["entry"]}
        next_url = next((link["url"] for link in more["link"] if link["relation"] == "next"), None)
    assert len(seen) == 3
    future = fhir.search(f"Patient/{pid}/$everything?_since=2999-01-01")
    assert future["entry"] == []
    assert fhir.client.get("/Patient/nobody/$everything").status_code == 404


def test_oversized_body_is_413_and_stores_nothing(tmp_path: Any) -> None:
    from tests.fhirserver.harness import database, running_fhir

    with database("sqlite", tmp_path) as url, running_fhir(url, max_body=2048) as small:
        big = {"resourceType": "Patient", "name": [{"family": "x" * 4096}]}
        r = small.client.post("/Patient", json=big, headers=FHIR_JSON)
        assert r.status_code == 413
        assert "larger than 2048 bytes" in _issue(r)["diagnostics"]
        assert small.search("Patient?_summary=count")["total"] == 0


def test_if_none_match_gives_304(fhir: RunningFhir) -> None:
    created = fhir.create(_patient(uuid.uuid4().hex))
    r = fhir.client.get(f"/Patient/{created['id']}", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 304
    assert r.content == b""
    assert fhir.client.get(f"/Patient/{created['id']}", headers={"If-None-Match": 'W/"0"'}).status_code == 200


def test_decimals_keep_their_precision(fhir: RunningFhir) -> None:
    """R4 json.html: a decimal's digits are significant (1.50 is not 1.5), in create, update,
    patch, transactions and search results."""
    marker = uuid.uuid4().hex
    raw = (
        b'{"resourceType":"Observation","status":"final","code":{"text":"' + marker.encode() + b'"},'
        b'"valueQuantity":{"value":1.50,"unit":"mg","system":"http://unitsofmeasure.org","code":"mg"},'
        b'"referenceRange":[{"low":{"value":2.0e1},"high":{"value":100.000}}]}'
    )
    r = fhir.client.post("/Observation", content=raw, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    oid = r.json()["id"]
    stored = fhir.client.get(f"/Observation/{oid}").content
    assert b'"value":1.50,' in stored
    assert b'"value":100.000}' in stored
    assert b'"value":20}' in stored  # 2.0e1: the same number with the same two digits
    found = fhir.client.get("/Observation", params={"value-quantity": "1.5", "code:text": marker}).content
    assert b'"value":1.50,' in found
    patched = fhir.client.patch(
        f"/Observation/{oid}", json=[{"op": "replace", "path": "/status", "value": "amended"}], headers=PATCH
    )
    assert patched.status_code == 200
    assert b'"value":1.50,' in fhir.client.get(f"/Observation/{oid}").content
    tx = (
        b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"Observation"},'
        b'"resource":{"resourceType":"Observation","status":"final","code":{"text":"t"},'
        b'"valueQuantity":{"value":0.10}}}]}'
    )
    r = fhir.client.post("/", content=tx, headers={**FHIR_JSON, "Prefer": "return=representation"})
    assert r.status_code == 200
    assert b'"value":0.10}' in r.content
    location = r.json()["entry"][0]["response"]["location"]
    assert b'"value":0.10}' in fhir.client.get("/" + "/".join(location.split("/")[:2])).content


def test_metadata_declares_smart_security_when_an_issuer_protects_it(tmp_path: Any) -> None:
    """SMART App Launch 2.2: the CapabilityStatement names the authorization server's endpoints
    (oauth-uris) and the SMART-on-FHIR security service; without an issuer nothing is claimed."""
    from tests.fhirserver.harness import database, running_fhir

    issuer = "http://localhost:8000/auth"
    with database("sqlite", tmp_path) as url, running_fhir(url, auth_issuer=issuer + "/") as server:
        rest = server.client.get("/metadata").json()["rest"][0]
    security = rest["security"]
    assert security["service"][0]["coding"] == [
        {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}
    ]
    (uris,) = security["extension"]
    assert uris["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    assert {e["url"]: e["valueUri"] for e in uris["extension"]} == {
        "authorize": f"{issuer}/authorize",
        "token": f"{issuer}/token",
        "register": f"{issuer}/register",
        "manage": f"{issuer}/manage",
        "introspect": f"{issuer}/introspect",
        "revoke": f"{issuer}/revoke",
    }


def test_metadata_claims_no_security_by_default(fhir: RunningFhir) -> None:
    assert "security" not in fhir.client.get("/metadata").json()["rest"][0]
