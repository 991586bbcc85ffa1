"""Black-box tests of search results and cross-resource search, over HTTP, on both backends:
paging links, `_count`, `_sort`, `_include`/`_revinclude` (`:iterate`), `_summary`, `_total`,
`_elements`, chaining, `_has`, compartment and system-level search, POST `_search`
(R4 search.html §3.1.1.5, §3.1.1.4.13-14, http.html#search)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.fhirserver.harness import BACKENDS, RunningFhir, database, running_fhir
from tests.fhirserver.test_search_api import TAG, Scope, fhir, obs, uid

__all__ = ["fhir"]  # the module-scoped server with a non-keep-alive client

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def links(bundle: dict[str, Any]) -> dict[str, str]:
    return {link["relation"]: link["url"] for link in bundle.get("link", [])}


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def entries(bundle: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def outcome_diagnostics(bundle: dict[str, Any]) -> list[str]:
    return [issue["diagnostics"] for oo in entries(bundle, "outcome") for issue in oo["issue"]]


def get(fhir: RunningFhir, url: str) -> dict[str, Any]:
    r = fhir.client.get(url)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# ---- paging (search.html#count, http.html#paging) ---------------------------------------------


def _walk(fhir: RunningFhir, first: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Follow `next` links from `first`; the match ids in order, and every page."""
    ids: list[str] = []
    pages: list[dict[str, Any]] = []
    url: str | None = first
    while url is not None:
        page = get(fhir, url)
        pages.append(page)
        ids += [r["id"] for r in entries(page, "match")]
        url = links(page).get("next")
        assert len(pages) < 50, "next links never end"
    return ids, pages


@pytest.mark.parametrize("sort", ["", "&_sort=family", "&_sort=-birthdate", "&_sort=-_lastUpdated,gender"])
def test_next_links_page_through_every_match_once(fhir: RunningFhir, sort: str) -> None:
    s = Scope(fhir)
    for i in range(11):
        s.create(
            f"p{i}", {"resourceType": "Patient", "name": [{"family": "Pager"}], "birthDate": f"19{i % 3}0"}
        )
    all_ids = fhir.ids(f"Patient?_tag={TAG}|{s.code}{sort}&_count=100")
    assert len(all_ids) == 11
    ids, pages = _walk(fhir, f"/Patient?_tag={TAG}|{s.code}{sort}&_count=4")
    assert ids == all_ids  # same order, no duplicates, no gaps
    assert [len(entries(p, "match")) for p in pages] == [4, 4, 3]
    assert "previous" not in links(pages[0])
    assert pages[-1]["total"] == 11  # known on the last page
    for page in pages:
        self_query = query_of(links(page)["self"])
        assert self_query["_count"] == ["4"]
        assert self_query["_tag"] == [f"{TAG}|{s.code}"]
        if sort:
            assert self_query["_sort"] == [sort.split("=", 1)[1]]
    # and back again through `previous`
    back: list[str] = []
    page = pages[-1]
    while True:
        back = [r["id"] for r in entries(page, "match")] + back
        prev = links(page).get("previous")
        if prev is None:
            break
        page = get(fhir, prev)
    assert back == all_ids


def test_total_accurate_and_none(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    for i in range(5):
        s.create(f"p{i}", {"resourceType": "Patient"})
    tagged = f"Patient?_tag={TAG}|{s.code}"
    assert fhir.search(f"{tagged}&_count=2&_total=accurate")["total"] == 5
    assert fhir.search(f"{tagged}&_count=2&_total=estimate")["total"] == 5
    assert "total" not in fhir.search(f"{tagged}&_count=10&_total=none")
    assert fhir.search(f"{tagged}&_count=10")["total"] == 5
    counted = fhir.search(f"{tagged}&_summary=count")
    assert counted["total"] == 5
    assert counted.get("entry", []) == []


def test_count_zero_is_the_total_only(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    for i in range(3):
        s.create(f"p{i}", {"resourceType": "Patient"})
    bundle = fhir.search(f"Patient?_tag={TAG}|{s.code}&_count=0")
    assert bundle["total"] == 3
    assert bundle.get("entry", []) == []
    assert set(links(bundle)) == {"self"}


def test_offset_past_the_end(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    for i in range(3):
        s.create(f"p{i}", {"resourceType": "Patient"})
    bundle = fhir.search(f"Patient?_tag={TAG}|{s.code}&_count=2&_offset=10")
    assert entries(bundle, "match") == []
    assert "next" not in links(bundle)
    assert query_of(links(bundle)["previous"])["_offset"] == ["8"]
    assert bundle["total"] == 3
    assert fhir.search(f"Patient?_tag={TAG}|{s.code}&_count=2&_offset=2")["total"] == 3


@pytest.fixture(params=BACKENDS)
def small_max(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningFhir]:
    backend: str = request.param
    with database(backend, tmp_path) as url, running_fhir(url, backend, max_count=5) as server:
        server.client = httpx.Client(
            base_url=server.base, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
        )
        yield server
        server.client.close()


def test_count_above_the_maximum_is_clamped_and_the_self_link_says_so(small_max: RunningFhir) -> None:
    for _ in range(7):
        small_max.create({"resourceType": "Patient"})
    bundle = small_max.search("Patient?_count=500")
    assert len(entries(bundle, "match")) == 5
    assert query_of(links(bundle)["self"])["_count"] == ["5"]
    assert query_of(links(bundle)["next"])["_count"] == ["5"]
    default = small_max.search("Patient")  # the default page size never exceeds the maximum
    assert len(entries(default, "match")) == 5
    ids, _ = _walk(small_max, "/Patient?_count=500")
    assert len(ids) == len(set(ids)) == 7


def test_includes_beyond_the_maximum_are_cut_with_a_warning(small_max: RunningFhir) -> None:
    patient = small_max.create({"resourceType": "Patient"})["id"]
    for _ in range(7):
        small_max.create(obs(subject={"reference": f"Patient/{patient}"}))
    bundle = small_max.search(f"Patient?_id={patient}&_revinclude=Observation:patient")
    assert len(entries(bundle, "match")) == 1
    assert len(entries(bundle, "include")) == 5
    assert any("_revinclude" in n for n in outcome_diagnostics(bundle))


# ---- _sort (search.html#sort) -------------------------------------------------------------------


def _sortable(s: Scope) -> None:
    s.create(
        "a", {"resourceType": "Patient", "name": [{"family": "Sortb", "given": ["Zed"]}], "birthDate": "1990"}
    )
    s.create(
        "b", {"resourceType": "Patient", "name": [{"family": "sorta", "given": ["Amy"]}], "birthDate": "1985"}
    )
    s.create(
        "c", {"resourceType": "Patient", "name": [{"family": "Sortb", "given": ["Bob"]}], "birthDate": "2000"}
    )
    s.create("d", {"resourceType": "Patient", "name": [{"family": "Sortc"}]})
    s.create("e", {"resourceType": "Patient", "birthDate": "1970"})


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("family", ["b", "a", "c", "d", "e"]),  # ties keep creation order; missing values last
        ("-family", ["d", "a", "c", "b", "e"]),
        ("family,-birthdate", ["b", "c", "a", "d", "e"]),
        ("-family,birthdate", ["d", "a", "c", "b", "e"]),
        ("birthdate", ["e", "b", "a", "c", "d"]),
        ("-birthdate", ["c", "a", "b", "e", "d"]),
        ("given", ["b", "c", "a", "d", "e"]),
        ("-given,family", ["a", "c", "b", "d", "e"]),
    ],
)
def test_sort(fhir: RunningFhir, sort: str, expected: list[str]) -> None:
    s = Scope(fhir)
    _sortable(s)
    assert s.tagged("Patient", f"_sort={sort}") == expected


def test_sort_by_each_parameter_type(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    ucum = "http://unitsofmeasure.org"
    s.create(
        "x",
        obs(
            "b-code",
            subject={"reference": "Patient/sort-2"},
            effectiveDateTime="2001-01-01",
            valueQuantity={"value": 10, "system": ucum, "code": "mg"},
        ),
    )
    s.create(
        "y",
        obs(
            "a-code",
            subject={"reference": "Patient/sort-3"},
            effectiveDateTime="2003-01-01",
            valueQuantity={"value": 2.5, "system": ucum, "code": "mg"},
        ),
    )
    s.create(
        "z",
        obs(
            "c-code",
            subject={"reference": "Patient/sort-1"},
            effectiveDateTime="2002-01-01",
            valueString="text",
        ),
    )
    assert s.tagged("Observation", "_sort=code") == ["y", "x", "z"]
    assert s.tagged("Observation", "_sort=-code") == ["z", "x", "y"]
    assert s.tagged("Observation", "_sort=subject") == ["z", "x", "y"]
    assert s.tagged("Observation", "_sort=date") == ["x", "z", "y"]
    assert s.tagged("Observation", "_sort=-date") == ["y", "z", "x"]
    assert s.tagged("Observation", "_sort=value-quantity") == ["y", "x", "z"]
    assert s.tagged("Observation", "_sort=-value-quantity") == ["x", "y", "z"]
    assert s.tagged("Observation", "_sort=-value-string") == ["z", "x", "y"]
    for label, probability in (("low", 0.2), ("high", 0.9), ("mid", 0.5)):
        s.create(
            label,
            {
                "resourceType": "RiskAssessment",
                "status": "final",
                "subject": {"reference": "Patient/x"},
                "prediction": [{"probabilityDecimal": probability}],
            },
        )
    assert s.tagged("RiskAssessment", "_sort=probability") == ["low", "mid", "high"]
    assert s.tagged("RiskAssessment", "_sort=-probability") == ["high", "mid", "low"]
    for label, url in (("u2", "http://b.example.org/vs"), ("u1", "http://a.example.org/vs")):
        s.create(label, {"resourceType": "ValueSet", "status": "active", "url": url})
    assert s.tagged("ValueSet", "_sort=url") == ["u1", "u2"]


def test_sort_by_id_and_last_updated(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    _sortable(s)
    by_id = s.tagged("Patient", "_sort=_id")
    assert [s.id(x) for x in by_id] == sorted(s.id(x) for x in "abcde")
    assert s.tagged("Patient", "_sort=-_id") == by_id[::-1]
    bundle = fhir.search(f"Patient?_tag={TAG}|{s.code}&_sort=-_lastUpdated")
    stamps = [r["meta"]["lastUpdated"] for r in entries(bundle, "match")]
    assert stamps == sorted(stamps, reverse=True)
    assert len(stamps) == 5


# ---- _include / _revinclude (search.html#include) -----------------------------------------------


def _graph(s: Scope) -> dict[str, str]:
    """org1 <-> org2 (partOf loop), patient -> org1, a/b -> patient, b hasMember a, c hasMember b."""
    ids: dict[str, str] = {}
    ids["org1"] = s.create("org1", {"resourceType": "Organization", "name": "One"})
    ids["org2"] = s.create(
        "org2",
        {
            "resourceType": "Organization",
            "name": "Two",
            "partOf": {"reference": f"Organization/{ids['org1']}"},
        },
    )
    org1 = {**s.resources["org1"], "partOf": {"reference": f"Organization/{ids['org2']}"}}
    r = s.fhir.client.put(f"/Organization/{ids['org1']}", json=org1)
    assert r.status_code == 200, r.text
    ids["doc"] = s.create("doc", {"resourceType": "Practitioner", "name": [{"family": "Who"}]})
    ids["pat"] = s.create(
        "pat",
        {
            "resourceType": "Patient",
            "managingOrganization": {"reference": f"Organization/{ids['org1']}"},
            "generalPractitioner": [{"reference": f"Practitioner/{ids['doc']}"}],
        },
    )
    subject = {"reference": f"Patient/{ids['pat']}"}
    ids["a"] = s.create("a", obs(subject=subject, performer=[{"reference": f"Practitioner/{ids['doc']}"}]))
    ids["b"] = s.create("b", obs(subject=subject, hasMember=[{"reference": f"Observation/{ids['a']}"}]))
    ids["c"] = s.create("c", obs(hasMember=[{"reference": f"Observation/{ids['b']}"}]))
    return ids


def _split(s: Scope, query: str) -> tuple[list[str], list[str]]:
    bundle = s.fhir.search(query)
    matches = [s.label(r["id"]) for r in entries(bundle, "match")]
    included = [s.label(r["id"]) for r in entries(bundle, "include")]
    assert len(included) == len(set(included)), f"{query}: {included} includes a resource twice"
    return matches, included


def test_include(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    ids = _graph(s)
    tagged = f"Observation?_tag={TAG}|{s.code}&subject:missing=false"
    matches, included = _split(s, f"{tagged}&_include=Observation:patient")
    assert sorted(matches) == ["a", "b"]
    assert included == ["pat"]
    assert _split(s, f"{tagged}&_include=Observation:subject:Patient")[1] == ["pat"]
    assert _split(s, f"{tagged}&_include=Observation:subject:Group")[1] == []
    assert _split(s, f"{tagged}&_include=Observation:performer")[1] == ["doc"]
    both = _split(s, f"{tagged}&_include=Observation:performer&_include=Observation:patient")[1]
    assert sorted(both) == ["doc", "pat"]
    # includes are not matches: not counted, and entries come after the matches
    bundle = fhir.search(f"{tagged}&_include=Observation:patient&_total=accurate")
    assert bundle["total"] == 2
    assert [e["search"]["mode"] for e in bundle["entry"]] == ["match", "match", "include"]
    # a page's includes are those of the page's matches
    first = fhir.search(f"Observation?_id={ids['a']},{ids['c']}&_include=Observation:has-member&_sort=_id")
    assert sorted(s.label(r["id"]) for r in entries(first, "include")) == ["b"]


def test_include_iterate_follows_included_resources_and_stops_on_loops(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    _graph(s)
    tagged = f"Observation?_tag={TAG}|{s.code}&subject:missing=false"
    _, included = _split(s, f"{tagged}&_include=Observation:patient&_include:iterate=Patient:organization")
    assert sorted(included) == ["org1", "pat"]
    _, included = _split(
        s,
        f"{tagged}&_include=Observation:patient&_include:iterate=Patient:organization"
        "&_include:iterate=Organization:partof",
    )
    assert sorted(included) == ["org1", "org2", "pat"]  # org2 -> org1 -> org2 ... ends
    # :recurse is the STU3 spelling of :iterate
    _, included = _split(s, f"{tagged}&_include=Observation:patient&_include:recurse=Patient:organization")
    assert sorted(included) == ["org1", "pat"]


def test_include_iterate_loop_between_two_resources(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    p1 = s.create("p1", {"resourceType": "Patient"})
    p2 = s.create(
        "p2",
        {"resourceType": "Patient", "link": [{"other": {"reference": f"Patient/{p1}"}, "type": "seealso"}]},
    )
    body = {**s.resources["p1"], "link": [{"other": {"reference": f"Patient/{p2}"}, "type": "seealso"}]}
    assert fhir.client.put(f"/Patient/{p1}", json=body).status_code == 200
    matches, included = _split(s, f"Patient?_id={p1}&_include:iterate=Patient:link")
    assert (matches, included) == (["p1"], ["p2"])
    matches, included = _split(s, f"Patient?_id={p1}&_include=Patient:link&_revinclude:iterate=Patient:link")
    assert (matches, included) == (["p1"], ["p2"])


def test_include_iterate_depth_is_bounded_with_a_warning(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    previous: str | None = None
    for i in range(8):  # o7 -> o6 -> ... -> o0
        members = [{"reference": f"Observation/{previous}"}] if previous else []
        previous = s.create(f"o{i}", obs(**({"hasMember": members} if members else {})))
    bundle = fhir.search(f"Observation?_id={previous}&_include:iterate=Observation:has-member")
    included = [s.label(r["id"]) for r in entries(bundle, "include")]
    assert included == [f"o{i}" for i in range(6, 6 - len(included), -1)]  # nearest first
    assert 2 <= len(included) < 7
    assert any(":iterate" in n for n in outcome_diagnostics(bundle))
    short = fhir.search(f"Observation?_id={s.id('o2')}&_include:iterate=Observation:has-member")
    assert [s.label(r["id"]) for r in entries(short, "include")] == ["o1", "o0"]
    assert outcome_diagnostics(short) == []


def test_include_without_iterate_from_a_type_not_searched_is_ignored_with_a_warning(
    fhir: RunningFhir,
) -> None:
    s = Scope(fhir)
    _graph(s)
    bundle = fhir.search(f"Observation?_tag={TAG}|{s.code}&_include=Patient:organization")
    assert entries(bundle, "include") == []
    notes = outcome_diagnostics(bundle)
    assert any("_include" in n and "Patient:organization" in n for n in notes), notes


def test_revinclude(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    ids = _graph(s)
    matches, included = _split(s, f"Patient?_id={ids['pat']}&_revinclude=Observation:patient")
    assert (matches, sorted(included)) == (["pat"], ["a", "b"])
    _, included = _split(
        s,
        f"Patient?_id={ids['pat']}&_revinclude=Observation:patient&_revinclude:iterate=Observation:has-member",
    )
    assert sorted(included) == ["a", "b", "c"]
    _, included = _split(s, f"Observation?_id={ids['a']}&_revinclude=Observation:has-member")
    assert included == ["b"]
    _, included = _split(s, f"Practitioner?_id={ids['doc']}&_revinclude=Patient:general-practitioner")
    assert included == ["pat"]
    _, included = _split(
        s,
        f"Organization?_id={ids['org2']}&_revinclude=Patient:organization"
        "&_revinclude:iterate=Organization:partof",
    )
    assert included == ["org1"]  # a _revinclude without :iterate starts from the matches only
    _, included = _split(
        s,
        f"Organization?_id={ids['org2']}&_revinclude:iterate=Patient:organization"
        "&_revinclude:iterate=Organization:partof",
    )
    # org2 <- org1 (partOf) <- patient (organization); org1's partOf loop back to org2 ends
    assert sorted(included) == ["org1", "pat"]


def test_include_skips_deleted_targets(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    ids = _graph(s)
    assert fhir.client.delete(f"/Practitioner/{ids['doc']}").status_code in (200, 204)
    assert _split(s, f"Observation?_id={ids['a']}&_include=Observation:performer")[1] == []
    assert _split(s, f"Patient?_id={ids['pat']}&_include=Patient:general-practitioner")[1] == []


# ---- _summary, _elements (search.html#summary, #elements) ---------------------------------------


def _patient_with_everything(s: Scope) -> str:
    return s.create(
        "p",
        {
            "resourceType": "Patient",
            "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">P</div>'},
            "name": [{"family": "Summary"}],
            "gender": "female",
            "birthDate": "1980-01-01",
            "maritalStatus": {"text": "married"},
            "communication": [{"language": {"text": "French"}}],
        },
    )


def _only(bundle: dict[str, Any]) -> dict[str, Any]:
    matches = entries(bundle, "match")
    assert len(matches) == 1
    return matches[0]


def test_summary_true_text_and_data(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    pid = _patient_with_everything(s)
    summary = _only(fhir.search(f"Patient?_id={pid}&_summary=true"))
    assert {"name", "gender", "birthDate"} <= summary.keys()
    assert "maritalStatus" not in summary
    assert "communication" not in summary
    assert "text" not in summary
    assert SUBSETTED in summary["meta"]["tag"]
    assert {"system": TAG, "code": s.code} in summary["meta"]["tag"]
    text = _only(fhir.search(f"Patient?_id={pid}&_summary=text"))
    assert set(text) == {"resourceType", "id", "meta", "text"}
    assert SUBSETTED in text["meta"]["tag"]
    data = _only(fhir.search(f"Patient?_id={pid}&_summary=data"))
    assert "text" not in data
    assert data["maritalStatus"] == {"text": "married"}
    full = _only(fhir.search(f"Patient?_id={pid}&_summary=false"))
    assert SUBSETTED not in full["meta"].get("tag", [])
    assert "text" in full


def test_elements(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    pid = _patient_with_everything(s)
    only = _only(fhir.search(f"Patient?_id={pid}&_elements=birthDate"))
    assert set(only) == {"resourceType", "id", "meta", "birthDate"}
    assert SUBSETTED in only["meta"]["tag"]
    two = _only(fhir.search(f"Patient?_id={pid}&_elements=Patient.name,gender"))
    assert set(two) == {"resourceType", "id", "meta", "name", "gender"}
    assert query_of(links(fhir.search(f"Patient?_id={pid}&_elements=birthDate"))["self"])["_elements"] == [
        "birthDate"
    ]


# ---- chaining (search.html#chaining) ------------------------------------------------------------


def _chain_data(s: Scope) -> dict[str, str]:
    system = f"urn:chain:{uid()}"
    ids = {"system": system}
    ids["p1"] = s.create(
        "p1",
        {
            "resourceType": "Patient",
            "name": [{"family": f"Chainy{s.code}"}],
            "identifier": [{"system": system, "value": "1"}],
            "birthDate": "1970-02-03",
        },
    )
    ids["p2"] = s.create(
        "p2",
        {
            "resourceType": "Patient",
            "name": [{"family": "Other"}],
            "identifier": [{"system": system, "value": "2"}],
        },
    )
    ids["g"] = s.create(
        "g",
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "identifier": [{"system": system, "value": "3"}],
        },
    )
    ids["dev"] = s.create("dev", {"resourceType": "Device", "identifier": [{"system": system, "value": "4"}]})
    s.create("a", obs("c1", subject={"reference": f"Patient/{ids['p1']}"}))
    s.create("b", obs("c2", subject={"reference": f"Patient/{ids['p2']}"}))
    s.create("of-group", obs("c1", subject={"reference": f"Group/{ids['g']}"}))
    s.create("of-device", obs("c2", subject={"reference": f"Device/{ids['dev']}"}))
    s.create("none", obs("c1"))
    return ids


def test_chaining_on_a_single_target(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    ids = _chain_data(s)
    system = ids["system"]
    assert s.find("Observation", f"subject:Patient.name=chainy{s.code}") == {"a"}
    assert s.find("Observation", f"patient.name=chainy{s.code}") == {"a"}
    assert s.find("Observation", f"patient.identifier={system}|1") == {"a"}
    assert s.find("Observation", f"patient.identifier={system}|1,{system}|2") == {"a", "b"}
    assert s.find("Observation", f"subject:Patient.identifier={system}|3") == set()
    assert s.find("Observation", f"subject:Group.identifier={system}|3") == {"of-group"}
    assert s.find("Observation", "patient.birthdate=1970-02") == {"a"}
    assert s.find("Observation", "patient.birthdate:missing=true") == {"b"}
    assert s.find("Observation", f"patient._id={ids['p2']}") == {"b"}
    assert s.find("Observation", f"patient.name=chainy{s.code}&code=c2") == set()
    assert s.find("Observation", f"patient.name=chainy{s.code}&patient.identifier={system}|2") == set()


def test_chaining_on_a_parameter_with_several_target_types(fhir: RunningFhir) -> None:
    """`subject` references Group, Device, Patient or Location, which all define `identifier`."""
    s = Scope(fhir)
    ids = _chain_data(s)
    system = ids["system"]
    assert s.find("Observation", f"subject.identifier={system}|1") == {"a"}
    assert s.find("Observation", f"subject.identifier={system}|3") == {"of-group"}
    assert s.find("Observation", f"subject.identifier={system}|4") == {"of-device"}
    assert s.find("Observation", f"subject.identifier={system}|") == {"a", "b", "of-group", "of-device"}


def test_chaining_does_not_follow_deleted_targets(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    ids = _chain_data(s)
    assert fhir.client.delete(f"/Patient/{ids['p1']}").status_code in (200, 204)
    assert s.find("Observation", f"patient.name=chainy{s.code}") == set()


# ---- _has (search.html#has) ---------------------------------------------------------------------


def test_has(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    ids = _chain_data(s)
    assert s.find("Patient", "_has:Observation:patient:code=c1") == {"p1"}
    assert s.find("Patient", "_has:Observation:subject:code=urn:test:code|c2") == {"p2"}
    assert s.find("Patient", "_has:Observation:patient:code=c1,c2") == {"p1", "p2"}
    assert s.find("Patient", "_has:Observation:patient:code=c1&_has:Observation:patient:code=c2") == set()
    assert s.find("Group", "_has:Observation:subject:code=c1") == {"g"}
    assert s.find("Patient", "_has:Observation:patient:code=nope") == set()
    assert s.find("Patient", "_has:Observation:patient:code:missing=false") == {"p1", "p2"}
    assert s.find("Patient", f"_has:Observation:patient:subject.identifier={ids['system']}|1") == {"p1"}
    a = next(label_id for label_id, label in s.labels.items() if label == "a")
    assert s.find("Patient", f"_has:Observation:patient:_id={a}") == {"p1"}
    assert s.find("Patient", f"_has:Observation:patient:_id:not={a}") == {"p2"}
    # nested: patients with an Observation that another Observation has as a member
    member = s.create("member", obs("m", subject={"reference": f"Patient/{ids['p2']}"}))
    s.create("panel", obs("panel", hasMember=[{"reference": f"Observation/{member}"}]))
    assert s.find("Patient", "_has:Observation:patient:_has:Observation:has-member:code=panel") == {"p2"}


def test_has_ignores_deleted_sources(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    p = s.create("p", {"resourceType": "Patient"})
    o = s.create("o", obs("gone", subject={"reference": f"Patient/{p}"}))
    assert s.find("Patient", "_has:Observation:patient:code=gone") == {"p"}
    assert fhir.client.delete(f"/Observation/{o}").status_code in (200, 204)
    assert s.find("Patient", "_has:Observation:patient:code=gone") == set()


# ---- compartment search (compartmentdefinition-patient.html) ------------------------------------


def test_patient_compartment_search(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    p = s.create("p", {"resourceType": "Patient"})
    q = s.create("q", {"resourceType": "Patient"})
    vital = {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}
        ]
    }
    lab = {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}
        ]
    }
    s.create("p-vital", obs("v", subject={"reference": f"Patient/{p}"}, category=[vital]))
    s.create("p-lab", obs("l", subject={"reference": f"Patient/{p}"}, category=[lab]))
    s.create("q-vital", obs("v", subject={"reference": f"Patient/{q}"}, category=[vital]))
    s.create("performed-by-p", obs("v", performer=[{"reference": f"Patient/{p}"}], category=[vital]))

    def compartment(query: str) -> set[str]:
        return {s.label(i) for i in fhir.ids(f"Patient/{p}/Observation?{query}")}

    assert compartment("") == {"p-vital", "p-lab", "performed-by-p"}
    assert compartment("category=vital-signs") == {"p-vital", "performed-by-p"}
    assert compartment("category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory") == {
        "p-lab"
    }
    assert compartment(f"subject=Patient/{p}") == {"p-vital", "p-lab"}
    assert compartment(f"subject=Patient/{q}") == set()
    bundle = fhir.search(f"Patient/{p}/Observation?category=vital-signs&_count=1")
    assert urlsplit(links(bundle)["self"]).path.endswith(f"/Patient/{p}/Observation")
    assert {s.label(i) for i in fhir.ids(f"Patient/{p}/Patient")} == {"p"}
    assert fhir.ids(f"Patient/{uid()}/Observation") == []


# ---- system-level search (search.html#all) ------------------------------------------------------


def test_system_search(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    p = s.create("p", {"resourceType": "Patient"})
    o = s.create("o", obs())
    org = s.create("org", {"resourceType": "Organization"})

    def system(query: str) -> set[str]:
        return {s.label(i) for i in fhir.ids(f"?{query}")}

    assert system(f"_type=Patient,Observation&_id={p},{o},{org}") == {"p", "o"}
    assert system(f"_id={p},{o},{org}") == {"p", "o", "org"}
    assert system(f"_type=Organization&_id={p},{o},{org}") == {"org"}
    bundle = fhir.search(f"?_type=Patient,Observation&_id={p},{o}")
    assert {e["fullUrl"] for e in bundle["entry"]} == {
        f"{fhir.base}/Patient/{p}",
        f"{fhir.base}/Observation/{o}",
    }
    stamp = s.resources["p"]["meta"]["lastUpdated"]
    assert system(f"_id={p},{o},{org}&_lastUpdated=ge{stamp}") == {"p", "o", "org"}
    assert system(f"_id={p},{o},{org}&_lastUpdated=lt{stamp}") == set()


def test_system_search_by_a_common_indexed_parameter(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("p", {"resourceType": "Patient"})
    s.create("o", obs())
    s.create("org", {"resourceType": "Organization"})
    tag = f"_tag={TAG}|{s.code}"
    assert {s.label(i) for i in fhir.ids(f"?{tag}")} == {"p", "o", "org"}
    assert {s.label(i) for i in fhir.ids(f"?_type=Patient,Organization&{tag}")} == {"p", "org"}
    assert {s.label(i) for i in fhir.ids(f"?_type=Patient&{tag}&_tag:missing=false")} == {"p"}
    assert {s.label(i) for i in fhir.ids(f"?{tag}&_sort=-_id")} == {"p", "o", "org"}


# ---- POST _search (http.html#search) ------------------------------------------------------------


def test_post_search_with_a_form_body(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    family = f"Posty{s.code}"
    s.create("a", {"resourceType": "Patient", "name": [{"family": family}], "gender": "female"})
    s.create("b", {"resourceType": "Patient", "name": [{"family": family}], "gender": "male"})
    r = fhir.client.post("/Patient/_search", content=f"family={family}&gender=female", headers=FORM)
    assert r.status_code == 200, r.text
    assert [s.label(e["resource"]["id"]) for e in r.json()["entry"]] == ["a"]
    # query and body parameters combine
    r = fhir.client.post(f"/Patient/_search?family={family}", content="gender=male", headers=FORM)
    assert [s.label(e["resource"]["id"]) for e in r.json()["entry"]] == ["b"]
    # the paging links are GET URLs carrying the body's parameters
    r = fhir.client.post("/Patient/_search", data={"family": family, "_count": "1"})
    assert r.status_code == 200, r.text
    nxt = links(r.json())["next"]
    assert query_of(nxt)["family"] == [family]
    assert urlsplit(nxt).path == "/Patient"
    assert len(entries(get(fhir, nxt), "match")) == 1
    # GET on _search works too; system-level POST _search
    assert len(entries(get(fhir, f"/Patient/_search?family={family}"), "match")) == 2
    r = fhir.client.post("/_search", content=f"_type=Patient&_tag={TAG}|{s.code}", headers=FORM)
    assert r.status_code == 200, r.text
    assert {s.label(e["resource"]["id"]) for e in r.json()["entry"]} == {"a", "b"}


def test_post_search_needs_a_form_body(fhir: RunningFhir) -> None:
    r = fhir.client.post("/Patient/_search", json={"family": "x"})
    assert r.status_code == 415
    assert r.json()["resourceType"] == "OperationOutcome"
