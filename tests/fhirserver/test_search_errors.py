"""Black-box tests of how search answers bad or unsupported input (R4 search.html#errors), over
HTTP, on both backends: the exact status, an OperationOutcome, and a diagnostic naming the
parameter."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fhirserver.harness import RunningFhir
from tests.fhirserver.test_search_api import TAG, Scope, fhir, obs

__all__ = ["fhir"]  # the module-scoped server with a non-keep-alive client

STRICT = {"Prefer": "handling=strict"}


def error(fhir: RunningFhir, query: str, status: int = 400, **headers: str) -> str:
    """GET `query`; it must fail with `status` and an OperationOutcome; its first diagnostics."""
    r = fhir.client.get(f"/{query}", headers=headers)
    assert r.status_code == status, f"{query}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error"
    diagnostics: str = issue["diagnostics"]
    return diagnostics


def warnings(bundle: dict[str, Any]) -> list[str]:
    outcomes = [e for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "outcome"]
    return [i["diagnostics"] for e in outcomes for i in e["resource"]["issue"]]


def test_unknown_parameter_is_ignored_and_reported_unless_strict(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("p", {"resourceType": "Patient", "name": [{"family": "Lenient"}]})
    bundle = fhir.search(f"Patient?_tag={TAG}|{s.code}&fammily=lenient")
    assert [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"] == [s.id("p")]
    outcome = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcome) == 1
    assert outcome[0]["resource"]["resourceType"] == "OperationOutcome"
    issue = outcome[0]["resource"]["issue"][0]
    assert issue["severity"] == "warning"
    assert "fammily" in issue["diagnostics"]
    assert "family" in issue["diagnostics"]  # did you mean
    # the ignored parameter is not in the self link: it was not applied
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "fammily" not in self_link
    assert "fammily" in error(fhir, f"Patient?_tag={TAG}|{s.code}&fammily=lenient", **STRICT)


@pytest.mark.parametrize(
    "query",
    [
        "Patient?_content=x",  # defined by R4, not implemented
        "Patient?phonetic=smith",  # defined, not indexed
        "Observation?code-value-quantity=x$5",  # composite
        "Patient?family=",  # empty value
        "Patient?_sort=",
    ],
)
def test_unsupported_parameters_are_warnings_or_strict_errors(fhir: RunningFhir, query: str) -> None:
    name = query.split("?", 1)[1].split("=", 1)[0]
    bundle = fhir.search(query)
    notes = warnings(bundle)
    assert len(notes) == 1
    assert name in notes[0]
    assert name in error(fhir, query, **STRICT)


def test_unknown_parameter_inside_has(fhir: RunningFhir) -> None:
    query = "Patient?_has:Observation:subject:nope=x"
    assert any("_has:Observation:subject:nope" in n for n in warnings(fhir.search(query)))
    assert "'nope'" in error(fhir, query, **STRICT)


def test_strict_error_names_the_parameter_as_written(fhir: RunningFhir) -> None:
    assert "_has:Observation:subject:nope" in error(fhir, "Patient?_has:Observation:subject:nope=x", **STRICT)


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("Patient?birthdate=1970-13-01", ["birthdate", "1970-13-01"]),
        ("Patient?birthdate=1970-02-30", ["birthdate"]),
        ("Patient?birthdate=19700101", ["birthdate"]),
        ("Patient?birthdate=xx1970", ["birthdate", "xx"]),
        ("Patient?birthdate=1970-01-01T25:00:00Z", ["birthdate"]),
        ("Patient?_lastUpdated=yesterday", ["_lastUpdated"]),
        ("RiskAssessment?probability=abc", ["probability"]),
        ("RiskAssessment?probability=zz0.5", ["probability", "zz"]),
        ("Observation?value-quantity=5.4|mg", ["value-quantity"]),
        ("Observation?value-quantity=five||mg", ["value-quantity"]),
        ("Patient?_count=abc", ["_count"]),
        ("Patient?_count=-1", ["_count"]),
        ("Patient?_count=1&_count=2", ["_count"]),
        ("Patient?_offset=x", ["_offset"]),
        ("Patient?_sort=nosuchparam", ["_sort", "nosuchparam"]),
        ("Patient?_sort:desc=family", ["_sort"]),
        ("Patient?_summary=maybe", ["_summary"]),
        ("Patient?_total=lots", ["_total"]),
        ("Patient?_elements=not-an-element!", ["_elements"]),
        ("Patient?family:fuzzy=x", ["family", ":fuzzy"]),
        ("Patient?family:not=x", ["family", ":not"]),
        ("Patient?gender:contains=x", ["gender", ":contains"]),
        ("Patient?gender:missing=maybe", ["gender:missing"]),
        ("Patient?identifier=a|b|c", ["identifier"]),
        ("Patient?_id=not/an/id", ["_id"]),
        ("Observation?subject=Foo/123", ["subject", "Foo"]),
        ("Observation?subject:Foo=123", ["subject", "Foo"]),
        ("Observation?patient=Group/1", ["patient", "Group"]),
        ("Observation?subject.organization.name=x", ["subject.organization.name"]),
        ("Observation?code.name=x", ["code.name"]),
        ("Observation?_include=*", ["_include", "*"]),
        ("Observation?_include=Observation:*", ["_include"]),
        ("Patient?_revinclude=*", ["_revinclude"]),
        ("Observation?_include=Observation", ["_include"]),
        ("Observation?_include=Observation:code", ["_include", "code"]),
        ("Observation?_include=Observation:subject:Medication", ["_include", "Medication"]),
        ("Observation?_include:deep=Observation:subject", ["_include:deep"]),
        ("Patient?_has:Observation:code=x", ["_has:Observation:code"]),
        ("Patient?_has:Nope:patient:code=x", ["Nope"]),
        ("Patient?_has:Observation:code:code=x", ["_has"]),
    ],
)
def test_malformed_search_is_a_400_naming_the_parameter(
    fhir: RunningFhir, query: str, names: list[str]
) -> None:
    diagnostics = error(fhir, query)
    for name in names:
        assert name in diagnostics, diagnostics
    # a malformed value is an error whatever the handling preference
    error(fhir, query, **STRICT)


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("Nope?name=x", 404),
        ("Patient/x/Nope", 404),
        ("Observation/x/Observation", 404),  # only Patient compartments
        ("?_type=Nope", 400),
    ],
)
def test_unknown_types(fhir: RunningFhir, query: str, status: int) -> None:
    assert "Nope" in error(fhir, query, status) or status == 404


def test_system_search_with_a_type_specific_parameter(fhir: RunningFhir) -> None:
    bundle = fhir.search("?_type=Patient&family=x&_count=1")
    assert any("family" in n for n in warnings(bundle))
    assert "family" in error(fhir, "?_type=Patient&family=x", **STRICT)
    assert "_sort" in error(fhir, "?_type=Patient&_sort=family")


def test_include_iterate_cycles_terminate(fhir: RunningFhir) -> None:
    """A -> B -> A through two parameters, and a self-reference, with :iterate both ways."""
    s = Scope(fhir)
    a = s.create("a", obs("cycle"))
    b = s.create("b", obs("cycle", hasMember=[{"reference": f"Observation/{a}"}]))
    body = {
        **s.resources["a"],
        "hasMember": [{"reference": f"Observation/{b}"}, {"reference": f"Observation/{a}"}],
    }
    assert fhir.client.put(f"/Observation/{a}", json=body).status_code == 200
    bundle = fhir.search(
        f"Observation?_id={a}&_include:iterate=Observation:has-member&_revinclude:iterate=Observation:has-member"
        "&_include:iterate=Observation:derived-from"
    )
    modes = [(s.label(e["resource"]["id"]), e["search"]["mode"]) for e in bundle["entry"] if "resource" in e]
    assert modes[:2] == [("a", "match"), ("b", "include")]
    assert [m for m in modes if m[1] != "outcome"] == [("a", "match"), ("b", "include")]
