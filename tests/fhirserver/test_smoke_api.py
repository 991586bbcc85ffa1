from __future__ import annotations

from tests.fhirserver.harness import RunningFhir


def test_create_then_read_serves_the_stored_version(fhir: RunningFhir) -> None:
    created = fhir.create({"resourceType": "Patient", "name": [{"family": "Smoke"}]})
    r = fhir.client.get(f"/Patient/{created['id']}")
    assert r.status_code == 200
    assert r.headers["etag"] == 'W/"1"'
    assert r.json()["name"] == [{"family": "Smoke"}]
