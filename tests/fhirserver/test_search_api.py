"""Black-box tests of search by parameter type (R4 search.html §3.1.1.4), over HTTP, on both backends.

Every test makes its own resources, each tagged with a code unique to the test (`Scope`), and
every query runs twice (`Scope.find`): once confined by `_id`, so that the parameter under test
drives the SQL (`r.pid IN (...)` on its index), and once with the tag first, so that the tag drives
and the parameter is an `EXISTS` probe. Both must give the same answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.fhirserver.harness import RunningFhir

TAG = "urn:fhirgate:test"
UCUM = "http://unitsofmeasure.org"


@pytest.fixture(scope="module")
def fhir(fhir: RunningFhir) -> Iterator[RunningFhir]:
    """The shared server, with a client that opens a connection per request: on a kept-alive
    connection each small response waits ~40 ms for a delayed ACK (the harness's listening socket
    is made with proto 0, so asyncio does not set TCP_NODELAY on the connections it accepts)."""
    keepalive = fhir.client
    fhir.client = httpx.Client(
        base_url=fhir.base, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    )
    try:
        yield fhir
    finally:
        fhir.client.close()
        fhir.client = keepalive


def uid() -> str:
    return uuid.uuid4().hex[:12]


class Scope:
    """The resources of one test, by label; each carries the tag `TAG|code`."""

    def __init__(self, fhir: RunningFhir) -> None:
        self.fhir = fhir
        self.code = uid()
        self.ids: dict[str, dict[str, str]] = {}  # type -> label -> id
        self.labels: dict[str, str] = {}  # id -> label
        self.resources: dict[str, dict[str, Any]] = {}  # label -> created resource

    def create(self, label: str, resource: dict[str, Any]) -> str:
        resource = dict(resource)
        meta = dict(resource.get("meta") or {})
        meta["tag"] = [*meta.get("tag", []), {"system": TAG, "code": self.code}]
        resource["meta"] = meta
        created = self.fhir.create(resource)
        rid: str = created["id"]
        self.ids.setdefault(resource["resourceType"], {})[label] = rid
        self.labels[rid] = label
        self.resources[label] = created
        return rid

    def id(self, label: str) -> str:
        return str(self.resources[label]["id"])

    def label(self, rid: str) -> str:
        return self.labels.get(rid, f"<foreign {rid}>")

    def find(self, rtype: str, query: str) -> set[str]:
        """Labels of this scope's `rtype` resources matching `query`, checked both ways."""
        ids = ",".join(self.ids[rtype].values())
        driving = self.fhir.ids(f"{rtype}?{query}&_id={ids}&_count=1000")
        probed = self.fhir.ids(f"{rtype}?_tag={TAG}|{self.code}&{query}&_count=1000")
        a = {self.label(i) for i in driving}
        b = {self.label(i) for i in probed}
        assert a == b, f"{query}: driving {sorted(a)} != probed {sorted(b)}"
        return a

    def tagged(self, rtype: str, query: str = "") -> list[str]:
        """Labels matching `query` among this scope's resources, in the order served."""
        sep = "&" if query else ""
        return [self.label(i) for i in self.fhir.ids(f"{rtype}?_tag={TAG}|{self.code}{sep}{query}")]


def obs(code: str = "x", system: str | None = "urn:test:code", **extra: Any) -> dict[str, Any]:
    coding: dict[str, Any] = {"code": code}
    if system is not None:
        coding["system"] = system
    return {"resourceType": "Observation", "status": "final", "code": {"coding": [coding]}, **extra}


# ---- string (search.html#string) ---------------------------------------------------------------


def test_string_default_is_a_case_and_accent_insensitive_prefix(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("jose", {"resourceType": "Patient", "name": [{"family": "Muller", "given": ["Jose"]}]})
    s.create("josé", {"resourceType": "Patient", "name": [{"family": "Müller", "given": ["JOSÉ"]}]})
    s.create("joseph", {"resourceType": "Patient", "name": [{"family": "Mullerova", "given": ["Joseph"]}]})
    s.create("ann", {"resourceType": "Patient", "name": [{"family": "Smith", "given": ["Ann"]}]})
    everyone_jose = {"jose", "josé", "joseph"}
    assert s.find("Patient", "name=josé") == everyone_jose
    assert s.find("Patient", "given=JOSE") == everyone_jose
    assert s.find("Patient", f"given={quote('Jösé')}") == everyone_jose
    assert s.find("Patient", "family=müller") == {"jose", "josé", "joseph"}
    assert s.find("Patient", "family=mullerov") == {"joseph"}
    assert s.find("Patient", "family=uller") == set()  # a prefix, not a substring
    assert s.find("Patient", "given=josef") == set()


def test_string_exact_is_the_whole_string_case_and_accent_sensitive(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("plain", {"resourceType": "Patient", "name": [{"family": "Muller"}]})
    s.create("umlaut", {"resourceType": "Patient", "name": [{"family": "Müller"}]})
    s.create("longer", {"resourceType": "Patient", "name": [{"family": "Müllerova"}]})
    assert s.find("Patient", f"family:exact={quote('Müller')}") == {"umlaut"}
    assert s.find("Patient", "family:exact=Muller") == {"plain"}
    assert s.find("Patient", "family:exact=muller") == set()
    assert s.find("Patient", "family:exact=Mull") == set()


def test_string_contains_matches_anywhere_insensitively(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("a", {"resourceType": "Patient", "name": [{"family": "Vandermeer"}]})
    s.create("b", {"resourceType": "Patient", "name": [{"family": "Meerkat"}]})
    s.create("c", {"resourceType": "Patient", "name": [{"family": "Smith"}]})
    s.create("pct", {"resourceType": "Patient", "name": [{"family": "100% Sure_thing"}]})
    assert s.find("Patient", "family:contains=MEER") == {"a", "b"}
    assert s.find("Patient", "family:contains=dermee") == {"a"}
    # LIKE wildcards in the value are literal characters
    assert s.find("Patient", f"family:contains={quote('%')}") == {"pct"}
    assert s.find("Patient", "family:contains=e_t") == {"pct"}
    assert s.find("Patient", "family:contains=_") == {"pct"}


def test_string_name_searches_every_humanname_part(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    name = {
        "family": "Quintero",
        "given": ["Yvonne", "Zoe"],
        "prefix": ["Dr."],
        "suffix": ["III"],
        "text": "Textual Person",
    }
    s.create("full", {"resourceType": "Patient", "name": [name]})
    s.create("other", {"resourceType": "Patient", "name": [{"family": "Other", "given": ["Person"]}]})
    for value in ("quint", "yvonne", "zoe", "dr", "iii", "textual", "textual%20person"):
        assert s.find("Patient", f"name={value}") == {"full"}, value
    assert s.find("Patient", "name=person") == {"other"}
    assert s.find("Patient", "family=yvonne") == set()  # family is only the family part
    assert s.find("Patient", "given=zo") == {"full"}


def test_string_address_parts(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    address = {
        "line": ["12 Rue de l'Église", "Bâtiment B"],
        "city": "Saint-Étienne",
        "district": "Loire",
        "state": "Auvergne",
        "postalCode": "42000",
        "country": "France",
        "text": "Somewhere nice",
    }
    s.create("fr", {"resourceType": "Patient", "address": [address]})
    s.create("us", {"resourceType": "Patient", "address": [{"city": "Boston", "postalCode": "02115"}]})
    for value in ("12 rue", "batiment", "saint-etienne", "loire", "auvergne", "42000", "france", "somewhere"):
        assert s.find("Patient", f"address={quote(value)}") == {"fr"}, value
    assert s.find("Patient", "address-city=saint") == {"fr"}
    assert s.find("Patient", "address-city=boston") == {"us"}
    assert s.find("Patient", "address-postalcode=021") == {"us"}
    assert s.find("Patient", "address-country=fra") == {"fr"}
    assert s.find("Patient", "address-city=loire") == set()


def test_string_escaped_comma_is_part_of_the_value(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("comma", {"resourceType": "Patient", "name": [{"family": "Smith,Jones"}]})
    s.create("smith", {"resourceType": "Patient", "name": [{"family": "Smith"}]})
    s.create("jones", {"resourceType": "Patient", "name": [{"family": "Jones"}]})
    assert s.find("Patient", "family=" + quote("smith\\,jones")) == {"comma"}
    assert s.find("Patient", "family=smith,jones") == {"comma", "smith", "jones"}


# ---- token (search.html#token) -----------------------------------------------------------------


def test_token_code_system_and_no_system_forms(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    sys1, sys2 = f"urn:sys1:{uid()}", f"urn:sys2:{uid()}"
    s.create("s1", obs("C1", sys1))
    s.create("s2", obs("C1", sys2))
    s.create("nosys", obs("C1", None))
    s.create("c2", obs("C2", sys1))
    assert s.find("Observation", "code=C1") == {"s1", "s2", "nosys"}
    assert s.find("Observation", f"code={sys1}|C1") == {"s1"}
    assert s.find("Observation", "code=|C1") == {"nosys"}
    assert s.find("Observation", f"code={sys1}|") == {"s1", "c2"}
    assert s.find("Observation", "code=c1") == set()  # codes are case-sensitive
    assert s.find("Observation", f"code={sys1}|C2,{sys2}|C1") == {"c2", "s2"}


def test_token_not_excludes_matches_and_keeps_resources_without_a_value(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("male", {"resourceType": "Patient", "gender": "male"})
    s.create("female", {"resourceType": "Patient", "gender": "female"})
    s.create("none", {"resourceType": "Patient"})
    assert s.find("Patient", "gender=male") == {"male"}
    assert s.find("Patient", "gender:not=male") == {"female", "none"}
    assert s.find("Patient", "gender:not=male,female") == {"none"}
    assert s.find("Patient", "gender:missing=true") == {"none"}
    assert s.find("Patient", "gender:missing=false") == {"male", "female"}


def test_token_text_matches_display_and_concept_text(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    concept = {
        "coding": [
            {"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}
        ],
        "text": "Blood sugar",
    }
    s.create("glucose", {"resourceType": "Observation", "status": "final", "code": concept})
    s.create("other", obs("8302-2", "http://loinc.org"))
    assert s.find("Observation", "code:text=gluc") == {"glucose"}
    assert s.find("Observation", "code:text=BLOOD%20SUG") == {"glucose"}
    assert s.find("Observation", "code:text=sugar") == set()  # starts-with, like a string
    assert s.find("Observation", "code=2339-0") == {"glucose"}


def test_token_booleans(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("yes", {"resourceType": "Patient", "active": True})
    s.create("no", {"resourceType": "Patient", "active": False})
    s.create("unset", {"resourceType": "Patient"})
    assert s.find("Patient", "active=true") == {"yes"}
    assert s.find("Patient", "active=false") == {"no"}
    assert s.find("Patient", "active:not=true") == {"no", "unset"}
    assert s.find("Patient", "active:missing=true") == {"unset"}


def test_token_identifier(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    system = f"urn:mrn:{uid()}"
    mr = {"coding": [{"code": "MR"}], "text": "Medical record number"}
    s.create("a", {"resourceType": "Patient", "identifier": [{"system": system, "value": "A-1", "type": mr}]})
    s.create("b", {"resourceType": "Patient", "identifier": [{"system": system, "value": "B-2"}]})
    s.create("bare", {"resourceType": "Patient", "identifier": [{"value": "A-1"}]})
    s.create("none", {"resourceType": "Patient"})
    assert s.find("Patient", f"identifier={system}|A-1") == {"a"}
    assert s.find("Patient", "identifier=A-1") == {"a", "bare"}
    assert s.find("Patient", "identifier=|A-1") == {"bare"}
    assert s.find("Patient", f"identifier={system}|") == {"a", "b"}
    assert s.find("Patient", "identifier:text=medical%20rec") == {"a"}
    assert s.find("Patient", "identifier:missing=true") == {"none"}
    assert s.find("Patient", "identifier:missing=false") == {"a", "b", "bare"}
    assert s.find("Patient", f"identifier:not={system}|A-1") == {"b", "bare", "none"}


def test_token_contact_points(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    telecom = [{"system": "phone", "value": "555-0100"}, {"system": "email", "value": "Ann@Example.org"}]
    s.create("ann", {"resourceType": "Patient", "telecom": telecom})
    s.create("bob", {"resourceType": "Patient", "telecom": [{"system": "phone", "value": "555-0199"}]})
    assert s.find("Patient", "telecom=555-0100") == {"ann"}
    assert s.find("Patient", "telecom=Ann@Example.org") == {"ann"}
    assert s.find("Patient", "email=Ann@Example.org") == {"ann"}
    assert s.find("Patient", "phone=555-0199") == {"bob"}
    assert s.find("Patient", "phone=Ann@Example.org") == set()
    assert s.find("Patient", "email:missing=true") == {"bob"}


def test_token_escaped_pipe_in_a_code(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("pipe", {"resourceType": "Patient", "identifier": [{"value": "a|b"}]})
    s.create("plain", {"resourceType": "Patient", "identifier": [{"system": "a", "value": "b"}]})
    assert s.find("Patient", "identifier=" + quote("a\\|b")) == {"pipe"}
    assert s.find("Patient", "identifier=a|b") == {"plain"}


def test_tag_profile_and_security(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    profile = f"http://example.org/StructureDefinition/{uid()}"
    s.create(
        "a",
        {
            "resourceType": "Patient",
            "meta": {
                "profile": [profile],
                "security": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
                ],
            },
        },
    )
    s.create("b", {"resourceType": "Patient"})
    assert s.find("Patient", f"_profile={profile}") == {"a"}
    assert s.find("Patient", "_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R") == {"a"}
    assert s.find("Patient", "_security:missing=true") == {"b"}


# ---- reference (search.html#reference) ---------------------------------------------------------


def test_reference_forms(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    p = s.create("p", {"resourceType": "Patient"})
    q = s.create("q", {"resourceType": "Patient"})
    g = s.create("g", {"resourceType": "Group", "type": "person", "actual": True})
    s.create("of-p", obs(subject={"reference": f"Patient/{p}"}))
    s.create("of-q", obs(subject={"reference": f"Patient/{q}"}))
    s.create("of-g", obs(subject={"reference": f"Group/{g}"}))
    s.create("versioned", obs(subject={"reference": f"Patient/{p}/_history/1"}))
    s.create("absolute-local", obs(subject={"reference": f"{fhir.base}/Patient/{p}"}))
    s.create("none", obs())
    to_p = {"of-p", "versioned", "absolute-local"}
    assert s.find("Observation", f"patient=Patient/{p}") == to_p
    assert s.find("Observation", f"patient={p}") == to_p
    assert s.find("Observation", f"subject={p}") == to_p
    assert s.find("Observation", f"subject:Patient={p}") == to_p
    assert s.find("Observation", f"subject:Group={g}") == {"of-g"}
    assert s.find("Observation", f"subject=Group/{g}") == {"of-g"}
    assert s.find("Observation", f"subject:Group={p}") == set()
    assert s.find("Observation", f"subject=Patient/{p}/_history/7") == to_p
    assert s.find("Observation", f"patient={p},{q}") == {*to_p, "of-q"}
    assert s.find("Observation", "subject:missing=true") == {"none"}
    assert s.find("Observation", "subject:missing=false") == {*to_p, "of-q", "of-g"}
    assert s.find("Observation", "patient:missing=false") == {*to_p, "of-q"}


def test_reference_to_another_server_by_absolute_url(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    other = f"http://other.example.org/fhir/Patient/{uid()}"
    s.create("remote", obs(subject={"reference": other}))
    s.create("local", obs(subject={"reference": "Patient/remote-look-alike"}))
    assert s.find("Observation", f"subject={other}") == {"remote"}
    assert s.find("Observation", f"subject={other}x") == set()


def test_reference_by_this_servers_absolute_url(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    p = s.create("p", {"resourceType": "Patient"})
    s.create("of-p", obs(subject={"reference": f"Patient/{p}"}))
    assert s.find("Observation", f"subject={fhir.base}/Patient/{p}") == {"of-p"}


def test_reference_identifier_modifier(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    system = f"urn:mrn:{uid()}"
    s.create("by-ident", obs(subject={"identifier": {"system": system, "value": "42"}}))
    s.create(
        "both", obs(subject={"reference": "Patient/xyz", "identifier": {"system": system, "value": "43"}})
    )
    s.create("plain", obs(subject={"reference": "Patient/xyz"}))
    assert s.find("Observation", f"subject:identifier={system}|42") == {"by-ident"}
    assert s.find("Observation", f"subject:identifier={system}|") == {"by-ident", "both"}
    assert s.find("Observation", "subject:identifier=43") == {"both"}
    assert s.find("Observation", f"patient:identifier={system}|42") == set()  # not a Patient reference
    # a Reference with only an identifier is a value: not missing
    assert s.find("Observation", "subject:missing=false") == {"by-ident", "both", "plain"}
    assert s.find("Observation", "subject:missing=true") == set()


# ---- date (search.html#date) -------------------------------------------------------------------


def _birthdays(s: Scope) -> None:
    s.create("day", {"resourceType": "Patient", "birthDate": "1950-03-15"})
    s.create("april", {"resourceType": "Patient", "birthDate": "1950-04-01"})
    s.create("year51", {"resourceType": "Patient", "birthDate": "1951"})
    s.create("march", {"resourceType": "Patient", "birthDate": "1950-03"})
    s.create("unknown", {"resourceType": "Patient"})


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("1950-03-15", {"day"}),
        ("eq1950-03-15", {"day"}),
        ("1950-03", {"day", "march"}),
        ("1950", {"day", "april", "march"}),
        ("ne1950-03", {"april", "year51"}),
        ("gt1950-03-15", {"april", "year51", "march"}),
        ("lt1950-03-15", {"march"}),
        ("ge1950-03-15", {"day", "april", "year51", "march"}),
        ("le1950-03-15", {"day", "march"}),
        ("ge1950-03-20", {"april", "year51", "march"}),
        ("le1950-03-20", {"day", "march"}),
        ("gt1950-12", {"year51"}),
        ("lt1950-04-01", {"day", "march"}),
        ("sa1950-03", {"april", "year51"}),
        ("sa1950-03-15", {"april", "year51"}),
        ("eb1950-04", {"day", "march"}),
        ("eb1950-03-15", set()),
        ("1950-03-15T10:00:00Z", set()),
        ("ge1950-03-15T10:00:00Z", {"day", "april", "year51", "march"}),
        ("le1950-03-15T10:00:00Z", {"day", "march"}),
        ("lt1940,gt1950-12-31", {"year51"}),
    ],
)
def test_date_prefixes_on_dates_of_each_precision(fhir: RunningFhir, query: str, expected: set[str]) -> None:
    s = Scope(fhir)
    _birthdays(s)
    assert s.find("Patient", f"birthdate={query}") == expected


def test_date_missing(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    _birthdays(s)
    assert s.find("Patient", "birthdate:missing=true") == {"unknown"}
    assert s.find("Patient", "birthdate:missing=false") == {"day", "april", "year51", "march"}


def test_date_repeated_parameter_is_a_range(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    _birthdays(s)
    assert s.find("Patient", "birthdate=ge1950-03-10&birthdate=lt1950-04") == {"day", "march"}
    assert s.find("Patient", "birthdate=ge1950-03-16&birthdate=le1950-12-31") == {"april", "march"}


def test_datetime_with_time_zones(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("late", obs(effectiveDateTime="2020-06-01T23:30:00+02:00"))  # 21:30Z
    s.create("next", obs(effectiveDateTime="2020-06-02T01:30:00+02:00"))  # 23:30Z on June 1
    s.create("ms", obs(effectiveDateTime="2020-06-02T00:00:00.250Z"))
    assert s.find("Observation", "date=2020-06-01") == {"late", "next"}
    assert s.find("Observation", "date=2020-06-02") == {"ms"}
    assert s.find("Observation", "date=2020-06-01T21:30:00Z") == {"late"}
    assert s.find("Observation", "date=2020-06-01T21:30Z") == {"late"}
    assert s.find("Observation", "date=2020-06-01T23:30:00%2B02:00") == {"late"}
    # an unescaped '+' arrives as a space; the server reads it as the zone sign
    assert s.find("Observation", "date=2020-06-01T23:30:00+02:00") == {"late"}
    assert s.find("Observation", "date=2020-06-01T17:30:00-04:00") == {"late"}
    assert s.find("Observation", "date=gt2020-06-01T21:30:00Z") == {"next", "ms"}
    assert s.find("Observation", "date=gt2020-06-01T21:30Z") == {"next", "ms"}
    assert s.find("Observation", "date=lt2020-06-01T23:30:00Z") == {"late"}
    assert s.find("Observation", "date=sa2020-06-01T23:30:00Z") == {"ms"}
    assert s.find("Observation", "date=2020-06-02T00:00:00.250Z") == {"ms"}
    assert s.find("Observation", "date=2020-06-02T00:00:00Z") == {"ms"}
    assert s.find("Observation", "date=2020-06-02T00:00:00.249Z") == set()


def test_date_periods_and_open_ends(fhir: RunningFhir) -> None:
    s = Scope(fhir)

    def enc(label: str, **period: str) -> None:
        s.create(
            label,
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "period": period,
            },
        )

    enc("open", start="1960-05-01")
    enc("closed", start="1960-05-01T08:00:00Z", end="1960-05-03T17:00:00Z")
    enc("until", end="1960-04-15")
    enc("ends-midday", start="1960-05-10", end="1960-05-15T12:00:00Z")
    enc("starts-midday", start="1960-05-15T12:00:00Z", end="1960-05-20")
    assert s.find("Encounter", "date=1960-05") == {"closed", "ends-midday", "starts-midday"}
    assert s.find("Encounter", "date=1960-05-02") == set()  # no period fits inside one day
    assert s.find("Encounter", "date=gt2030") == {"open"}
    assert s.find("Encounter", "date=lt1900") == {"until"}
    assert s.find("Encounter", "date=sa1960-04") == {"open", "closed", "ends-midday", "starts-midday"}
    assert s.find("Encounter", "date=sa1960-05-01") == {"ends-midday", "starts-midday"}
    assert s.find("Encounter", "date=eb1960-05") == {"until"}
    assert s.find("Encounter", "date=eb2100") == {"until", "closed", "ends-midday", "starts-midday"}
    assert s.find("Encounter", "date=ne1960-05") == {"open", "until"}
    # ge: the range above the search value overlaps the period, or the search value contains it;
    # le: the range below overlaps, or the search value contains it (search.html#prefix)
    assert s.find("Encounter", "date=ge1960-05-15") == {"open", "starts-midday"}
    assert s.find("Encounter", "date=le1960-05-15") == {"open", "until", "closed", "ends-midday"}
    assert s.find("Encounter", "date=gt1960-05-15") == {"open", "starts-midday"}
    assert s.find("Encounter", "date=lt1960-05-15") == {"open", "until", "closed", "ends-midday"}


def test_date_approximately(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    now = time.time()

    def day(offset_days: float) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(now + offset_days * 86400))

    s.create("recent", obs(effectiveDateTime=day(-10)))
    s.create("older", obs(effectiveDateTime=day(-40)))
    s.create("old", obs(effectiveDateTime="1990-06-15"))
    assert s.find("Observation", f"date=ap{day(-10)}") == {"recent"}
    assert s.find("Observation", f"date=ap{day(-12)}") == {"recent"}  # within a day or 10% of the gap
    assert s.find("Observation", f"date=ap{day(-40)}") == {"older"}
    assert s.find("Observation", "date=ap1991") == {"old"}  # 10% of ~35 years either side
    assert s.find("Observation", "date=ap1950") == set()


def test_last_updated(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("a", {"resourceType": "Patient"})
    stamp = s.resources["a"]["meta"]["lastUpdated"]  # e.g. 2024-05-01T10:11:12.345Z
    assert s.find("Patient", f"_lastUpdated={stamp}") == {"a"}
    assert s.find("Patient", f"_lastUpdated=ge{stamp}") == {"a"}
    assert s.find("Patient", f"_lastUpdated=le{stamp}") == {"a"}
    assert s.find("Patient", f"_lastUpdated=gt{stamp}") == set()
    assert s.find("Patient", f"_lastUpdated=lt{stamp}") == set()
    assert s.find("Patient", f"_lastUpdated={stamp[:10]}") == {"a"}
    assert s.find("Patient", "_lastUpdated=gt2000-01-01") == {"a"}
    assert s.find("Patient", "_lastUpdated=le2000") == set()
    assert s.find("Patient", "_lastUpdated=le2000,gt2001") == {"a"}
    assert s.find("Patient", f"_lastUpdated=ne{stamp}") == set()


# ---- number and quantity (search.html#number, #quantity) ---------------------------------------


def test_number_precision_and_prefixes(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    subject = {"reference": "Patient/nobody"}
    for label, probability in (("half", 0.5), ("p58", 0.58), ("p80", 0.8), ("hundred", 100)):
        s.create(
            label,
            {
                "resourceType": "RiskAssessment",
                "status": "final",
                "subject": subject,
                "prediction": [{"probabilityDecimal": probability}],
            },
        )
    s.create("none", {"resourceType": "RiskAssessment", "status": "final", "subject": subject})
    cases = {
        "0.5": {"half"},  # [0.45, 0.55)
        "0.50": {"half"},
        "0.6": {"p58"},  # [0.55, 0.65)
        "0.58": {"p58"},
        "0.580": {"p58"},
        "0.581": set(),
        "100": {"hundred"},
        "1e2": {"hundred"},
        "gt0.5": {"p58", "p80", "hundred"},
        "ge0.58": {"p58", "p80", "hundred"},
        "lt0.58": {"half"},
        "le0.8": {"half", "p58", "p80"},
        "ne0.5": {"p58", "p80", "hundred"},
        "sa0.58": {"p80", "hundred"},
        "eb0.58": {"half"},
        "ap0.55": {"half", "p58"},  # +-10%: [0.495, 0.605]
        "ap100": {"hundred"},
        "0.5,0.8": {"half", "p80"},
    }
    for query, expected in cases.items():
        assert s.find("RiskAssessment", f"probability={query}") == expected, query
    assert s.find("RiskAssessment", "probability:missing=true") == {"none"}


def test_quantity_with_system_code_and_unit(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("ucum-mg", obs(valueQuantity={"value": 5.4, "unit": "milligram", "system": UCUM, "code": "mg"}))
    s.create("unit-mg", obs(valueQuantity={"value": 5.4, "unit": "mg"}))
    s.create("ucum-g", obs(valueQuantity={"value": 5.4, "unit": "g", "system": UCUM, "code": "g"}))
    s.create("six-mg", obs(valueQuantity={"value": 6, "unit": "mg", "system": UCUM, "code": "mg"}))
    s.create("string", obs(valueString="5.4 mg"))
    ucum = quote(UCUM, safe="")
    assert s.find("Observation", f"value-quantity=5.4|{ucum}|mg") == {"ucum-mg"}
    assert s.find("Observation", f"value-quantity=5.4|{UCUM}|mg") == {"ucum-mg"}
    assert s.find("Observation", "value-quantity=5.4||mg") == {"ucum-mg", "unit-mg"}
    assert s.find("Observation", "value-quantity=5.4") == {"ucum-mg", "unit-mg", "ucum-g"}
    assert s.find("Observation", "value-quantity=5.40") == {"ucum-mg", "unit-mg", "ucum-g"}
    assert s.find("Observation", "value-quantity=5.45") == set()
    assert s.find("Observation", f"value-quantity=gt5.4|{UCUM}|mg") == {"six-mg"}
    assert s.find("Observation", f"value-quantity=ge5.4|{UCUM}|mg") == {"ucum-mg", "six-mg"}
    assert s.find("Observation", "value-quantity=le6||mg") == {"ucum-mg", "unit-mg", "six-mg"}
    assert s.find("Observation", "value-quantity=lt6||mg") == {"ucum-mg", "unit-mg"}
    assert s.find("Observation", f"value-quantity=ne5.4|{UCUM}|mg") == {"six-mg"}
    assert s.find("Observation", f"value-quantity=ap5|{UCUM}|mg") == {"ucum-mg"}  # [4.5, 5.5]
    assert s.find("Observation", "value-quantity=ap6.5||mg") == {"six-mg"}
    assert s.find("Observation", "value-quantity=5.4||milligram") == {"ucum-mg"}
    assert s.find("Observation", f"value-quantity=5.4|{UCUM}|") == {"ucum-mg", "ucum-g"}
    assert s.find("Observation", "value-quantity:missing=true") == {"string"}


# ---- uri (search.html#uri) ---------------------------------------------------------------------


def test_uri_exact_below_and_above(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    base = f"http://acme.example.org/{uid()}/fhir"

    def vs(label: str, url: str) -> None:
        s.create(label, {"resourceType": "ValueSet", "status": "active", "url": url})

    vs("root", base)
    vs("vs123", f"{base}/ValueSet/123")
    vs("vs124", f"{base}/ValueSet/124")
    vs("under", f"{base}/ValueSet/1_3")
    vs("urn", f"urn:oid:1.2.3.{int(uuid.uuid4().int % 10**9)}")
    assert s.find("ValueSet", f"url={base}/ValueSet/123") == {"vs123"}
    assert s.find("ValueSet", f"url={base}/ValueSet") == set()
    assert s.find("ValueSet", f"url:below={base}/ValueSet") == {"vs123", "vs124", "under"}
    assert s.find("ValueSet", f"url:below={base}") == {"root", "vs123", "vs124", "under"}
    assert s.find("ValueSet", f"url:above={base}/ValueSet/123/_history/5") == {"root", "vs123"}
    assert s.find("ValueSet", f"url:above={base}/ValueSet/12") == {"root"}
    # URIs are case-sensitive and '_' / '%' are not wildcards
    assert s.find("ValueSet", f"url:below={base.upper()}") == set()
    assert s.find("ValueSet", f"url:below={base}/ValueSet/1_") == {"under"}
    assert s.find("ValueSet", f"url:above={base}/ValueSet/143") == {"root"}
    assert s.find("ValueSet", f"url={base.upper()}") == set()


# ---- combining, _id (search.html#combining, #id) ------------------------------------------------


def test_comma_is_or_and_repeating_is_and(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    s.create("ab", {"resourceType": "Patient", "name": [{"given": ["Alpha", "Beta"]}]})
    s.create("a", {"resourceType": "Patient", "name": [{"given": ["Alpha"]}]})
    s.create("b", {"resourceType": "Patient", "name": [{"given": ["Beta"]}]})
    s.create("c", {"resourceType": "Patient", "name": [{"given": ["Gamma"]}], "gender": "other"})
    assert s.find("Patient", "given=alpha,beta") == {"ab", "a", "b"}
    assert s.find("Patient", "given=alpha&given=beta") == {"ab"}
    assert s.find("Patient", "given=alpha,gamma&given=beta,gamma") == {"ab", "c"}
    assert s.find("Patient", "given=gamma&gender=other") == {"c"}
    assert s.find("Patient", "given=gamma&gender=male") == set()


def test_id(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    a = s.create("a", {"resourceType": "Patient"})
    b = s.create("b", {"resourceType": "Patient"})
    s.create("c", {"resourceType": "Patient"})
    assert set(s.tagged("Patient", f"_id={a}")) == {"a"}
    assert set(s.tagged("Patient", f"_id={a},{b}")) == {"a", "b"}
    assert set(s.tagged("Patient", f"_id={a}&_id={b}")) == set()
    assert set(s.tagged("Patient", f"_id:not={a}")) == {"b", "c"}
    assert fhir.ids(f"Patient?_id={a}") == [a]
    assert fhir.ids(f"Observation?_id={a}") == []


def test_deleted_and_updated_resources(fhir: RunningFhir) -> None:
    s = Scope(fhir)
    gone = s.create("gone", {"resourceType": "Patient", "name": [{"family": "Deleted"}]})
    kept = s.create("kept", {"resourceType": "Patient", "name": [{"family": "Before"}]})
    assert fhir.client.delete(f"/Patient/{gone}").status_code in (200, 204)
    body = {**s.resources["kept"], "name": [{"family": "After"}]}
    assert fhir.client.put(f"/Patient/{kept}", json=body).status_code == 200
    assert s.tagged("Patient") == ["kept"]
    assert s.tagged("Patient", "family=deleted") == []
    assert s.tagged("Patient", "family=before") == []
    assert s.tagged("Patient", "family=after") == ["kept"]
